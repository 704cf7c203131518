"""A decoder split in two: a frozen trunk computed once, and the top layers run per step or draw.

When only the top layers of a causal LM carry trainable (LoRA) weights, the hidden states entering
the first of them do not depend on anything the optimizer changes or the posterior perturbs. They
can be computed once per example and reused by every training step, every mega-batch refresh and
every posterior draw; each pass then runs only the top layers and the LM head. With LoRA on the top
4 of SmolLM2-135M's 30 layers that is about a seventh of a full forward and backward.

    split = TrunkSplit(model, first_layer=26)      # model: a (peft-wrapped) decoder-only LM
    hidden = split.states(input_ids, attention_mask)           # [B, T, d], no gradients
    logits = split.logits(model, hidden, attention_mask, logits_to_keep=8)

Positions are given explicitly (``attention_mask.cumsum(-1) - 1``, so a left-padded row's first
token is position 0): a row's states then do not depend on the padding its batch needed, and the
trunk's states of one batch may be cut and re-padded into another. :meth:`TrunkSplit.check`
compares the split against the full forward on a batch (same padding, same positions) and is
called by the workloads before training: a model whose decoder does something between the
embeddings and the first layer that :meth:`logits` would skip (a scaled embedding, per-layer
attention types) fails there, not silently.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["TrunkSplit", "decoder_of", "positions"]


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (the module holding ``layers`` and ``embed_tokens``) of a causal LM, through
    DDP / peft wrappers."""
    seen = model.module if hasattr(model, "module") and isinstance(getattr(model, "module"), torch.nn.Module) else model
    for m in seen.modules():
        if isinstance(getattr(m, "layers", None), torch.nn.ModuleList) and hasattr(m, "embed_tokens"):
            return m
    raise ValueError(f"model ({type(model).__name__}) has no decoder stack with 'layers' and "
                     "'embed_tokens': accepted are decoder-only causal LMs such as Llama, Qwen2, SmolLM2")


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from each row's first token (0 on left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


class _Stop(Exception):
    pass


class TrunkSplit:
    """Layers ``[0, first_layer)`` (the trunk) and ``[first_layer, L)`` (the top) of ``model``'s
    decoder; see the module docstring. The trunk must hold no trainable parameter."""

    def __init__(self, model: torch.nn.Module, first_layer: int):
        dec = decoder_of(model)
        n = len(dec.layers)
        if not (isinstance(first_layer, int) and not isinstance(first_layer, bool) and 1 <= first_layer < n):
            raise ValueError(f"first_layer={first_layer!r} is invalid: accepted range is 1 to {n - 1} "
                             f"(the model has {n} layers)")
        types = getattr(getattr(model, "config", None), "layer_types", None)
        if types is not None and len(set(types)) > 1:
            raise ValueError(f"the model mixes attention types across layers ({sorted(set(types))}): the top "
                             "layers cannot be run on their own; accepted are models with one attention type")
        trainable = [name for name, p in dec.layers[:first_layer].named_parameters() if p.requires_grad]
        trainable += [f"embed_tokens.{name}" for name, p in dec.embed_tokens.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"first_layer={first_layer} is invalid: the trunk below it has trainable parameters "
                             f"({trainable[:3]}...); accepted is a split below which nothing trains "
                             "(LoRA on the top layers only: layers_to_transform)")
        self.first_layer = first_layer
        self.num_layers = n

    @torch.no_grad()
    def states(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The hidden states entering layer ``first_layer``, [B, T, d]; only the trunk runs."""
        dec = decoder_of(model)
        got = {}

        def grab(_module, args, kwargs):
            got["h"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        handle = dec.layers[self.first_layer].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            dec(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "h" not in got:
            raise RuntimeError(f"layer {self.first_layer} of {type(dec).__name__} was never called")
        return got["h"].detach()

    @contextlib.contextmanager
    def _top_only(self, model: torch.nn.Module):
        dec = decoder_of(model)
        full = dec.layers
        dec.layers = torch.nn.ModuleList(list(full)[self.first_layer:])
        try:
            yield
        finally:
            dec.layers = full

    def final_states(self, model: torch.nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The decoder's output (after its final norm, before the LM head) from ``hidden`` through the
        top layers, [B, T, d]; gradients flow to the top."""
        dec = decoder_of(model)
        with self._top_only(model):
            out = dec(inputs_embeds=hidden, attention_mask=attention_mask, position_ids=positions(attention_mask),
                      use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def logits(self, model: torch.nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor,
               logits_to_keep: int = 0) -> torch.Tensor:
        """The model's logits from ``hidden`` (the trunk's states) through the top layers and the LM
        head, for the last ``logits_to_keep`` positions (0: all); gradients flow to the top."""
        kw = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        with self._top_only(model):
            out = model(inputs_embeds=hidden, attention_mask=attention_mask,
                        position_ids=positions(attention_mask), use_cache=False, **kw)
        return out.logits if hasattr(out, "logits") else out[0]

    @torch.no_grad()
    def check(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              rtol: float = 1e-4) -> float:
        """The largest difference between the split's logits and the full forward's on one batch,
        relative to the largest logit; raises where it exceeds ``rtol`` (the two run the same layers
        in the same order, so they differ by rounding at most: 0 on the CPUs tried)."""
        was = model.training
        model.eval()
        try:
            full = model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=positions(attention_mask), use_cache=False)["logits"].float()
            split = self.logits(model, self.states(model, input_ids, attention_mask), attention_mask).float()
        finally:
            model.train(was)
        keep = attention_mask.bool()
        diff = float((full - split)[keep].abs().max() / full[keep].abs().max().clamp_min(1e-30))
        if not diff <= rtol:
            raise ValueError(f"the top layers run on their own give other logits than the full model "
                             f"(relative difference {diff:.3g} > {rtol:g}): this architecture does more between "
                             "its embeddings and its layers than the split reproduces; run without the "
                             "trunk cache (trunk_layers=0)")
        return diff
