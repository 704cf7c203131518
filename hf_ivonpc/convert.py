"""Convert the authors' published GPT-2 posterior into our layout.

The authors' GPT-2 (``team-approx-bayes/gpt2-small`` on the Hub) ships ``pytorch_model.bin``, a
GPT-2 state dict, and ``optimizer_param_groups.pt``: ivon-opt 0.1.3's ``param_groups`` without
their ``params`` entry. In ivon-opt each group is a dict with the hyperparameters ``lr``,
``mc_samples``, ``beta1``, ``beta2``, ``weight_decay``, ``hess_init``, ``ess``, ``clip_radius``,
the group's element count ``numel``, and two flat vectors ``momentum`` and ``hess`` holding the
group's parameters one after the other, in the group's order. The authors' nanoGPT script makes two
groups from ``named_parameters()``: the tensors with >= 2 dimensions (decayed), then the others
(weight decay 0). A single group in ``named_parameters()`` order is accepted too; whichever split
matches the vectors' lengths is used, and no split matching is an error.

Both files are read with ``torch.load(..., weights_only=True)`` (tensors, numbers, strings, lists
and dicts only: no code from them runs). Two weight layouts are recognised from the shape of
``attn.c_attn.weight``: Hugging Face's (``Conv1D``, [in, out]) and nanoGPT's (``nn.Linear``,
[out, in]); nanoGPT's four projection matrices and their segments of the flat vectors are
transposed into Hugging Face's layout. The flat vectors are assumed to follow the layout of the
weights stored next to them (the model the optimizer stepped). Biases absent from a nanoGPT
checkpoint trained with ``bias=False`` are written as zeros and carry no posterior.

Output: ``GPT2LMHeadModel.save_pretrained`` (``model.safetensors`` + ``config.json``) and
``posterior.safetensors`` with h and the momentum (sigma = 1 / sqrt(ess (h + weight_decay)) is
recomputed on load).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid

import torch

from .posterior import Posterior

AUTHORS_WEIGHTS = "pytorch_model.bin"
AUTHORS_GROUPS = "optimizer_param_groups.pt"
#: nanoGPT's nn.Linear weights, stored [out, in]; Hugging Face's Conv1D stores them [in, out]
LINEAR_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HYPER = ("lr", "ess", "weight_decay", "hess_init", "beta1", "beta2", "clip_radius", "mc_samples")


def convert_authors_gpt2(src: str | os.PathLike, dst: str | os.PathLike, *,
                         n_head: int | None = None) -> Posterior:
    """Convert ``src`` (a folder or Hub repo id with the authors' two files, and optionally a
    ``config.json``) into a new folder ``dst`` holding our layout; return the posterior.

    ``n_head`` is needed only without ``config.json`` (default ``n_embd // 64``, as for every
    GPT-2 size). Every shape is checked before anything is written; ``dst`` must not exist or be
    empty, and appears complete or not at all."""
    dst = os.path.abspath(os.fspath(dst))
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ValueError(f"dst={dst!r} is invalid: accepted is a new or empty folder")
    files = _fetch(os.fspath(src))
    state = _load_tensors_only(files["weights"])
    raw_groups = _load_tensors_only(files["groups"])

    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{files['weights']} is not a state dict (a dict of name -> tensor)")
    state = {re.sub(r"^(_orig_mod\.|module\.)+", "", k): v for k, v in state.items()}
    for key in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight"):
        if key not in state:
            raise ValueError(f"{files['weights']} has no {key!r}: expected a GPT-2 state dict")
    n_embd = state["transformer.wte.weight"].shape[1]
    c_attn = tuple(state["transformer.h.0.attn.c_attn.weight"].shape)
    if c_attn not in ((n_embd, 3 * n_embd), (3 * n_embd, n_embd)):
        raise ValueError(f"{files['weights']}: attn.c_attn.weight has shape {c_attn}, expected "
                         f"{(n_embd, 3 * n_embd)} (Hugging Face) or {(3 * n_embd, n_embd)} (nanoGPT)")
    nanogpt = c_attn == (3 * n_embd, n_embd)

    from transformers import GPT2LMHeadModel
    config = _config(files.get("config"), state, n_embd, nanogpt, n_head)
    model = GPT2LMHeadModel(config)
    params = dict(model.named_parameters())
    known = set(model.state_dict())
    trained = [n for n in params if n in state]           # named_parameters() order
    absent = [n for n in params if n not in state]
    if absent and not (nanogpt and all(n.endswith(".bias") for n in absent)):
        raise ValueError(f"{files['weights']} lacks parameters of a GPT-2 with this config: {absent[:4]}")
    unexpected = [k for k in state if k not in known and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if unexpected:
        raise ValueError(f"{files['weights']} holds tensors a GPT-2 does not have: {unexpected[:4]}")
    if "lm_head.weight" in state and not torch.equal(state["lm_head.weight"], state["transformer.wte.weight"]):
        raise ValueError(f"{files['weights']}: lm_head.weight differs from transformer.wte.weight; "
                         "only GPT-2 with tied embeddings is supported")

    def to_hf(name: str, t: torch.Tensor) -> torch.Tensor:
        return t.t() if nanogpt and name.endswith(LINEAR_WEIGHTS) else t

    weights = {}
    for n in trained:
        t = to_hf(n, state[n])
        if t.shape != params[n].shape:
            raise ValueError(f"{files['weights']}: {n} has shape {tuple(state[n].shape)}, the config "
                             f"expects {tuple(params[n].shape)}")
        weights[n] = t

    groups = _check_groups(raw_groups, files["groups"])
    parts = _split(trained, {n: state[n] for n in trained}, groups, files["groups"])
    std, hess, momentum, meta_groups = {}, {}, {}, []
    for gi, (g, names) in enumerate(zip(groups, parts)):
        ess, wd = float(g["ess"]), float(g["weight_decay"])
        off = 0
        for n in names:
            k = state[n].numel()
            dtype = torch.float64 if g["hess"].dtype == torch.float64 else torch.float32
            h = to_hf(n, g["hess"][off:off + k].reshape(state[n].shape)).to(dtype).contiguous().clone()
            m = to_hf(n, g["momentum"][off:off + k].reshape(state[n].shape)).to(dtype).contiguous().clone()
            off += k
            if not (torch.isfinite(h).all() and (h + wd > 0).all()):
                raise ValueError(f"{files['groups']}: group {gi}'s hess for {n} is not finite with "
                                 f"h + weight_decay > 0: no posterior std exists")
            hess[n], momentum[n] = h, m
            std[n] = h.add(wd).mul(ess).rsqrt()
        meta_groups.append({"params": names, **{k: g[k] for k in _HYPER if k in g}})
    post = Posterior(std, hess, meta_groups, momentum=momentum, method="ivon", step=None,
                     extra_metadata={"converted_from": os.fspath(src),
                                     "source_format": "ivon-opt 0.1.3 param_groups" +
                                                      (", nanoGPT weights" if nanogpt else "")},
                     source=os.fspath(src))

    with torch.no_grad():
        for n, p in params.items():
            if n in weights:
                p.copy_(weights[n])
            else:                    # a bias nanoGPT was trained without
                p.zero_()
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"_tmp-convert-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp)
        written = post.save(tmp)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    post.source = os.path.join(dst, os.path.basename(written))
    return post


def _fetch(src: str) -> dict[str, str]:
    if os.path.isdir(src):
        files = {"weights": os.path.join(src, AUTHORS_WEIGHTS), "groups": os.path.join(src, AUTHORS_GROUPS)}
        missing = [os.path.basename(f) for f in files.values() if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"src={src!r} lacks {missing}: expected the authors' layout "
                                    f"({AUTHORS_WEIGHTS} and {AUTHORS_GROUPS})")
        if os.path.isfile(os.path.join(src, "config.json")):
            files["config"] = os.path.join(src, "config.json")
        return files
    from huggingface_hub import hf_hub_download
    files = {}
    for key, name in (("weights", AUTHORS_WEIGHTS), ("groups", AUTHORS_GROUPS), ("config", "config.json")):
        try:
            files[key] = hf_hub_download(src, name)
        except Exception as e:
            if key == "config":
                continue
            raise FileNotFoundError(f"src={src!r} is neither a local folder nor a Hub repository "
                                    f"holding {name} ({type(e).__name__}: {e})") from e
    return files


def _load_tensors_only(file: str):
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything but plain data; broken zip or pickle
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{file} was refused: it is read with torch.load(weights_only=True), which "
                         "accepts only tensors, numbers, strings, lists and dicts, and no code from "
                         f"it ran ({type(e).__name__}: {first})") from e


def _config(config_file, state, n_embd, nanogpt, n_head):
    from transformers import GPT2Config
    if config_file is not None:
        return GPT2Config.from_json_file(config_file)
    layers = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.h\.(\d+)\.", k))}
    if layers != set(range(len(layers))):
        raise ValueError(f"the state dict's blocks are {sorted(layers)}: expected 0 .. n_layer - 1")
    if n_head is None:
        n_head = max(1, n_embd // 64)
    if not (isinstance(n_head, int) and n_head >= 1 and n_embd % n_head == 0):
        raise ValueError(f"n_head={n_head!r} is invalid: accepted is a divisor of n_embd={n_embd}")
    fc = state["transformer.h.0.mlp.c_fc.weight"].shape
    n_inner = fc[0] if nanogpt else fc[1]
    kw = dict(vocab_size=state["transformer.wte.weight"].shape[0],
              n_positions=state["transformer.wpe.weight"].shape[0], n_embd=n_embd,
              n_layer=len(layers), n_head=n_head, n_inner=None if n_inner == 4 * n_embd else n_inner)
    if nanogpt:
        kw["activation_function"] = "gelu"   # nanoGPT's nn.GELU() is the exact GELU
    return GPT2Config(**kw)


def _check_groups(raw, file: str) -> list[dict]:
    if isinstance(raw, dict) and "param_groups" in raw:   # a whole optimizer.state_dict()
        raw = raw["param_groups"]
    if not isinstance(raw, (list, tuple)) or not raw or not all(isinstance(g, dict) for g in raw):
        raise ValueError(f"{file} is not a list of parameter groups (dicts)")
    for gi, g in enumerate(raw):
        for key in ("hess", "momentum"):
            t = g.get(key)
            if not isinstance(t, torch.Tensor) or t.ndim != 1 or not t.dtype.is_floating_point:
                raise ValueError(f"{file}: group {gi} has no flat floating '{key}' vector "
                                 f"(got {type(t).__name__}{'' if t is None else getattr(t, 'shape', '')})")
        if g["momentum"].numel() != g["hess"].numel():
            raise ValueError(f"{file}: group {gi}'s momentum has {g['momentum'].numel()} elements, its "
                             f"hess {g['hess'].numel()}: expected equal lengths")
        if "numel" in g and g["numel"] != g["hess"].numel():
            raise ValueError(f"{file}: group {gi} says numel={g['numel']} but its hess has "
                             f"{g['hess'].numel()} elements")
        for key, low in (("ess", "> 0"), ("weight_decay", ">= 0")):
            v = g.get(key)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v > 0 if key == "ess" else v >= 0)
            if not ok:
                raise ValueError(f"{file}: group {gi} {key}={v!r} is invalid: accepted range is a number {low}")
    return list(raw)


def _split(names: list[str], tensors: dict[str, torch.Tensor], groups: list[dict], file: str) -> list[list[str]]:
    """The parameters of each group, in order, from the lengths of the flat vectors."""
    sizes = [g["hess"].numel() for g in groups]
    total = sum(tensors[n].numel() for n in names)
    decay = [n for n in names if tensors[n].ndim >= 2]
    other = [n for n in names if tensors[n].ndim < 2]
    candidates = {1: [names], 2: [decay, other]}
    parts = candidates.get(len(groups))
    if parts is not None and [sum(tensors[n].numel() for n in p) for p in parts] == sizes:
        for gi, (g, p) in enumerate(zip(groups, parts)):
            if isinstance(g.get("params"), (list, tuple)) and len(g["params"]) != len(p):
                raise ValueError(f"{file}: group {gi} lists {len(g['params'])} parameters, the "
                                 f"model's split {len(p)}")
        return parts
    split = [sum(tensors[n].numel() for n in p) for p in candidates[2]]
    raise ValueError(f"{file}: the flat vectors have lengths {sizes} ({len(groups)} group(s)), which "
                     f"match no split of the model's {len(names)} parameters in order: one group "
                     f"holds {total} elements; the nanoGPT split (>= 2-D tensors, then the others) "
                     f"holds {split}")
