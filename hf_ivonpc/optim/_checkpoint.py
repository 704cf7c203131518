"""``state_dict`` / ``load_state_dict`` of the flat-state optimizers.

The layout is torch.optim's (``state`` per parameter: the views of the persistent buffers;
``param_groups`` with each group's ``step``), plus an ``hf_ivonpc`` entry: the class name, the
counters of the correction schedule and the generator state. Everything is a tensor or a plain
number, so ``torch.load(weights_only=True)`` reads it. With sharded parameters
``torch.distributed.checkpoint`` keeps only ``state`` and ``param_groups``: the entry travels in
the first group, with each rank's generator state as its row of a DTensor sharded over the ranks.
"""

from __future__ import annotations

import torch

from ._schedule import fresh_skip_counters
from ._sharding import local, local_part, rows_over_ranks


class FlatCheckpoint:
    """``state_dict`` and ``load_state_dict`` over the flat buffers (see the module)."""

    def state_dict(self) -> dict:
        sd = super().state_dict()
        extra = {"pc": dict(self._pc), "class": type(self).__name__}
        if self._mesh is None:
            sd["hf_ivonpc"] = {**extra, "generator": self.generator.get_state()}
        else:
            # torch.distributed.checkpoint keeps only "state" and "param_groups" and saves a plain
            # tensor once for all ranks: the counters travel in the first group, and each rank's
            # generator state as its row of a DTensor sharded over the ranks
            g = self.generator.get_state().to(self._device).view(1, -1)
            sd["param_groups"][0]["hf_ivonpc"] = {**extra, "generator": rows_over_ranks(g, self._mesh)}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by ``state_dict``, checking every size before changing anything."""
        groups = state_dict.get("param_groups")
        if groups is None or "state" not in state_dict:
            raise ValueError("state_dict is missing 'state' or 'param_groups'")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} parameter groups, the optimizer has "
                             f"{len(self.param_groups)}")
        extra = state_dict.get("hf_ivonpc")
        if extra is None and groups:   # a sharded optimizer's (see state_dict)
            extra = groups[0].get("hf_ivonpc")
        if extra is None:
            raise ValueError("state_dict was not saved by an hf_ivonpc optimizer (no 'hf_ivonpc' entry)")
        if extra.get("class") != type(self).__name__:
            raise ValueError(f"state_dict was saved by {extra.get('class')}, not {type(self).__name__}")
        plan = self._load_plan(state_dict["state"], groups)
        with torch.no_grad():
            for gi, i, name, t in plan:
                self._views[gi][name][i].copy_(local_part(self.param_groups[gi]["params"][i], t))
            for group, saved in zip(self.param_groups, groups):
                for k, v in saved.items():
                    if k not in ("params", "hf_ivonpc"):
                        group[k] = v
            self._pc = {**fresh_skip_counters(), **extra["pc"]}   # older files: no skip counts
            self.generator.set_state(local(extra["generator"]).reshape(-1).cpu())
            # the parameters are the source of truth for the mean, unless they hold a rounded
            # copy of the fp32 master kept here (low-precision parameters)
            for gi in range(len(self.param_groups)):
                for p, m in zip(self._params(gi), self._views[gi]["mean"]):
                    if p.dtype == self._dtype or not torch.equal(m.to(p.dtype), p.detach()):
                        m.copy_(p.detach())
            self._after_load()
        self._reset_accumulators()
        self._record_param_versions()

    def _load_plan(self, saved_state: dict, groups: list[dict]) -> list[tuple]:
        """(group, parameter, buffer, saved tensor) for every persistent buffer, each checked."""
        plan = []
        for gi, (group, saved) in enumerate(zip(self.param_groups, groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"parameter group {gi} has {len(group['params'])} parameters, "
                                 f"the state_dict {len(saved['params'])}")
            for i, (p, key) in enumerate(zip(group["params"], saved["params"])):
                st = saved_state.get(key)
                if st is None:
                    raise ValueError(f"state_dict has no state for parameter {key}")
                for name in self.persistent_buffers:
                    t = st.get(name)
                    if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                        raise ValueError(f"state '{name}' of parameter {key} has shape "
                                         f"{getattr(t, 'shape', None)}, expected {tuple(p.shape)}")
                    plan.append((gi, i, name, t))
        return plan

    def _after_load(self) -> None:
        """Recompute derived buffers after loading."""
