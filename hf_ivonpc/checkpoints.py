"""Which Trainer checkpoint folders are complete, and the newest complete one of a run.

Trainer writes a checkpoint folder file after file, in place: the weights (the posterior mean),
``posterior.safetensors`` (IVON methods), ``optimizer.pt``, ``scheduler.pt``, the RNG state and
``trainer_state.json`` last. A process killed in between leaves a folder that Trainer, asked for
the last checkpoint, picks and fails on at every later resume (``Can't find a valid checkpoint``,
a missing or truncated ``trainer_state.json``); given a folder without an RNG state it would
resume with only an info log, no longer exactly. ``checkpoint_problems`` says what such a
folder lacks; ``newest_complete_checkpoint`` skips it; ``PCTrainer.train`` uses ``resolve_resume``.

A file counts when it is present and readable to its end, checked without unpickling anything:
safetensors files by their header (safetensors refuses a file its header does not cover to the
end), ``torch.save`` archives (optimizer, scheduler, RNG state) by their zip directory, which is
written last, and the CRC of every entry (one read of each: seconds for the optimizer state of a
large model, once per resume), JSON files by parsing them, torch.distributed.checkpoint folders
(FSDP) by their ``.metadata``, which is written once every rank has written its part.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")

#: the weights of a checkpoint, one of these layouts (Trainer's ``_save``, Accelerate's FSDP saves:
#: a full file, per-rank files or a torch.distributed.checkpoint folder)
_SAFETENSORS_WEIGHTS = ("model.safetensors", "adapter_model.safetensors")
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_TORCH_WEIGHTS = ("pytorch_model.bin", "adapter_model.bin")
_TORCH_INDEX = "pytorch_model.bin.index.json"
_FSDP_WEIGHTS = re.compile(r"pytorch_model_fsdp(_\d+)?(_rank\d+)?\.bin")
_FSDP_OPTIMIZER = re.compile(r"optimizer(_\d+)?(_rank\d+)?\.bin")
_DCP_FOLDER = {"weights": re.compile(r"pytorch_model_fsdp_\d+"),
               "optimizer": re.compile(r"optimizer_\d+")}


def _safetensors_problem(path: str) -> str | None:
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt", device="cpu"):
            pass
    except Exception as e:   # SafetensorError: bad or truncated header, data not covered
        return f"{os.path.basename(path)} is unreadable ({type(e).__name__}: {e})"
    return None


def _torch_archive_problem(path: str) -> str | None:
    name = os.path.basename(path)
    try:
        with zipfile.ZipFile(path) as z:
            if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist()):
                return f"{name} is not a torch.save archive (no data.pkl)"
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"{name} is truncated or not a torch.save archive ({type(e).__name__}: {e})"
    return f"{name} is corrupt (entry {bad} fails its CRC)" if bad is not None else None


def _json_problem(path: str) -> tuple[object | None, str | None]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), None
    except (OSError, ValueError) as e:
        return None, f"{os.path.basename(path)} is truncated or not JSON ({type(e).__name__}: {e})"


def _index_problems(folder: str, index_name: str, check_shard) -> list[str]:
    """Problems of a sharded layout: its index readable, every shard it names present and readable."""
    index, problem = _json_problem(os.path.join(folder, index_name))
    if problem is not None:
        return [problem]
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        return [f"{index_name} has no weight_map"]
    problems = []
    for shard in sorted(set(map(str, weight_map.values()))):
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            problems.append(f"{shard} (named by {index_name}) is missing")
        elif (p := check_shard(path)) is not None:
            problems.append(p)
    return problems


def _fsdp_problems(folder: str, kind: str, files: re.Pattern) -> list[str] | None:
    """Problems of an FSDP save of ``kind`` (its files or its torch.distributed.checkpoint
    folders), None when the folder holds none."""
    names = sorted(os.listdir(folder))
    found = [n for n in names if files.fullmatch(n) and os.path.isfile(os.path.join(folder, n))]
    dcp = [n for n in names if _DCP_FOLDER[kind].fullmatch(n) and os.path.isdir(os.path.join(folder, n))]
    if not found and not dcp:
        return None
    problems = [p for n in found if (p := _torch_archive_problem(os.path.join(folder, n)))]
    return problems + [p for n in dcp for p in _dcp_problems(folder, n)]


def _weights_problems(folder: str) -> list[str]:
    for name in _SAFETENSORS_WEIGHTS:
        if os.path.isfile(os.path.join(folder, name)):
            return [p for p in [_safetensors_problem(os.path.join(folder, name))] if p]
    if os.path.isfile(os.path.join(folder, _SAFETENSORS_INDEX)):
        return _index_problems(folder, _SAFETENSORS_INDEX, _safetensors_problem)
    for name in _TORCH_WEIGHTS:
        if os.path.isfile(os.path.join(folder, name)):
            return [p for p in [_torch_archive_problem(os.path.join(folder, name))] if p]
    if os.path.isfile(os.path.join(folder, _TORCH_INDEX)):
        return _index_problems(folder, _TORCH_INDEX, _torch_archive_problem)
    problems = _fsdp_problems(folder, "weights", _FSDP_WEIGHTS)
    if problems is not None:
        return problems
    return ["the weights are missing (no model.safetensors, adapter_model.safetensors, "
            "pytorch_model.bin, a sharded index or an FSDP checkpoint)"]


def _dcp_problems(folder: str, name: str) -> list[str]:
    if not os.path.isfile(os.path.join(folder, name, ".metadata")):
        return [f"{name}/.metadata is missing (a torch.distributed.checkpoint folder not finished)"]
    return []


def _optimizer_problems(folder: str) -> list[str]:
    if os.path.isfile(os.path.join(folder, "optimizer.pt")):
        return [p for p in [_torch_archive_problem(os.path.join(folder, "optimizer.pt"))] if p]
    problems = _fsdp_problems(folder, "optimizer", _FSDP_OPTIMIZER)
    return ["optimizer.pt is missing"] if problems is None else problems


def _posterior_problems(folder: str) -> list[str]:
    from .posterior import FORMAT_KEY, POSTERIOR_INDEX_NAME, POSTERIOR_NAME, find_posterior
    file = find_posterior(folder)
    if file is None:
        return [f"{POSTERIOR_NAME} is missing (nor a sharded {POSTERIOR_INDEX_NAME})"]
    if os.path.basename(file) == POSTERIOR_INDEX_NAME:
        problems = _index_problems(folder, POSTERIOR_INDEX_NAME, _safetensors_problem)
        index, _ = _json_problem(file)
        meta = index.get("metadata") if isinstance(index, dict) else None
        if not problems and not (isinstance(meta, dict) and FORMAT_KEY in meta):
            problems.append(f"{POSTERIOR_INDEX_NAME} is not a posterior index (no {FORMAT_KEY})")
        return problems
    return [p for p in [_safetensors_problem(file)] if p]


def checkpoint_problems(folder: str | os.PathLike, *, posterior: bool = True,
                        world_size: int = 1, model_only: bool = False) -> list[str]:
    """What a checkpoint folder lacks for an exact resume, one line each; [] when it is complete.

    Complete is: the weights, the optimizer's state, ``scheduler.pt``, the RNG state (one file
    per process when ``world_size`` > 1), ``trainer_state.json`` and, with ``posterior``, the
    posterior, each present and readable to its end (see the module's docstring). With
    ``model_only`` (checkpoints of ``save_only_model=True``) no optimizer, scheduler or RNG state."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return [f"{folder} is not a folder"]
    problems = _weights_problems(folder)
    if posterior:
        problems += _posterior_problems(folder)
    rng = (["rng_state.pth"] if world_size <= 1
           else [f"rng_state_{i}.pth" for i in range(world_size)])
    if not model_only:
        problems += _optimizer_problems(folder)
    for name in [] if model_only else ["scheduler.pt", *rng]:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            problems.append(f"{name} is missing")
        elif (p := _torch_archive_problem(path)) is not None:
            problems.append(p)
    path = os.path.join(folder, "trainer_state.json")
    if not os.path.isfile(path):
        problems.append("trainer_state.json is missing")
    else:
        state, p = _json_problem(path)
        if p is None and not (isinstance(state, dict) and isinstance(state.get("global_step"), int)):
            p = "trainer_state.json has no global_step"
        if p is not None:
            problems.append(p)
    return problems


def checkpoint_folders(output_dir: str | os.PathLike) -> list[str]:
    """The ``checkpoint-<step>`` folders of ``output_dir``, oldest step first."""
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := CHECKPOINT_PATTERN.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def newest_complete_checkpoint(output_dir: str | os.PathLike,
                               **kw) -> tuple[str | None, list[tuple[str, list[str]]]]:
    """(the newest complete checkpoint folder of ``output_dir`` or None, [(newer incomplete
    folder, its problems)], newest first); ``kw`` as ``checkpoint_problems``'s. Folders older
    than the one found are not read."""
    skipped = []
    for folder in reversed(checkpoint_folders(output_dir)):
        problems = checkpoint_problems(folder, **kw)
        if not problems:
            return folder, skipped
        skipped.append((folder, problems))
    return None, skipped


def resolve_resume(resume_from_checkpoint, output_dir: str | os.PathLike, **kw):
    """What ``Trainer.train`` should resume from. ``True``: the newest complete checkpoint of
    ``output_dir``, with a warning naming every newer folder skipped and what it lacks (a
    ValueError when checkpoint folders exist but none is complete; with none at all ``True`` is
    returned, for Trainer's own error). A path: itself when complete, else a ValueError naming
    what it lacks and the newest complete checkpoint beside it. Anything else unchanged. ``kw`` as
    ``checkpoint_problems``'s."""
    def lines(problems):
        return "; ".join(problems)
    if resume_from_checkpoint is True:
        found, skipped = newest_complete_checkpoint(output_dir, **kw)
        if found is None and skipped:
            raise ValueError(f"resume_from_checkpoint=True: no complete checkpoint in {output_dir}: "
                             + " | ".join(f"{os.path.basename(f)}: {lines(p)}" for f, p in skipped))
        for folder, problems in skipped:
            logger.warning("resume_from_checkpoint=True: skipping the incomplete checkpoint %s "
                           "(%s); resuming from %s", folder, lines(problems), found)
        return found if found is not None else True
    if isinstance(resume_from_checkpoint, (str, os.PathLike)) and os.path.isdir(resume_from_checkpoint):
        problems = checkpoint_problems(resume_from_checkpoint, **kw)
        if problems:
            parent = os.path.dirname(os.path.abspath(resume_from_checkpoint))
            found, _ = newest_complete_checkpoint(parent, **kw)
            hint = (f"the newest complete checkpoint beside it is {found}" if found is not None
                    else "no checkpoint beside it is complete")
            raise ValueError(f"resume_from_checkpoint={os.fspath(resume_from_checkpoint)!r} is an "
                             f"incomplete checkpoint: {lines(problems)} ({hint}; "
                             "resume_from_checkpoint=True picks the newest complete one)")
    return resume_from_checkpoint
