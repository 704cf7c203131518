"""The posterior as an artifact: ``posterior.safetensors`` next to the model's own weights.

The model's weights (``model.safetensors``, or ``adapter_model.safetensors`` for a LoRA adapter)
are the posterior mean m and load with plain ``from_pretrained``. ``posterior.safetensors`` holds,
for every trainable parameter name ``n``, tensors of the parameter's shape:

    hess.<n>       h, IVON's Hessian estimate (what continues training)
    momentum.<n>   IVON's gradient momentum (optional)

in fp32 (fp64 for fp64 models). sigma = 1 / sqrt(ess (h + delta)), the posterior standard
deviation, is not stored (format version 2): it is recomputed on load from h and the group's ess
and weight decay exactly as the optimizer computes it (``sigma_from_hess``). Files of format
version 1 also hold ``std.<n>`` (sigma); they still load (sigma is then read and checked).

Names are those of ``model.named_parameters()`` of the model that was trained: for a LoRA adapter
trained as a ``PeftModel``, the PeftModel's names (e.g.
``base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight``), so the posterior loads
back onto ``PeftModel.from_pretrained(base, path)`` or ``get_peft_model(base, config)`` built the
same way (same adapter name). Only trainable parameters carry a posterior.

Large posteriors are sharded as transformers shards weights: above ``max_shard_size`` (default
"5GB") ``save`` writes ``posterior-00001-of-0000N.safetensors`` ... and
``posterior.safetensors.index.json`` ({"metadata": {...header metadata..., "total_size": bytes},
"weight_map": {tensor name: shard file}}); every shard's header carries the same metadata. A save
with as many shards as the folder's live index names ``posterior-00001-of-0000N-b.safetensors``
... instead (and the next one the plain names again): a save never overwrites a shard of the
posterior it replaces. Readers follow the index's weight_map, whatever the names.

The header's metadata (safetensors metadata is strings; values marked JSON are JSON):

    format               "pt" (as transformers writes it)
    hf_ivonpc.posterior  format version, "2" (version 1, which also stored sigma, still loads)
    method               "ivon" or "ivon_pcm" (the optimizer that learned it)
    step                 JSON: optimizer steps taken (null when unknown, e.g. after conversion)
    library_version      hf_ivonpc's version that wrote the file
    groups               JSON list, one entry per parameter group: {"params": [names], "ess",
                         "weight_decay" (delta), "hess_init", "beta1", "beta2", "lr",
                         "clip_radius", and for IVON-PCM "alpha", "rho1", "rho2", ...}

Methods without a posterior (``pc_method`` "alpha_svrg" and "none") write no posterior file.
Files are read with safetensors only (nothing is ever unpickled), tensor by tensor, and written
atomically (temp files in the same folder, then ``os.replace``: a crash while writing leaves the
previous posterior). A sharded save writes every shard to a temp file first, renames them into
place under names the live index does not name, and replaces the index last, atomically (temp
file, then ``os.replace``); a single-file save renames its file into place before it removes the
index (which wins over the single file). So at every moment of a save, a kill included, the
folder holds a loadable posterior: the previous one until the index (or its removal) switches,
the new one from then on; no index ever points to missing or foreign shards (a shard whose
header differs from its index is refused on load). The other layout's file and the shards the new
index does not name (a previous save's, an interrupted save's) are removed once the new posterior
is in place; the temp files of a killed save (``_tmp-*``, never uploaded) are left.

Command line::

    hf-ivonpc posterior info PATH          # the summary of a posterior
    hf-ivonpc posterior convert SRC DST    # the authors' published GPT-2 layout -> ours
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

POSTERIOR_NAME = "posterior.safetensors"
POSTERIOR_INDEX_NAME = "posterior.safetensors.index.json"
FORMAT_KEY = "hf_ivonpc.posterior"
#: 2: sigma is no longer stored (recomputed from h); version 1 files (with sigma) still load
FORMAT_VERSION = 2
#: the largest shard ``save`` writes when no max_shard_size is given (as transformers' default)
DEFAULT_MAX_SHARD_SIZE = "5GB"
KINDS = ("std", "hess", "momentum")

#: layer types of the summary, the first whose pattern matches a (lower-cased) parameter name
LAYER_TYPES: tuple[tuple[str, str], ...] = (
    ("norm", r"(^|\.)(ln_\w*|\w*norm\w*)(\.|$)"),
    ("embeddings", r"(^|\.)(wte|wpe|shared|embed\w*|\w*_embeddings?)(\.|$)"),
    ("head", r"(^|\.)(lm_head|classifier|score|qa_outputs|pooler|cls|head)(\.|$)"),
    ("attention", r"attn|attention|(^|\.)(q_proj|k_proj|v_proj|o_proj|query|key|value)(\.|$)"),
    ("mlp", r"mlp|ffn|feed_forward|intermediate|densereludense|(^|\.)(fc1|fc2|c_fc|up_proj|"
            r"down_proj|gate_proj)(\.|$)|\.output\.dense"),
)


def layer_type(name: str) -> str:
    """The layer type of a parameter name (embeddings, attention, mlp, norm, head or other)."""
    low = name.lower()
    for kind, pattern in LAYER_TYPES:
        if re.search(pattern, low):
            return kind
    return "other"


def atomic_write(path: str, write: Callable[[str], None], *,
                 before_replace: Callable[[], None] | None = None) -> None:
    """``write(tmp)`` to a temp file in ``path``'s folder, then ``os.replace`` it onto ``path``.

    A crash while writing leaves the previous file intact. The temp name starts with ``_``, so a
    leftover is never uploaded by ``Trainer.push_to_hub`` (which skips ``_*``). ``before_replace``
    runs after the temp file is written and synced, just before the rename."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = _tmp_name(folder, os.path.basename(path))
    try:
        write(tmp)
        _fsync_file(tmp)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def _tmp_name(folder: str, name: str) -> str:
    return os.path.join(folder, f"_tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_file(file: str) -> None:
    with open(file, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):   # make renames durable where the platform allows it
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def parse_shard_size(size: int | str) -> int:
    """Bytes of a ``max_shard_size``: an int of bytes or a string like "5GB", "200MB", "1GiB"
    (KB/MB/GB/TB are powers of 10, KiB/MiB/GiB/TiB powers of 2, as in transformers)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?\s*", size, flags=re.IGNORECASE)
        if m is None:
            raise ValueError(f"max_shard_size={size!r} is invalid: accepted is an int of bytes or a "
                             "string like '5GB', '200MB' or '1GiB'")
        unit = (m.group(2) or "b").lower()
        scale = 1 if unit == "b" else (1024 if "i" in unit else 1000) ** ("kmgt".index(unit[0]) + 1)
        value = int(float(m.group(1)) * scale)
    else:
        raise ValueError(f"max_shard_size={size!r} is invalid: accepted is an int of bytes or a "
                         "string like '5GB'")
    if value < 1:
        raise ValueError(f"max_shard_size={size!r} is invalid: accepted range is >= 1 byte")
    return value


def _layout_names(file: str) -> tuple[str, str, str, Callable[[str], bool]]:
    """(folder, single file name, index name, is-a-shard-name) of a posterior written to ``file``."""
    folder, base = os.path.split(os.path.abspath(file))
    stem = base[: -len(".safetensors")] if base.endswith(".safetensors") else base
    pattern = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}(-[a-z])?\.safetensors")
    return folder, base, base + ".index.json", lambda name: pattern.fullmatch(name) is not None


def _shard_names(file: str, n: int, live: set[str]) -> list[str]:
    """Names of ``n`` shards of a posterior written to ``file``, none of them a file that the
    folder's live index names: ``<stem>-0000i-of-0000N.safetensors``, or, when the live index
    uses those (a save with as many shards as the previous one), ``<stem>-0000i-of-0000N-b``,
    ``-c``, ... (so a save alternates between two sets of names)."""
    base = os.path.basename(file)
    stem = base[: -len(".safetensors")] if base.endswith(".safetensors") else base
    for tag in ("", *(f"-{c}" for c in "bcdefghijklmnopqrstuvwxyz")):
        names = [f"{stem}-{i:05d}-of-{n:05d}{tag}.safetensors" for i in range(1, n + 1)]
        if live.isdisjoint(names):
            return names
    raise ValueError(f"{os.path.dirname(file)}: its index names every set of shard names")


def _live_shards(folder: str, index: str) -> set[str]:
    """The shard files named by the folder's index; none when there is no readable index (then
    no sharded posterior loads from the folder: nothing to keep)."""
    try:
        with open(os.path.join(folder, index), encoding="utf-8") as f:
            return {str(v) for v in json.load(f)["weight_map"].values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def find_posterior(folder: str | os.PathLike) -> str | None:
    """The posterior of a folder: its index file (sharded), else ``posterior.safetensors``, else
    None. The index wins when both exist: a save removes the other layout only once the new
    posterior is in place (a single-file save removes the index after its rename)."""
    for name in (POSTERIOR_INDEX_NAME, POSTERIOR_NAME):
        path = os.path.join(os.fspath(folder), name)
        if os.path.isfile(path):
            return path
    return None


def remove_posterior(folder: str | os.PathLike) -> None:
    """Remove a folder's posterior, either layout (the index first, so none points to nothing)."""
    folder = os.fspath(folder)
    _, single, index, is_shard = _layout_names(os.path.join(folder, POSTERIOR_NAME))
    if not os.path.isdir(folder):
        return
    names = [index] + sorted(n for n in os.listdir(folder) if is_shard(n)) + [single]
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))


def copy_posterior(src_folder: str | os.PathLike, dst_folder: str | os.PathLike) -> str:
    """Copy a folder's posterior (either layout) into another folder, as atomically as ``save``.
    Returns the written file (the single file or the index)."""
    import shutil
    src = find_posterior(src_folder)
    if src is None:
        raise FileNotFoundError(f"{src_folder} holds no {POSTERIOR_NAME} nor {POSTERIOR_INDEX_NAME}")
    dst = os.path.join(os.fspath(dst_folder), POSTERIOR_NAME)
    if os.path.basename(src) == POSTERIOR_NAME:
        return _commit_single(dst, lambda tmp: shutil.copyfile(src, tmp))
    with open(src, encoding="utf-8") as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    sdir = os.path.dirname(src)
    return _commit_sharded(dst, [(n, lambda tmp, n=n: shutil.copyfile(os.path.join(sdir, n), tmp))
                                 for n in shards], index)


def _write_text(file: str, text: str) -> None:
    with open(file, "w", encoding="utf-8") as f:
        f.write(text)


def _commit_single(file: str, write: Callable[[str], None]) -> str:
    """Write the single-file layout atomically; then remove the sharded layout's index (which
    wins over the single file: until it is gone the previous sharded posterior loads) and its
    shards."""
    folder, _, index, is_shard = _layout_names(file)
    atomic_write(file, write)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, index))
    for name in os.listdir(folder):
        if is_shard(name):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
    return os.path.abspath(file)


def _commit_sharded(file: str, shards: list[tuple[str, Callable[[str], None]]], index: dict) -> str:
    """Write every shard to a temp file, rename them into place under names that the folder's
    live index does not name (``_shard_names``), write the index (``index`` with its weight_map's
    shard names, the keys of ``shards``, mapped to those) atomically; then remove the single file
    and the shards of a previous save that the new index does not name. The previous posterior
    loads until the index is replaced, the new one from then on."""
    folder, single, index_name, is_shard = _layout_names(file)
    os.makedirs(folder, exist_ok=True)
    names = _shard_names(file, len(shards), _live_shards(folder, index_name))
    renamed = {given: name for (given, _), name in zip(shards, names)}
    index = {**index, "weight_map": {k: renamed[v] for k, v in index["weight_map"].items()}}
    tmps: list[tuple[str, str]] = []
    try:
        for (_, write), name in zip(shards, names):
            tmp = _tmp_name(folder, name)
            tmps.append((tmp, name))
            write(tmp)
            _fsync_file(tmp)
        while tmps:   # onto no file the live index names (a stale one of an interrupted save at most)
            tmp, name = tmps[0]
            os.replace(tmp, os.path.join(folder, name))
            tmps.pop(0)
        _fsync_dir(folder)
        atomic_write(os.path.join(folder, index_name),
                     lambda tmp: _write_text(tmp, json.dumps(index, indent=2) + "\n"))
    except BaseException:
        for tmp, _ in tmps:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        raise
    keep = set(names)
    for name in os.listdir(folder):
        if name == single or (is_shard(name) and name not in keep):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
    return os.path.join(folder, index_name)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (a collective over its mesh), or ``t`` itself."""
    from .optim._base import is_sharded
    return t.full_tensor() if is_sharded(t) else t


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Posterior:
    """A diagonal Gaussian posterior N(m, diag(sigma^2)) over a model's trainable parameters.

    The mean m is the model's own weights; this object holds sigma (``std``), IVON's Hessian
    estimate h (``hess``) and, when saved, its momentum (``momentum``), each a dict name -> tensor
    in the order of ``names``, and the hyperparameters of each parameter group (``groups``).

    Build one with ``from_pretrained`` (a folder, a file or a Hub repo id) or ``from_optimizer``
    (an IVON / IVONPC optimizer and its model); use it with ``sample`` (one draw, restored on
    exit), ``predictive`` (probabilities averaged over draws), ``summary`` / ``describe`` and
    ``load_into_optimizer`` (continue training). Everything is validated on construction: names
    unique and covered by the groups, shapes equal across std / hess / momentum, floating dtypes,
    sigma > 0 and equal to 1 / sqrt(ess (h + weight_decay)).
    """

    def __init__(self, std: Mapping[str, torch.Tensor], hess: Mapping[str, torch.Tensor],
                 groups: list[dict], *, momentum: Mapping[str, torch.Tensor] | None = None,
                 method: str = "ivon", step: int | None = None,
                 extra_metadata: Mapping[str, str] | None = None, source: str = "<memory>"):
        self.source = source
        self.groups = _check_groups(groups, source)
        self.names: list[str] = [n for g in self.groups for n in g["params"]]
        self.std = dict(std)
        self.hess = dict(hess)
        self.momentum = dict(momentum or {})
        if not isinstance(method, str) or not method:
            raise ValueError(f"{source}: method={method!r} is invalid: accepted is a non-empty string")
        if step is not None and not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
            raise ValueError(f"{source}: step={step!r} is invalid: accepted is an integer >= 0 or None")
        self.method = method
        self.step = step
        self.extra_metadata = dict(extra_metadata or {})
        self._check_tensors()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, model: torch.nn.Module | None = None,
                        *, subfolder: str | None = None, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | None = None) -> Posterior:
        """Load a posterior from a folder, a file (``posterior.safetensors`` or the sharded
        layout's ``posterior.safetensors.index.json``), or a Hub repository; either layout, and
        format version 1 (sigma stored) or 2 (sigma recomputed from h).

        With ``model`` the names, shapes and dtypes are also checked against it. Raises
        FileNotFoundError when there is no posterior file and ValueError when the file is not a
        valid posterior (corrupt or truncated, not safetensors, inconsistent, or mismatched)."""
        file = _resolve(path_or_repo_id, subfolder, revision, token, cache_dir)
        meta, tensors = (_read_index(file) if file.endswith(".index.json") else _read_safetensors(file))
        version = meta.get(FORMAT_KEY)
        if version is None:
            raise ValueError(f"{file} is a safetensors file but not a posterior: its header has no "
                             f"'{FORMAT_KEY}' entry (expected a file written by hf_ivonpc)")
        if not (isinstance(version, str) and version.isdigit() and 1 <= int(version)):
            raise ValueError(f"{file}: header entry {FORMAT_KEY}={version!r} is invalid: "
                             "expected a format version, an integer >= 1")
        if int(version) > FORMAT_VERSION:
            raise ValueError(f"{file} has posterior format version {version}, newer than this "
                             f"hf_ivonpc reads ({FORMAT_VERSION}): upgrade hf_ivonpc")
        groups = _json_entry(meta, "groups", file)
        step = _json_entry(meta, "step", file) if "step" in meta else None
        method = meta.get("method")
        if method is None:
            raise ValueError(f"{file}: the header has no 'method' entry")
        by_kind: dict[str, dict[str, torch.Tensor]] = {k: {} for k in KINDS}
        for key, t in tensors:
            kind, _, name = key.partition(".")
            if kind not in by_kind or not name:
                raise ValueError(f"{file} holds an unexpected tensor {key!r}: expected keys "
                                 f"'<kind>.<parameter name>' with kind one of {KINDS}")
            by_kind[kind][name] = t
        if not by_kind["std"] and int(version) >= 2:
            # sigma is not stored: recompute it exactly as the optimizer does
            from .optim.ivon import sigma_from_hess
            groups = _check_groups(groups, file)
            by_kind["std"] = {n: sigma_from_hess(by_kind["hess"][n], g)
                              for g in groups for n in g["params"] if n in by_kind["hess"]}
        known = {FORMAT_KEY, "format", "groups", "step", "method", "library_version", "total_size"}
        extra = {k: v for k, v in meta.items() if k not in known}
        extra["library_version"] = meta.get("library_version", "unknown")
        post = cls(by_kind["std"], by_kind["hess"], groups, momentum=by_kind["momentum"],
                   method=method, step=step, extra_metadata=extra, source=file)
        if model is not None:
            post.check(model)
        return post

    @classmethod
    def from_optimizer(cls, optimizer, model: torch.nn.Module, *, method: str | None = None,
                       step: int | None = None) -> Posterior:
        """The posterior of an IVON / IVONPC optimizer (or Accelerate's wrapper of one), named by
        ``model.named_parameters()``. Tensors are copied to the CPU."""
        opt = getattr(optimizer, "optimizer", optimizer)
        if not hasattr(opt, "posterior_std"):
            raise ValueError(f"optimizer is a {type(opt).__name__}, which keeps no posterior: "
                             "accepted are hf_ivonpc's IVON and IVONPC")
        from .optim.ivon import sigma_from_hess
        names = {id(p): n for n, p in model.named_parameters()}
        std, hess, momentum, groups = {}, {}, {}, []
        for gi, group in enumerate(opt.param_groups):
            gnames = []
            for p in group["params"]:
                n = names.get(id(p))
                if n is None:
                    raise ValueError(f"optimizer param_groups[{gi}] holds a parameter of shape "
                                     f"{tuple(p.shape)} that model.named_parameters() does not name: "
                                     "pass the model the optimizer was built on")
                gnames.append(n)
                # sharded (FSDP) state is gathered: every rank must call this
                h, m = (_full(opt.state[p][k]).detach() for k in ("hess", "momentum"))
                std[n] = sigma_from_hess(h, group).to("cpu")
                hess[n] = h.to("cpu", copy=True)
                momentum[n] = m.to("cpu", copy=True)
            hyper = {k: v for k, v in group.items() if k not in ("params", "step") and _is_scalar(v)}
            groups.append({"params": gnames, **hyper})
        if method is None:
            method = "ivon_pcm" if getattr(opt, "correction_enabled", False) else "ivon"
        if step is None:
            step = int(getattr(opt, "global_step", 0))
        return cls(std, hess, groups, momentum=momentum, method=method, step=step)

    # ------------------------------------------------------------------ saving
    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata (strings)."""
        from ._version import __version__
        meta = {k: str(v) for k, v in self.extra_metadata.items()}
        meta.update({"format": "pt", FORMAT_KEY: str(FORMAT_VERSION), "method": self.method,
                     "step": json.dumps(self.step), "library_version": __version__,
                     "groups": json.dumps(self.groups)})
        return meta

    def save(self, save_directory_or_file: str | os.PathLike, *,
             max_shard_size: int | str | None = None) -> str:
        """Write the posterior into a folder (or to a ``.safetensors`` path), atomically: h and the
        momentum (sigma follows from h and is not stored). Up to ``max_shard_size`` (an int of
        bytes or a string like "200MB"; default ``DEFAULT_MAX_SHARD_SIZE``, "5GB") one
        ``posterior.safetensors``; above it shards and ``posterior.safetensors.index.json``.
        Returns the single file's or the index's path."""
        path = os.fspath(save_directory_or_file)
        file = path if path.endswith(".safetensors") else os.path.join(path, POSTERIOR_NAME)
        limit = parse_shard_size(DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size)
        tensors = []
        for n in self.names:   # a parameter's h and momentum side by side
            tensors.append((f"hess.{n}", self.hess[n]))
            if self.momentum:
                tensors.append((f"momentum.{n}", self.momentum[n]))
        shards: list[list[tuple[str, torch.Tensor]]] = [[]]
        size = total = 0
        for key, t in tensors:
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append((key, t))
            size += nbytes
            total += nbytes
        meta = self.metadata()

        def writer(shard):
            def write(tmp):
                from safetensors.torch import save_file   # looked up when called (tests patch it)
                save_file({k: t.detach().to("cpu").contiguous() for k, t in shard}, tmp, metadata=meta)
            return write
        if len(shards) == 1:
            return _commit_single(file, writer(shards[0]))
        stem = os.path.basename(file)[: -len(".safetensors")]
        names = [f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        index = {"metadata": {**meta, "total_size": total},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k, _ in shard}}
        return _commit_sharded(file, [(name, writer(shard)) for name, shard in zip(names, shards)], index)

    def save_pretrained(self, save_directory: str | os.PathLike,
                        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> str:
        """``save`` under transformers' name: into ``save_directory``, sharded above
        ``max_shard_size``."""
        return self.save(save_directory, max_shard_size=max_shard_size)

    # ------------------------------------------------------------------ use
    def group_of(self, name: str) -> dict:
        """The hyperparameters (ess, weight_decay, ...) of the group holding ``name``."""
        for g in self.groups:
            if name in g["params"]:
                return g
        raise KeyError(f"{name!r} has no posterior: it is not one of the {len(self.names)} names")

    def check(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """Check names, shapes and dtypes against ``model``; return its parameters by name."""
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ValueError(
                f"posterior {self.source} does not fit the {type(model).__name__}: "
                f"{len(missing)} of its {len(self.names)} parameter names are not in "
                f"model.named_parameters(), e.g. {missing[:3]} (the model has e.g. {list(params)[:3]}). "
                "Names are those of the trained model's named_parameters(); for a LoRA adapter, "
                "the PeftModel's (build it with the same adapter name)")
        for n in self.names:
            p, s = params[n], self.std[n]
            if p.shape != s.shape:
                raise ValueError(f"posterior {self.source} does not fit the {type(model).__name__}: "
                                 f"parameter {n!r} has shape {tuple(p.shape)}, the posterior "
                                 f"{tuple(s.shape)}")
            if not p.dtype.is_floating_point:
                raise ValueError(f"parameter {n!r} has dtype {p.dtype}: a posterior needs a floating "
                                 "point parameter")
        return {n: params[n] for n in self.names}

    @contextlib.contextmanager
    def sample(self, model: torch.nn.Module, seed: int | None = None, *,
               generator: torch.Generator | None = None, sigma_scale: float = 1.0) -> Iterator[torch.nn.Module]:
        """Replace the model's weights by one draw theta = m + sigma_scale * sigma * eps for the block.

        The weights are restored exactly on exit, also on an exception. The draw is determined by
        ``seed`` (or ``generator``; neither: a random draw) and is made on the parameters' device
        (a seed's draw on a GPU differs from its draw on the CPU); sigma is copied there once and
        kept for the next draws. ``sigma_scale`` (>= 0) widens or narrows the posterior at test
        time; 0 leaves the weights at the mean exactly."""
        _check_sigma_scale(sigma_scale)
        params = self.check(model)
        if generator is not None and seed is not None:
            raise ValueError("give seed or generator, not both")
        if generator is None:
            if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
                raise ValueError(f"seed={seed!r} is invalid: accepted range is an integer >= 0")
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator(device=_device_of(params)).manual_seed(seed)
        std = self._std_on(generator.device)
        saved = [(p, p.detach().clone()) for p in params.values()]
        try:
            with torch.no_grad():
                for n, p in params.items():
                    s = std[n]
                    noise = torch.randn(s.shape, generator=generator, dtype=s.dtype, device=s.device)
                    noise.mul_(s)
                    if sigma_scale != 1.0:
                        noise.mul_(sigma_scale)
                    noise.add_(p.detach().to(s.device, s.dtype))
                    p.copy_(noise)
            yield model
        finally:
            with torch.no_grad():
                for p, value in saved:
                    p.copy_(value)

    def capped_at_prior(self) -> Posterior:
        """This posterior with sigma capped at the prior's 1 / sqrt(ess x weight_decay): h
        replaced by max(h, 0) in every group with weight decay (a new Posterior; this one is
        unchanged). IVON's update keeps h + weight_decay > 0, not h >= 0, so where the Hessian
        estimate went negative the saved sigma exceeds the prior's, up to 1 / sqrt(ess x
        weight_decay x 2^-7) and beyond; ``summary()`` reports the share. Groups without weight
        decay have a flat prior and keep h > 0 already. For predictions only: training state
        (``load_into_optimizer``) should come from the uncapped file. See docs/OPTIMIZERS.md for
        what the cap does to a predictive."""
        from .optim.ivon import sigma_from_hess
        hess, std = {}, {}
        for g in self.groups:
            for n in g["params"]:
                h = self.hess[n]
                if g["weight_decay"] > 0:
                    h = h.clamp_min(0)
                hess[n] = h
                std[n] = self.std[n] if h is self.hess[n] else sigma_from_hess(h, g).to(self.std[n].dtype)
        return Posterior(std, hess, [dict(g, params=list(g["params"])) for g in self.groups],
                         momentum=self.momentum, method=self.method, step=self.step,
                         extra_metadata={**self.extra_metadata, "sigma_cap": "prior"},
                         source=f"{self.source} (capped at the prior)")

    def _std_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """sigma on ``device`` (copied once per device, then kept)."""
        device = torch.device(device)
        cached = getattr(self, "_std_cache", None)
        if cached is None or cached[0] != device:
            cached = (device, {n: t.to(device) for n, t in self.std.items()})
            self._std_cache = cached
        return cached[1]

    @torch.no_grad()
    def predictive(self, model: torch.nn.Module, inputs, n_samples: int, seed: int = 0, *,
                   select=None, return_samples: bool = False, sigma_scale: float = 1.0):
        """Output probabilities averaged over ``n_samples`` draws (the posterior predictive).

        ``inputs`` is a dict of model inputs (a ``labels`` entry is dropped) or one tensor. The
        model runs in eval mode (no dropout) and gets its mode back. Probabilities are a softmax
        over the last axis of the logits, in fp32; the same seed gives the same result.

        ``select``: token ids (a sequence or 1-D tensor, e.g. the answer letters " A".." D"); the
        probabilities are then a softmax over those tokens' logits at the last position only,
        shape [batch, len(select)] (see :func:`selected_logits`: ``logits_to_keep=1`` where the
        model accepts it, so memory does not grow with the vocabulary; inputs left-padded). Or a
        function ``select(model, inputs) -> scores [batch, C]`` run at every draw, whose softmax
        over the last axis is taken (e.g. the summed log-probabilities of C answer texts).
        ``return_samples``: also return each draw's probabilities, [n_samples, ...], as
        ``(mean, samples)``. ``sigma_scale``: sigma multiplied by it in every draw (0: every draw is
        the mean, and the result equals the mean's prediction bit for bit)."""
        if not (isinstance(n_samples, int) and not isinstance(n_samples, bool) and n_samples >= 1):
            raise ValueError(f"n_samples={n_samples!r} is invalid: accepted range is an integer >= 1")
        if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
            raise ValueError(f"seed={seed!r} is invalid: accepted range is an integer >= 0")
        _check_sigma_scale(sigma_scale)
        token_ids = None if select is None or callable(select) else _token_ids(select)
        self.check(model)
        feed = {k: v for k, v in inputs.items() if k != "labels"} if isinstance(inputs, Mapping) else inputs
        generator = torch.Generator(device=_device_of(self.check(model))).manual_seed(seed)
        was_training = model.training
        model.eval()
        total, draws = None, []
        try:
            for _ in range(n_samples):
                with self.sample(model, generator=generator, sigma_scale=sigma_scale):
                    if token_ids is not None:
                        logits = selected_logits(model, feed, token_ids)
                    elif select is not None:
                        logits = select(model, feed)
                    else:
                        logits = _logits(model(**feed) if isinstance(feed, Mapping) else model(feed))
                probs = logits.float().softmax(-1)
                if return_samples:
                    draws.append(probs.clone())
                total = probs if total is None else total.add_(probs)
        finally:
            model.train(was_training)
        mean = total.div_(n_samples)
        return (mean, torch.stack(draws)) if return_samples else mean

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, inputs, n_samples: int, seed: int = 0, *,
                 answer: Callable[[list[int]], Any] | None = None, sigma_scale: float = 1.0,
                 **generate_kwargs) -> dict:
        """Answer with ``n_samples`` posterior draws: ``model.generate(**inputs, **generate_kwargs)``
        once per draw (greedy unless the keywords say otherwise), and a vote.

        ``inputs``: the tokenized prompts (``input_ids``, ``attention_mask``; left-padded for a
        decoder-only model). ``answer(new_token_ids) -> hashable`` maps one generated continuation
        (the tokens after the prompt) to the answer that is voted on, e.g. the final number of a
        maths solution (default: the continuation's tokens themselves). The draws are seeded by
        ``seed`` (``sigma_scale`` as in :meth:`sample`; 0 makes every draw the mean).

        Returns ``continuations`` [n_samples][batch] (token id lists, without the padding that
        follows a row's end in its batch: it differs from draw to draw), ``answers`` [batch][n_samples],
        ``majority`` [batch] (the most frequent answer; a tie goes to the one a draw gave first)
        and ``agreement`` [batch] (the share of draws that gave it: a confidence to abstain by,
        see :func:`hf_ivonpc.uncertainty.vote`)."""
        from .uncertainty import vote

        if not (isinstance(n_samples, int) and not isinstance(n_samples, bool) and n_samples >= 1):
            raise ValueError(f"n_samples={n_samples!r} is invalid: accepted range is an integer >= 1")
        if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
            raise ValueError(f"seed={seed!r} is invalid: accepted range is an integer >= 0")
        _check_sigma_scale(sigma_scale)
        feed = dict(inputs) if isinstance(inputs, Mapping) else {"input_ids": inputs}
        feed.pop("labels", None)
        width = feed["input_ids"].shape[1]
        generator = torch.Generator(device=_device_of(self.check(model))).manual_seed(seed)
        was_training = model.training
        model.eval()
        config = generate_kwargs.get("generation_config", getattr(model, "generation_config", None))
        pad = generate_kwargs.get("pad_token_id", getattr(config, "pad_token_id", None))

        def strip(ids: list[int]) -> list[int]:   # the batch's padding after a row's end is no part of it
            while pad is not None and ids and ids[-1] == pad:
                ids.pop()
            return ids

        continuations = []
        try:
            for _ in range(n_samples):
                with self.sample(model, generator=generator, sigma_scale=sigma_scale):
                    out = model.generate(**feed, **generate_kwargs)
                continuations.append([strip(row[width:].tolist()) for row in out])
        finally:
            model.train(was_training)
        to_answer = answer if answer is not None else tuple
        answers = [[to_answer(draw[i]) for draw in continuations] for i in range(len(continuations[0]))]
        majority, agreement = vote(answers)
        return {"continuations": continuations, "answers": answers, "majority": majority, "agreement": agreement}

    def load_into_optimizer(self, optimizer, model: torch.nn.Module) -> None:
        """Continue training from this posterior: copy h (and the momentum, when saved) into an
        IVON / IVONPC optimizer built on ``model`` (the mean is the model's weights). The
        optimizer keeps its own hyperparameters (ess, weight decay, ...)."""
        opt = getattr(optimizer, "optimizer", optimizer)
        params = self.check(model)
        covered = {id(p) for g in opt.param_groups for p in g["params"]}
        if not hasattr(opt, "posterior_std") or covered != {id(p) for p in params.values()}:
            raise ValueError("optimizer must be an IVON or IVONPC over exactly the posterior's "
                             f"{len(params)} parameters")
        from .optim._base import local, local_part
        with torch.no_grad():
            for n, p in params.items():
                local(opt.state[p]["hess"]).copy_(local_part(p, self.hess[n]))
                if self.momentum:
                    local(opt.state[p]["momentum"]).copy_(local_part(p, self.momentum[n]))

    # ------------------------------------------------------------------ summary
    def summary(self) -> list[dict]:
        """Per layer type (see ``LAYER_TYPES``): tensors, elements, sigma's mean, min and max, how
        far h moved from its initial value h0 (median and 99th percentile of |h - h0| / h0, from at
        most 65,536 evenly spaced elements per tensor), and the share of entries whose sigma
        exceeds the prior's 1 / sqrt(ess x weight_decay) (``above_prior_share``): those with
        h < 0, which IVON's update allows as long as h + weight_decay > 0 (where weight_decay is
        0 the prior is flat and nothing exceeds it). A posterior whose h has not moved is its
        initialisation: sigma then says nothing about the data."""
        h0 = {n: g.get("hess_init") for g in self.groups for n in g["params"]}
        decay = {n: g.get("weight_decay", 0.0) for g in self.groups for n in g["params"]}
        acc: dict[str, dict] = {}
        for n in self.names:
            s = self.std[n].double()
            row = acc.setdefault(layer_type(n), {"tensors": 0, "elements": 0, "sum": 0.0, "above": 0,
                                                 "min": math.inf, "max": -math.inf, "moved": []})
            row["tensors"] += 1
            row["elements"] += s.numel()
            if decay.get(n):
                row["above"] += int((self.hess[n] < 0).sum().item())
            row["sum"] += s.sum().item()
            row["min"] = min(row["min"], s.min().item())
            row["max"] = max(row["max"], s.max().item())
            if h0.get(n):
                h = self.hess[n].reshape(-1)
                h = h[:: max(1, h.numel() // 65536)]
                row["moved"].append((h.double() - h0[n]).abs() / h0[n])
        order = [k for k, _ in LAYER_TYPES] + ["other"]
        out = []
        for k in order:
            if k not in acc:
                continue
            a = acc[k]
            r = {"layer_type": k, "tensors": a["tensors"], "elements": a["elements"],
                 "std_mean": a["sum"] / a["elements"], "std_min": a["min"], "std_max": a["max"],
                 "above_prior_share": a["above"] / a["elements"]}
            if a["moved"]:
                q = torch.quantile(torch.cat(a["moved"]), torch.tensor([0.5, 0.99], dtype=torch.float64))
                r["h_moved_median"], r["h_moved_p99"] = q.tolist()
            out.append(r)
        return out

    def format_summary(self) -> str:
        """``summary()`` as a Markdown table."""
        lines = ["| layer type | tensors | elements | sigma mean | sigma min | sigma max | "
                 "sigma > prior's | \\|h - h0\\| / h0 median, p99 |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.summary():
            moved = (f"{r['h_moved_median']:.3g}, {r['h_moved_p99']:.3g}" if "h_moved_median" in r else "")
            lines.append(f"| {r['layer_type']} | {r['tensors']} | {r['elements']:,} | "
                         f"{r['std_mean']:.3e} | {r['std_min']:.3e} | {r['std_max']:.3e} | "
                         f"{100 * r['above_prior_share']:.2f}% | {moved} |")
        return "\n".join(lines)

    def describe(self) -> str:
        """A readable description: method, step, groups' hyperparameters and the summary."""
        elements = sum(self.std[n].numel() for n in self.names)
        lines = [f"posterior: {self.source}",
                 f"method: {self.method}   step: {self.step if self.step is not None else 'unknown'}   "
                 f"written by hf_ivonpc {self.extra_metadata.get('library_version', 'unknown')}",
                 f"parameters: {len(self.names)} tensors, {elements:,} elements; "
                 f"momentum {'saved' if self.momentum else 'not saved'}"]
        for k, v in self.extra_metadata.items():
            if k != "library_version":
                lines.append(f"{k}: {v}")
        for gi, g in enumerate(self.groups):
            hyper = ", ".join(f"{k}={v}" for k, v in g.items() if k != "params")
            lines.append(f"group {gi} ({len(g['params'])} tensors): {hyper}")
        return "\n".join(lines) + "\n\n" + self.format_summary()

    # ------------------------------------------------------------------ validation
    def _check_tensors(self) -> None:
        src = self.source
        known = set(self.names)
        for kind, table in (("hess", self.hess), ("std", self.std), ("momentum", self.momentum)):
            if kind == "momentum" and not table:
                continue
            missing = [n for n in self.names if n not in table]
            if missing:
                raise ValueError(f"{src}: {len(missing)} parameter(s) have no '{kind}' tensor, e.g. "
                                 f"{missing[:3]} (the header's groups name {len(self.names)})")
            extra = [n for n in table if n not in known]
            if extra:
                raise ValueError(f"{src}: '{kind}' tensors {extra[:3]} belong to no parameter group "
                                 "of the header")
            for n in self.names:
                t = table[n]
                if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
                    raise ValueError(f"{src}: '{kind}.{n}' has dtype {getattr(t, 'dtype', type(t))}: "
                                     "expected a floating point tensor")
                if t.shape != self.hess[n].shape:
                    raise ValueError(f"{src}: '{kind}.{n}' has shape {tuple(t.shape)}, 'hess.{n}' "
                                     f"{tuple(self.hess[n].shape)}: expected equal shapes")
        for g in self.groups:
            for n in g["params"]:
                # computed in fp32 at least (fp64 for fp64 tensors), whose rounding (~1e-7) is far
                # below rtol; h + wd is a new tensor, turned into the expected std in place
                s, h = self.std[n], self.hess[n]
                rtol = max(1e-5, 8 * torch.finfo(s.dtype).eps)
                s = s.to(torch.promote_types(s.dtype, torch.float32))
                precision = h.to(torch.promote_types(h.dtype, torch.float32)).add(g["weight_decay"])
                if not (torch.isfinite(precision).all() and (precision > 0).all()):
                    raise ValueError(f"{src}: 'hess.{n}' holds non-finite or non-positive values "
                                     "(h + weight_decay <= 0): the training run diverged (NaN "
                                     "losses); lower learning_rate or set ivon_clip_radius")
                expected = precision.mul_(g["ess"]).rsqrt_().to(s.dtype)   # > 0
                # allclose(s, expected, rtol, atol=0) for finite tensors, in two passes
                if not (torch.isfinite(s).all() and (s > 0).all()
                        and (s.sub(expected).abs_() <= expected.mul_(rtol)).all()):
                    raise ValueError(f"{src}: 'std.{n}' is not 1 / sqrt(ess (h + weight_decay)) "
                                     f"with ess={g['ess']}, weight_decay={g['weight_decay']} and its "
                                     "'hess' tensor (or not finite and > 0): the file is inconsistent")


def _check_groups(groups: Any, source: str) -> list[dict]:
    if not isinstance(groups, list) or not groups:
        raise ValueError(f"{source}: 'groups' must be a non-empty list of parameter groups, got "
                         f"{type(groups).__name__}")
    seen: set[str] = set()
    out = []
    for gi, g in enumerate(groups):
        if not isinstance(g, dict) or not isinstance(g.get("params"), list):
            raise ValueError(f"{source}: groups[{gi}] must be a dict with a 'params' list of names")
        for n in g["params"]:
            if not isinstance(n, str) or not n:
                raise ValueError(f"{source}: groups[{gi}]['params'] holds {n!r}: expected names")
            if n in seen:
                raise ValueError(f"{source}: parameter {n!r} is in two groups")
            seen.add(n)
        if not (_number(g.get("ess")) and g["ess"] > 0):
            raise ValueError(f"{source}: groups[{gi}] ess={g.get('ess')!r} is invalid: accepted "
                             "range is a finite number > 0")
        if not (_number(g.get("weight_decay")) and g["weight_decay"] >= 0):
            raise ValueError(f"{source}: groups[{gi}] weight_decay={g.get('weight_decay')!r} is "
                             "invalid: accepted range is a finite number >= 0")
        bad = [k for k, v in g.items() if k != "params" and not _is_scalar(v)]
        if bad:
            raise ValueError(f"{source}: groups[{gi}] entries {bad} are not numbers or strings")
        out.append({**g, "params": list(g["params"])})
    return out


def _resolve(path_or_repo_id, subfolder, revision, token, cache_dir) -> str:
    p = os.fspath(path_or_repo_id)
    if os.path.isfile(p):
        return p
    if os.path.isdir(p):
        file = find_posterior(os.path.join(p, subfolder or ""))
        if file is None:
            raise FileNotFoundError(
                f"{p} holds no {os.path.join(subfolder or '', POSTERIOR_NAME)} (nor a sharded "
                f"{POSTERIOR_INDEX_NAME}): PCTrainer writes one "
                "for pc_method 'ivon' and 'ivon_pcm' only (alpha_svrg and plain optimizers learn no "
                "posterior); the authors' GPT-2 layout converts with "
                "`hf-ivonpc posterior convert SRC DST`")
        return file
    try:
        return hub_posterior(p, subfolder=subfolder, revision=revision, token=token, cache_dir=cache_dir)
    except Exception as e:  # not a repo id, offline, missing file: say which
        raise FileNotFoundError(f"path_or_repo_id={p!r} is neither a local file or folder nor a Hub "
                                f"repository holding {POSTERIOR_NAME} or {POSTERIOR_INDEX_NAME} "
                                f"({type(e).__name__}: {e})") from e


def hub_posterior(repo_id: str, *, subfolder: str | None = None, revision: str | None = None,
                  token: str | bool | None = None, cache_dir: str | None = None) -> str:
    """The local path of a Hub repository's posterior, through the Hub cache: its
    ``posterior.safetensors``, else its ``posterior.safetensors.index.json`` (whose shards are
    downloaded beside it). Raises huggingface_hub's EntryNotFoundError when the repository has
    neither (LocalEntryNotFoundError offline, when neither is cached)."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    kw = dict(subfolder=subfolder, revision=revision, token=token, cache_dir=cache_dir)
    try:
        return huggingface_hub.hf_hub_download(repo_id, POSTERIOR_NAME, **kw)
    except LocalEntryNotFoundError:   # offline, or not reachable: a cached index still serves
        cached = huggingface_hub.try_to_load_from_cache(
            repo_id, "/".join(x for x in (subfolder, POSTERIOR_INDEX_NAME) if x),
            cache_dir=cache_dir, revision=revision)
        if not isinstance(cached, str):
            raise
        index = cached
    except EntryNotFoundError:        # the repository has no single file: a sharded posterior?
        index = huggingface_hub.hf_hub_download(repo_id, POSTERIOR_INDEX_NAME, **kw)
    try:
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except Exception as e:
        raise ValueError(f"{index} is not a valid posterior index ({type(e).__name__}: {e})") from e
    for shard in shards:
        huggingface_hub.hf_hub_download(repo_id, shard, **kw)
    return index


def _read_safetensors(file: str) -> tuple[dict[str, str], list[tuple[str, torch.Tensor]]]:
    """(header metadata, [(key, tensor)]), read tensor by tensor."""
    from safetensors import safe_open
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = [(k, f.get_tensor(k)) for k in f.keys()]
    except Exception as e:  # SafetensorError (bad header, truncated data) or OSError
        raise ValueError(f"{file} is not a valid safetensors file ({type(e).__name__}: {e}). "
                         "A posterior is read with safetensors only; nothing is unpickled") from e
    return meta, tensors


def _read_index(file: str) -> tuple[dict[str, str], list[tuple[str, torch.Tensor]]]:
    """(the index's metadata, [(key, tensor)]) of a sharded posterior: each shard is read tensor
    by tensor, and must hold exactly the tensors the index names for it, with the same header."""
    try:
        with open(file, encoding="utf-8") as f:
            index = json.load(f)
        meta, weight_map = dict(index["metadata"]), index["weight_map"]
        if not (isinstance(weight_map, dict) and weight_map
                and all(isinstance(v, str) and os.path.basename(v) == v for v in weight_map.values())):
            raise ValueError("weight_map must map tensor names to shard file names in its folder")
    except Exception as e:
        raise ValueError(f"{file} is not a valid posterior index: expected JSON {{'metadata': {{...}}, "
                         f"'weight_map': {{tensor: shard file}}}} ({type(e).__name__}: {e})") from e
    meta.pop("total_size", None)
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(key)
    folder = os.path.dirname(os.path.abspath(file))
    tensors: list[tuple[str, torch.Tensor]] = []
    for shard, keys in by_shard.items():
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise ValueError(f"{file} names shard {shard}, which is missing from {folder}")
        shard_meta, shard_tensors = _read_safetensors(path)
        if shard_meta != meta:
            raise ValueError(f"{path}'s header differs from its index {file}: the shard belongs to "
                             "another save")
        if sorted(k for k, _ in shard_tensors) != sorted(keys):
            raise ValueError(f"{path} does not hold the tensors its index {file} names for it")
        tensors.extend(shard_tensors)
    return meta, tensors


def _json_entry(meta: dict[str, str], key: str, file: str) -> Any:
    if key not in meta:
        raise ValueError(f"{file}: the header has no '{key}' entry")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: the header entry '{key}' is not valid JSON ({e})") from e


def _device_of(params: dict[str, torch.Tensor]) -> torch.device:
    """The device of the parameters a draw is made for (the first one's)."""
    return next(iter(params.values())).device


def _check_sigma_scale(sigma_scale) -> None:
    if not (isinstance(sigma_scale, (int, float)) and not isinstance(sigma_scale, bool)
            and math.isfinite(sigma_scale) and sigma_scale >= 0):
        raise ValueError(f"sigma_scale={sigma_scale!r} is invalid: accepted range is a finite number >= 0")


def _token_ids(select, name: str = "select") -> torch.Tensor:
    ids = torch.as_tensor(select)
    if ids.ndim != 1 or ids.numel() < 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool \
            or (ids < 0).any():
        raise ValueError(f"{name}={select!r} is invalid: accepted are token ids (a non-empty sequence or 1-D "
                         "tensor of integers >= 0)")
    return ids.long()


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """The model's forward (through DDP's ``module`` and peft's base model) takes ``logits_to_keep``."""
    import inspect

    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def selected_logits(model: torch.nn.Module, inputs, token_ids) -> torch.Tensor:
    """Logits of ``token_ids`` at the last position, [batch, len(token_ids)] (a multiple-choice
    answer's letters: their softmax is the answer distribution). The model computes the last
    position only (``logits_to_keep=1``) where its forward accepts it. The last position must be
    each row's last token: inputs with an ``attention_mask`` must be left-padded. Gradients flow
    (a training loss may use it)."""
    ids = _token_ids(token_ids, "token_ids")
    feed = dict(inputs) if isinstance(inputs, Mapping) else {"input_ids": inputs}
    feed.pop("labels", None)
    mask = feed.get("attention_mask")
    if mask is not None and mask.ndim == 2 and not bool(mask[:, -1].all()):
        raise ValueError("inputs has an attention_mask ending in padding: accepted are left-padded inputs "
                         "(tokenizer.padding_side = 'left'), whose last position is every row's last token")
    if _accepts_logits_to_keep(model):
        feed["logits_to_keep"] = 1
    logits = _logits(model(**feed))[:, -1]
    if int(ids.max()) >= logits.shape[-1]:
        raise ValueError(f"token_ids holds {int(ids.max())}: accepted range is 0 to {logits.shape[-1] - 1} "
                         "(the model's vocabulary)")
    return logits[:, ids.to(logits.device)]


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned a {type(out).__name__}: expected logits (a tensor, an "
                    "output with 'logits', or a tuple whose first element is the logits)")
