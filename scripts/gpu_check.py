"""One prepared GPU check: bf16 autocast, flash-attention, two-pass memory and tokens/s of AdamW,
IVON and IVON-PCM through PCTrainer on GPT-2 125M, printed as one JSON summary.

    python scripts/gpu_check.py --json results/gpu_check.json        # one H100/H200: ~5 minutes
    python scripts/gpu_check.py --dry-run                             # the same code path on a CPU, tiny

Data are random token windows (the check measures speed and memory, not learning), so nothing is
downloaded. Per method: ``--steps`` optimizer steps of ``--batch`` sequences x ``--block`` tokens
(IVON-PCM corrects from step 0 with refresh 10 and a 10x mega-batch, so its time is amortised over
refreshes), after ``--warmup`` steps that are not timed. Reported: tokens/s (timed steps only),
peak GPU memory, final loss, and checks that must all be true: parameters and optimizer state stay
fp32 under bf16 autocast, the forward runs in bf16, the attention kernel is the one asked for,
IVON-PCM's peak memory stays within activations + state of IVON's (its two passes run one after
the other, so activations are not doubled), and every loss is finite.

    python scripts/gpu_check.py --evidence --json results/gpu_evidence.json   # one H200: ~3 minutes
    python scripts/gpu_check.py --evidence --dry-run                          # CPU, seconds

``--evidence``: does the correction help when it starts late (the paper's GPT-2 design)? A
character-level GPT-2 (6 layers x 384, context 256, 10.7M parameters) learns the repository's own
text (every ``*.py``, ``*.md``, ``*.yaml`` and ``*.toml`` file that travels with the working tree;
the last 10% of each file is the validation set), so nothing is downloaded and nothing is carried.
Two runs from the same seed, same initialisation and same batches: IVON, and IVON-PCM with
``pc_start_step`` at half the run (alpha and w the project's defaults, rho 0.6/0.1, refresh 10, 10x mega-batch).
Before its start IVON-PCM *is* IVON, so the two runs are one shared trunk that branches at the
start step; the trunk is computed in each run rather than restored from a checkpoint (no resume
path to trust, and the identity is checked, not assumed: the validation losses at the branch step
and every training loss logged before it must be equal bit for bit; deterministic algorithms are
switched on for this, and attention runs eagerly: sdpa's flash backward is not deterministic under
``warn_only``). At most 1600 steps of 16 x 256 characters: ~9.5 passes over the ~0.7M training
characters (the text, not the GPU, limits the run; ``plan.epochs_of_train_text`` in the JSON).
Reported: validation loss of both at equal steps, the optimizer's diagnostics (``pc/*``),
tokens/s, ms per step before and after the branch, wall seconds, and the time used. Two short
calibration runs first (IVON, and IVON-PCM correcting from step 0; their first steps compile the
optimizer's kernels on a GPU) measure the step and evaluation times, and the run is shortened to
fit ``--time_budget_s`` (a run also stops at the budget's end); the JSON is rewritten after every
phase and every evaluation, so a timeout still leaves the results so far.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_ivonpc import PCTrainer, PCTrainingArguments
from hf_ivonpc.optim.hparams import default
from research.lm import CharWindows
from hf_ivonpc.tasks.lm import attn_implementation, gpt2_model


class RandomWindows(torch.utils.data.Dataset):
    def __init__(self, n: int, block: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, block), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StepTimer(TrainerCallback):
    """Wall time of the optimizer steps after the first ``warmup`` (synchronised on GPU)."""

    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1, self.steps = warmup, None, None, 0

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.warmup:
            self._sync()
            self.t0 = time.perf_counter()
        elif state.global_step > self.warmup:
            self._sync()
            self.t1, self.steps = time.perf_counter(), state.global_step - self.warmup


def run_method(method: str, a, out: Path) -> dict:
    """One method ("none", "ivon", "ivon_pcm"; a "_bf16" suffix keeps the state in bf16)."""
    cuda = torch.cuda.is_available()
    pc_method, _, bf16_state = method.partition("_bf16")
    model = gpt2_model(50257, a.block, a.n_layer, a.n_head, a.n_embd, attn=a.attn, seed=0)
    if cuda:
        model = model.cuda()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    total = a.warmup + a.steps
    data = RandomWindows(max(a.batch * 40, a.batch * total), a.block, 50257)
    lr = {"none": 6e-4}.get(pc_method, 0.3)
    state = {"pc_state_dtype": "bfloat16"} if method.endswith("_bf16") else {}
    args = PCTrainingArguments(
        output_dir=str(out / method), pc_method=pc_method, max_steps=total, learning_rate=lr, **state,
        per_device_train_batch_size=a.batch, bf16=a.bf16, use_cpu=not cuda, report_to=[],
        save_strategy="no", logging_steps=max(1, total // 4), disable_tqdm=True, seed=0,
        ivon_ess=1e10, ivon_clip_radius=1e-3, weight_decay=1e-6, warmup_steps=0,
        pc_start_step=0, pc_refresh_steps=10, pc_megabatch_factor=10, dataloader_num_workers=2 if cuda else 0)
    timer = StepTimer(a.warmup)
    trainer = PCTrainer(model=model, args=args, train_dataset=data, callbacks=[timer])
    seen = {}

    def probe(module, inputs, output):   # the dtype the forward actually computes in
        seen["logits_dtype"] = str(output.logits.dtype).replace("torch.", "")
    handle = model.register_forward_hook(probe)
    result = trainer.train()
    handle.remove()
    opt = trainer.pc_optimizer
    state_dtypes = sorted({str(t.dtype).replace("torch.", "") for f in (opt.flat_state() if opt else [])
                           for t in f.values()})
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    elapsed = (timer.t1 - timer.t0) if timer.t0 is not None and timer.t1 is not None else float("nan")
    rec = {
        "method": method,
        "tokens_per_s": timer.steps * a.batch * a.block / elapsed if timer.steps else None,
        "ms_per_step": 1000 * elapsed / timer.steps if timer.steps else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "final_loss": losses[-1] if losses else result.training_loss,
        "param_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()}),
        "state_dtypes": state_dtypes,
        # optimizer state per trained parameter (on a GPU the noise is drawn again, not kept)
        "state_bytes_per_param": (opt.state_nbytes() / sum(p.numel() for p in model.parameters()
                                                           if p.requires_grad) if opt else None),
        "forward_dtype": seen.get("logits_dtype"),
        "attn_implementation": model.config._attn_implementation,
    }
    del trainer, model, opt
    if cuda:
        torch.cuda.empty_cache()
    return rec


# ------------------------------------------------------------------------------------ evidence
ROOT = Path(__file__).resolve().parents[1]
#: the files whose text is the corpus, and the folders that do not travel (or are not text)
TEXT_SUFFIXES = (".py", ".md", ".yaml", ".toml")
SKIP_PARTS = {"results", "build", "__pycache__", "node_modules"}
#: the evidence run's model, and its dry-run shrink
EVIDENCE_MODEL = dict(n_layer=6, n_head=6, n_embd=384)
DRY_MODEL = dict(n_layer=1, n_head=2, n_embd=32)
#: IVON-PCM's correction: the paper's GPT-2 outer momentum, refresh and mega-batch; alpha and w
#: the project's defaults (hparams, chosen from the evidence campaign)
PCM = dict(pc_alpha=default("alpha"), pc_mean_term_weight=default("mean_term_weight"), pc_rho1=0.6,
           pc_rho2=0.1, pc_refresh_steps=10, pc_megabatch_factor=10)
#: IVON-PCM's corrected step in units of IVON's (two passes + the mega-batch amortised: 3.02
#: measured on the CPU, see README), with a margin: the plan's guess when it was not measured
PCM_COST = 3.3
EVAL_POINTS = 8   # evaluations after the start one; the branch step is the 4th


def text_files(root: Path = ROOT) -> list[Path]:
    """The repository's text files, sorted: no hidden folders (.venv, .git), no results, builds
    or egg-info (they do not travel to the GPU machine)."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not (d.startswith(".") or d in SKIP_PARTS or d.endswith(".egg-info"))]
        out += [Path(folder) / f for f in files if f.endswith(TEXT_SUFFIXES)]
    return sorted(out, key=lambda p: p.relative_to(root).parts)


def char_corpus(root: Path = ROOT, val_fraction: float = 0.1):
    """(train ids, validation ids, vocabulary, info): the characters of every text file, the last
    ``val_fraction`` of each file held out (so both splits hold code and prose alike)."""
    files = text_files(root)
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    vocab = sorted(set("".join(texts)))
    index = {c: i for i, c in enumerate(vocab)}
    train, val = [], []
    for t in texts:
        cut = int((1 - val_fraction) * len(t))
        train.append(t[:cut])
        val.append(t[cut:])
    train_s, val_s = "".join(train), "".join(val)
    info = {"source": f"the repository's {', '.join('*' + s for s in TEXT_SUFFIXES)} files, last "
                      f"{val_fraction:.0%} of each held out", "files": len(files),
            "chars": len(train_s) + len(val_s), "train_chars": len(train_s), "val_chars": len(val_s),
            "vocab": len(vocab),
            "sha256": hashlib.sha256("\0".join(texts).encode("utf-8", "replace")).hexdigest()[:16]}
    ids = lambda s: torch.tensor([index[c] for c in s], dtype=torch.int64)  # noqa: E731
    return ids(train_s), ids(val_s), vocab, info


class RandomCharWindows(torch.utils.data.Dataset):
    """``n`` windows of ``block`` characters at seeded random offsets (every run sees the same)."""

    def __init__(self, ids: torch.Tensor, n: int, block: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids, self.block = ids, block
        self.offsets = torch.randint(0, len(ids) - block + 1, (n,), generator=g)

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, i):
        o = int(self.offsets[i])
        w = self.ids[o:o + self.block]
        return {"input_ids": w, "labels": w}


def run_seconds(steps: int, s_per_step: float, eval_s: float, pcm_cost: float = PCM_COST,
                branch_ratio: float = 0.5) -> float:
    """Both runs' time: IVON's ``steps``, IVON-PCM's (``pcm_cost`` x IVON's step after the branch
    at ``branch_ratio`` of the run), and their evaluations."""
    per_step = s_per_step * (1 + branch_ratio + pcm_cost * (1 - branch_ratio))
    return steps * per_step + 2 * (EVAL_POINTS + 1) * eval_s


def plan_steps(max_steps: int, s_per_step: float, eval_s: float, available_s: float,
               pcm_cost: float = PCM_COST, branch_ratio: float = 0.5) -> int:
    """The most optimizer steps, a multiple of 2 x EVAL_POINTS and at most ``max_steps``, for which
    both runs (IVON, then IVON-PCM branching at ``branch_ratio`` of the run) and their evaluations
    fit in ``available_s`` (see ``run_seconds``); at least 2 x EVAL_POINTS."""
    unit = 2 * EVAL_POINTS
    per_step = run_seconds(1, s_per_step, 0.0, pcm_cost, branch_ratio)
    evals = run_seconds(0, s_per_step, eval_s, pcm_cost, branch_ratio)
    fit = int(max(0.0, available_s - evals) / per_step) if per_step > 0 else max_steps
    return max(unit, min(max_steps, fit) // unit * unit)


class BranchClock(TrainerCallback):
    """Wall time of each optimizer step (evaluations excluded; synchronised on the GPU), the
    evaluations as they come (``on_eval`` is called after each), and a stop at ``deadline``."""

    def __init__(self, deadline: float | None = None, on_eval=None):
        self.deadline, self.on_eval = deadline, on_eval
        self.step_s, self.curve, self.t0, self.stopped_at = [], [], None, None

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kw):
        self._sync()
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self._sync()
        self.step_s.append(time.perf_counter() - self.t0)
        late = self.deadline is not None and time.perf_counter() > self.deadline
        if late and not control.should_training_stop:
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.curve.append({"step": state.global_step, "eval_loss": (metrics or {}).get("eval_loss")})
        if self.on_eval is not None:
            self.on_eval()


def _evidence_args(method: str, e, out: Path, max_steps: int, branch_step: int):
    cuda = torch.cuda.is_available()
    eval_steps = max(1, max_steps // EVAL_POINTS)
    kw = dict(output_dir=str(out / method), pc_method=method, max_steps=max_steps,
              learning_rate=e.lr, lr_scheduler_type="cosine", warmup_steps=max_steps // 20,
              per_device_train_batch_size=e.batch, per_device_eval_batch_size=64,
              weight_decay=1e-6, max_grad_norm=1.0, bf16=e.bf16, use_cpu=not cuda,
              eval_strategy="steps", eval_steps=eval_steps, eval_on_start=True,
              logging_steps=max(1, eval_steps // 2), save_strategy="no", report_to=[],
              disable_tqdm=True, seed=e.seed, dataloader_num_workers=0)
    if method == "ivon_pcm":
        kw.update(PCM, pc_start_step=branch_step)
    return PCTrainingArguments(**kw)


def _evidence_run(method: str, e, data, out: Path, max_steps: int, branch_step: int,
                  deadline: float | None = None, rec: dict | None = None, write=None) -> dict:
    """One run (a branch, or the calibration); ``rec`` is filled in as it goes."""
    from research.campaign import gradient_evaluations

    cuda = torch.cuda.is_available()
    train_ids, val_ids, vocab = data
    rec = {} if rec is None else rec
    t_start = time.perf_counter()
    model = gpt2_model(len(vocab), e.block, e.n_layer, e.n_head, e.n_embd, attn=e.attn, seed=e.seed)
    if cuda:
        model = model.cuda()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train = RandomCharWindows(train_ids, max(max_steps, PCM["pc_megabatch_factor"] + 1) * e.batch,
                              e.block, seed=e.seed)
    val = CharWindows(val_ids, e.block, e.eval_windows)
    args = _evidence_args(method, e, out, max_steps, branch_step)

    def update():
        rec["curve"] = list(clock.curve)
        rec["steps_done"] = clock.curve[-1]["step"] if clock.curve else 0
        if write is not None:
            write()
    clock = BranchClock(deadline, on_eval=update)
    trainer = PCTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, callbacks=[clock])
    trainer.train()
    hist = trainer.state.log_history
    steps = trainer.state.global_step
    n_before = min(branch_step, len(clock.step_s))
    before, after = clock.step_s[:n_before], clock.step_s[n_before:]
    ms = lambda xs: 1000 * sum(xs) / len(xs) if xs else None  # noqa: E731
    corrected = method == "ivon_pcm"
    rec.update({
        "method": method, "steps_done": steps, "max_steps": max_steps,
        "stopped_by_budget_at": clock.stopped_at,
        "curve": [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in hist if "eval_loss" in r],
        "train_loss": [{"step": r["step"], "loss": r["loss"]} for r in hist if "loss" in r],
        "diagnostics": [{"step": r["step"], **{k: v for k, v in r.items() if k.startswith("pc/")}}
                        for r in hist if any(k.startswith("pc/") for k in r)],
        "train_s": sum(clock.step_s), "wall_s": time.perf_counter() - t_start,
        "tokens_per_s": steps * e.batch * e.block / sum(clock.step_s) if clock.step_s else None,
        "ms_per_step_before_branch": ms(before), "ms_per_step_after_branch": ms(after),
        "gradient_evaluations": gradient_evaluations(
            steps, e.batch, corrected, branch_step, PCM["pc_refresh_steps"], PCM["pc_megabatch_factor"]),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "n_params": sum(p.numel() for p in model.parameters()),
        "attn_implementation": model.config._attn_implementation,
    })
    rec["_step_s"] = clock.step_s
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return rec


def _calibrate(e, data, out: Path) -> dict:
    """Seconds per IVON step and per evaluation, and IVON-PCM's corrected step in units of IVON's,
    from two short runs. The first steps are not timed: on a GPU they compile the optimizer's
    kernels (IVON-PCM's untimed steps hold its first two refreshes, which compile different
    kernels); IVON-PCM corrects from step 0 and its timed steps hold two refreshes."""
    warm, timed = (1, 2) if e.dry_run else (5, 2 * PCM["pc_refresh_steps"])
    t0 = time.perf_counter()
    rec = _evidence_run("ivon", e, data, out / "calibration", warm + timed, 0)
    times = rec["_step_s"][warm:]
    evals = max(1, len(rec["curve"]))
    eval_s = max(0.0, rec["wall_s"] - rec["train_s"]) / evals   # model build + trainer set-up included
    cal = {"steps": warm + timed, "s_per_step": sum(times) / len(times), "s_per_eval": eval_s}
    pwarm = 1 if e.dry_run else PCM["pc_refresh_steps"] + 2
    rec = _evidence_run("ivon_pcm", e, data, out / "calibration", pwarm + timed, 0)
    ptimes = rec["_step_s"][pwarm:]
    cal["pcm_cost"] = (sum(ptimes) / len(ptimes)) / cal["s_per_step"]
    cal["wall_s"] = time.perf_counter() - t0
    return cal


def _same(a: list[dict], b: list[dict], key: str, upto: int) -> bool | None:
    """Whether two runs logged the same ``key`` at every step <= ``upto`` (None: nothing logged)."""
    x = {r["step"]: r[key] for r in a if r["step"] <= upto}
    y = {r["step"]: r[key] for r in b if r["step"] <= upto}
    if not x or x.keys() != y.keys():
        return None if not x and not y else False
    return all(x[s] == y[s] for s in x)


def evidence(a) -> dict:
    """The ``--evidence`` mode: see the module's docstring."""
    t_main = time.perf_counter()
    deadline = t_main + a.time_budget_s
    cuda = torch.cuda.is_available()
    # deterministic kernels (flash-attention's backward included), so that the shared trunk is
    # computed identically in both runs; restored at the end
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    # a tiny model on a CPU: one thread is several times faster than two contended ones
    threads = torch.get_num_threads()
    if a.dry_run:
        torch.set_num_threads(1)
    e = argparse.Namespace(**vars(a))
    e.__dict__.update(DRY_MODEL if a.dry_run else EVIDENCE_MODEL)
    e.block = a.block or (32 if a.dry_run else 256)
    e.batch = a.batch or (4 if a.dry_run else 16)
    e.eval_windows = 16 if a.dry_run else None
    e.bf16 = cuda and torch.cuda.is_bf16_supported()
    # eager attention: its backward is deterministic (sdpa's flash and memory-efficient backward
    # are not, unless deterministic algorithms are enforced without warn_only)
    e.attn = "eager" if a.attn == "auto" else a.attn
    max_steps = a.steps or (16 if a.dry_run else 1600)
    out = Path(a.out)
    import transformers
    summary = {
        "mode": "evidence", "status": "running",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
        "torch": torch.__version__, "transformers": transformers.__version__, "bf16": e.bf16,
        "deterministic_algorithms": True, "settings": {"ivon_pcm": dict(PCM), "lr": e.lr,
                                                       "schedule": "cosine, 5% warmup",
                                                       "weight_decay": 1e-6, "max_grad_norm": 1.0},
        "time": {"budget_s": a.time_budget_s},
    }

    def write():
        summary["time"]["used_s"] = time.perf_counter() - t_main
        if a.json:
            path = Path(a.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(summary, indent=1, default=str))
            os.replace(tmp, path)

    caught: list[str] = []   # the warnings, recorded for the JSON
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            train_ids, val_ids, vocab, info = char_corpus()
            data = (train_ids, val_ids, vocab)
            n_val = len(val_ids) // e.block
            info["val_windows"] = min(n_val, e.eval_windows) if e.eval_windows else n_val
            summary["data"] = info
            summary["time"]["data_s"] = time.perf_counter() - t_main
            write()
            cal = _calibrate(e, data, out)
            summary["calibration"] = cal
            left = deadline - time.perf_counter()
            # the measured cost of a corrected step, with a margin (the guess where it reads low)
            pcm_cost = max(1.1 * cal["pcm_cost"], 2.0)
            steps = plan_steps(max_steps, cal["s_per_step"], cal["s_per_eval"], 0.85 * left - 10,
                               pcm_cost)
            branch = steps // 2
            summary["plan"] = {
                "steps": steps, "branch_step": branch, "eval_steps": steps // EVAL_POINTS,
                "batch": e.batch, "block": e.block, "max_steps": max_steps,
                "shortened_by_budget": steps < max_steps,
                "tokens_per_run": steps * e.batch * e.block,
                "epochs_of_train_text": steps * e.batch * e.block / len(train_ids),
                "pcm_cost_planned": pcm_cost,
                "estimated_s": run_seconds(steps, cal["s_per_step"], cal["s_per_eval"], pcm_cost),
                "left_s_at_plan": left}
            summary["model"] = (f"GPT-2 {e.n_layer}x{e.n_embd} ({e.n_head} heads), characters "
                                f"({len(vocab)}), context {e.block}")
            summary["branches"] = {}
            write()
            for method in ("ivon", "ivon_pcm"):
                rec = summary["branches"].setdefault(method, {"method": method, "status": "running"})
                write()
                _evidence_run(method, e, data, out, steps, branch, deadline, rec, write)
                rec.pop("_step_s", None)
                rec["status"] = "done"
                summary["n_params"] = rec["n_params"]
                write()
            summary.update(_compare(summary["branches"], branch, steps))
            summary["status"] = "done"
        except BaseException as exc:   # the JSON says what stopped it (a kill is no exception)
            summary["status"] = f"error: {type(exc).__name__}: {exc}"[:2000]
            raise
        finally:
            caught = list(dict.fromkeys(str(x.message)[:500] for x in w))   # each once, in order
            torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
            torch.set_num_threads(threads)
            summary["nondeterminism_warnings"] = [m for m in caught if "determinis" in m.lower()][:10]
            summary["warnings"] = caught[:20]
            write()
    for m in caught:
        print(f"warning: {m}", file=sys.stderr)
    summary["time"]["used_s"] = time.perf_counter() - t_main
    text = json.dumps(summary, indent=1, default=str)
    print(text)
    write()
    return summary


def _compare(branches: dict, branch: int, steps: int) -> dict:
    """Validation loss at equal steps, the identity before the branch step, and the checks."""
    ivon, pcm = branches["ivon"], branches["ivon_pcm"]
    a = {r["step"]: r["eval_loss"] for r in ivon["curve"]}
    b = {r["step"]: r["eval_loss"] for r in pcm["curve"]}
    common = sorted(set(a) & set(b))
    table = [{"step": s, "ivon": a[s], "ivon_pcm": b[s], "pcm_minus_ivon": b[s] - a[s]} for s in common]
    after = [r for r in table if r["step"] > branch]
    identity = {"step": branch, "ivon": a.get(branch), "ivon_pcm": b.get(branch),
                "eval_loss_equal": branch in a and branch in b and a[branch] == b[branch],
                "train_losses_equal_before": _same(ivon["train_loss"], pcm["train_loss"], "loss", branch)}
    corrected = [d for d in pcm["diagnostics"] if d["step"] > branch]
    keys = ("pc/grad_var_ratio", "pc/hess_var_ratio", "pc/clipped_share", "pc/h_out_negative_share")
    losses = [r["eval_loss"] for br in (ivon, pcm) for r in br["curve"]] + \
             [r["loss"] for br in (ivon, pcm) for r in br["train_loss"]]
    checks = {
        "losses_finite": bool(losses) and all(x is not None and math.isfinite(x) for x in losses),
        "both_runs_complete": ivon["steps_done"] == steps and pcm["steps_done"] == steps,
        "identical_before_branch": (identity["eval_loss_equal"]
                                    and identity["train_losses_equal_before"] is True),
        "pcm_diagnostics_after_branch": all(any(k in d for d in corrected) for k in keys),
        "no_correction_before_branch": not any("pc/grad_var_ratio" in d for d in pcm["diagnostics"]
                                               if d["step"] <= branch),
    }
    ms_ivon, ms_pcm = ivon.get("ms_per_step_after_branch"), pcm.get("ms_per_step_after_branch")
    return {
        "equal_steps": table,
        "identity_at_branch": identity,
        "final": after[-1] if after else None,
        "mean_pcm_minus_ivon_after_branch": (sum(r["pcm_minus_ivon"] for r in after) / len(after)
                                             if after else None),
        "pcm_diagnostics_mean_after_branch": {
            k: sum(d[k] for d in corrected if k in d) / max(1, sum(k in d for d in corrected))
            for k in keys if any(k in d for d in corrected)},
        "pcm_step_cost_vs_ivon": ms_pcm / ms_ivon if ms_pcm and ms_ivon else None,
        "checks": checks, "all_checks_pass": all(checks.values()),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="a tiny model for a few steps on the CPU")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed optimizer steps per method (200); --evidence: the most steps per run "
                         "(1600, fewer when the time budget requires)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation, caches)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (16; dry run: 4)")
    ap.add_argument("--block", type=int, default=None, help="tokens per sequence (1024; --evidence: 256)")
    ap.add_argument("--methods", default="none,ivon,ivon_pcm",
                    help="comma-separated: none, ivon, ivon_pcm, and ivon_bf16 / ivon_pcm_bf16 "
                         "(pc_state_dtype='bfloat16')")
    ap.add_argument("--attn", default="auto", help="auto: flash_attention_2 where installed, else sdpa")
    ap.add_argument("--out", default="results/gpu_check", help="scratch folder for the trainers")
    ap.add_argument("--json", default=None, help="also write the summary here")
    ap.add_argument("--evidence", action="store_true",
                    help="IVON and IVON-PCM branching from one trunk on the repository's text (see above)")
    ap.add_argument("--time_budget_s", type=float, default=400.0,
                    help="--evidence: seconds for the whole mode; the run is shortened to fit")
    ap.add_argument("--lr", type=float, default=1.0, help="--evidence: IVON's step size eta")
    ap.add_argument("--seed", type=int, default=0, help="--evidence: the seed of both runs")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not a.dry_run:
        ap.error("no GPU is visible: run with --dry-run to check the code path on the CPU")
    if a.evidence:
        return evidence(a)
    a.steps, a.block, a.batch = a.steps or 200, a.block or 1024, a.batch or 16
    a.n_layer, a.n_head, a.n_embd = 12, 12, 768
    if a.dry_run:
        a.n_layer, a.n_head, a.n_embd = 1, 2, 32
        a.steps, a.warmup, a.batch, a.block = min(a.steps, 3), min(a.warmup, 1), min(a.batch, 4), min(a.block, 32)
    a.bf16 = cuda and torch.cuda.is_bf16_supported()
    summary = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
        "torch": torch.__version__, "bf16": a.bf16,
        "flash_attn_installed": attn_implementation("auto") == "flash_attention_2",
        "model": f"GPT-2 {a.n_layer}x{a.n_embd}, context {a.block}, batch {a.batch}",
        "steps": a.steps, "methods": [],
    }
    for method in a.methods.split(","):
        summary["methods"].append(run_method(method, a, Path(a.out)))
        print(json.dumps(summary["methods"][-1]), file=sys.stderr)
    by = {r["method"]: r for r in summary["methods"]}
    checks = {
        "losses_finite": all(math.isfinite(r["final_loss"]) for r in by.values()),
        "params_fp32": all(r["param_dtypes"] == ["float32"] for r in by.values()),
        "optimizer_state_fp32": all(r["state_dtypes"] in ([], ["float32"]) for m, r in by.items()
                                    if not m.endswith("_bf16")),
    }
    if a.bf16:
        checks["forward_bf16"] = all(r["forward_dtype"] == "bfloat16" for r in by.values())
    if summary["flash_attn_installed"]:
        checks["flash_attention_used"] = all(r["attn_implementation"] == "flash_attention_2" for r in by.values())
    if cuda and "ivon" in by and "ivon_pcm" in by:
        # IVON-PCM adds 6 fp32 buffers (24 B/param) to IVON's; activations are not doubled
        n = 12 * 12 * 768 * 768 + 50257 * 768 + a.block * 768
        extra = 6 * 4 * n / 2**30
        checks["two_pass_memory"] = by["ivon_pcm"]["peak_memory_gib"] <= by["ivon"]["peak_memory_gib"] + 1.5 * extra
    if "none" in by:
        for m in ("ivon", "ivon_pcm", "ivon_bf16", "ivon_pcm_bf16"):
            if m in by and by[m]["tokens_per_s"] and by["none"]["tokens_per_s"]:
                summary[f"{m}_tokens_per_s_vs_adamw"] = by[m]["tokens_per_s"] / by["none"]["tokens_per_s"]
    summary["checks"] = checks
    summary["all_checks_pass"] = all(checks.values())
    text = json.dumps(summary, indent=1)
    print(text)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text)
    return summary


if __name__ == "__main__":
    sys.exit(0 if main().get("all_checks_pass") else 1)
