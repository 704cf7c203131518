"""The regimes of the evidence campaign (``scripts/evidence.py``): data, models and one run.

- ``lm``: a character-level GPT-2 (4 layers x 128, 0.8M parameters) on Shakespeare's plays,
  context 64, batch 16: the paper's GPT-2 pretraining (App. D.2, Fig. 6) at CPU scale, trained
  far past unigram statistics (the character unigram loss is 3.3 nats).
- ``image``: a small CNN (2 conv layers, 106k parameters) on Fashion-MNIST, batch 64, the
  learning rate annealed to a quarter of its start value (the paper's CIFAR-10 setting, Fig. 5),
  where the paper sees gains per example.
- ``digits``: the ``image`` regime's code path on scikit-learn's digits (8x8), for tests.

One run trains one method with one configuration through ``PCTrainer`` (single-threaded, so that
its CPU time is its cost) and returns its validation curve at equal steps, gradient evaluations
and CPU time, the optimizer's diagnostics, how far h moved from h0, and for classifiers the
posterior predictive against the mean.
"""

from __future__ import annotations

import gzip
import math
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .campaign import CPUClock, gradient_evaluations, torch_threads

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_HOW = "apt-get install dataset-fashion-mnist (Debian)"

#: per regime: the run's shape and every method's fixed settings (the tuned ones come per run)
REGIMES = {
    "lm": dict(steps=1000, batch=16, eval_every=100, block=64, start_ratio=0.5, refresh=10,
               factor=10, scheduler="cosine", warmup_ratio=0.05, ivon=dict(weight_decay=1e-6),
               adamw=dict(weight_decay=0.1, adam_beta2=0.95),
               grids={"adamw": [1e-3, 3e-3, 1e-2], "ivon": [0.1, 0.3, 1.0]}),
    "image": dict(steps=1500, batch=64, eval_every=150, start_ratio=0.2, refresh=10, factor=10,
                  scheduler="cosine_with_min_lr", warmup_ratio=0.0,
                  ivon=dict(weight_decay=1e-4, ivon_ess=60000.0, ivon_hess_init=0.1),
                  adamw=dict(weight_decay=0.01),
                  grids={"adamw": [1e-3, 3e-3, 1e-2], "ivon": [0.1, 0.3, 1.0]}),
}
REGIMES["digits"] = {**REGIMES["image"], "steps": 40, "batch": 32, "eval_every": 10,
                     "ivon": dict(weight_decay=1e-4, ivon_ess=1500.0, ivon_hess_init=0.1)}
#: the paper's outer momentum for GPT-2 pretraining (App. D.2): IVON-PCM's rho
PAPER_RHO = (0.6, 0.1)
METHODS = ("adamw", "alpha_svrg", "ivon", "ivon_pc", "ivon_pcm")


# ---------------------------------------------------------------------------------------- data
@lru_cache(maxsize=1)
def shakespeare_chars() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(train ids, validation ids, vocabulary): the plays' characters, the last 10% of each play
    held out."""
    from ..data.corpora import shakespeare_plays
    plays = shakespeare_plays()
    vocab = sorted(set("".join(plays.values())))
    index = {c: i for i, c in enumerate(vocab)}
    train, val = [], []
    for text in plays.values():
        ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
        cut = int(0.9 * len(ids))
        train.append(ids[:cut])
        val.append(ids[cut:])
    return torch.cat(train), torch.cat(val), vocab


class CharWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of ``block`` characters (at most ``limit``, evenly spread)."""

    def __init__(self, ids: torch.Tensor, block: int, limit: int | None = None):
        n = len(ids) // block
        windows = ids[: n * block].view(n, block)
        if limit is not None and limit < n:
            windows = windows[torch.linspace(0, n - 1, limit).long()]
        self.windows = windows

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


@lru_cache(maxsize=2)
def images(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train x, train y, test x, test y), images as float (N, 1, H, W), standardised."""
    if name == "image":
        if not FASHION_MNIST.is_dir():
            raise FileNotFoundError(f"{FASHION_MNIST} is missing: {FASHION_HOW}")
        x, y = _idx(FASHION_MNIST / "train-images-idx3-ubyte.gz"), _idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz")
        xt, yt = _idx(FASHION_MNIST / "t10k-images-idx3-ubyte.gz"), _idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")
    else:
        from sklearn.datasets import load_digits
        d = load_digits()
        x, y = d.images[:1500].astype(np.float32), d.target[:1500]
        xt, yt = d.images[1500:].astype(np.float32), d.target[1500:]
    x, xt = (torch.tensor(np.asarray(a, dtype=np.float32)).unsqueeze(1) for a in (x, xt))
    mean, std = x.mean(), x.std()
    return (x - mean) / std, torch.tensor(np.asarray(y), dtype=torch.int64), (xt - mean) / std, \
        torch.tensor(np.asarray(yt), dtype=torch.int64)


class Images(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class SmallCNN(torch.nn.Module):
    """conv(16) - pool - conv(32) - pool - 64 - 10, for 28x28 (or 8x8) grey images."""

    def __init__(self, side: int = 28):
        super().__init__()
        nn = torch.nn
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Flatten(), nn.Linear(32 * (side // 4) ** 2, 64), nn.ReLU(),
                                 nn.Linear(64, 10))

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def _model_and_data(regime: str, seed: int):
    torch.manual_seed(seed)
    if regime == "lm":
        from transformers import GPT2Config, GPT2LMHeadModel
        train, val, vocab = shakespeare_chars()
        block, r = REGIMES["lm"]["block"], REGIMES["lm"]
        cfg = GPT2Config(vocab_size=len(vocab), n_positions=block, n_embd=128, n_layer=4, n_head=4,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
        return model, CharWindows(train, block, r["steps"] * r["batch"] * 2), CharWindows(val, block, 256)
    x, y, xt, yt = images(regime)
    return SmallCNN(side=x.shape[-1]), Images(x, y), Images(xt, yt)


# ----------------------------------------------------------------------------------------- run
def train_run(regime: str, cfg: dict, threads: int = 1) -> dict:
    """One run on ``threads`` threads (its CPU time is its cost): ``cfg`` holds method, seed, lr
    and, for the corrected methods, alpha, mean_term_weight (w) and rho; the regime fixes the
    rest. The caller's thread count is restored afterwards."""
    with torch_threads(threads):
        return _train_run(regime, cfg)


def _train_run(regime: str, cfg: dict) -> dict:
    from ..args import PCTrainingArguments
    from ..metrics import classification_metrics
    from ..trainer import PCTrainer

    r = REGIMES[regime]
    method = cfg["method"]
    pc = {"adamw": "none", "alpha_svrg": "alpha_svrg", "ivon": "ivon"}.get(method, "ivon_pcm")
    model, train, val = _model_and_data(regime, cfg["seed"])
    classifier = regime != "lm"
    kw = dict(pc_method=pc, max_steps=r["steps"], learning_rate=cfg["lr"],
              per_device_train_batch_size=r["batch"], per_device_eval_batch_size=256,
              lr_scheduler_type=r["scheduler"], warmup_steps=r["warmup_ratio"], max_grad_norm=1.0,
              eval_strategy="steps", eval_steps=r["eval_every"], eval_on_start=True,
              logging_steps=r["eval_every"], save_strategy="no", report_to=[], disable_tqdm=True,
              use_cpu=True, seed=cfg["seed"], dataloader_num_workers=0)
    if r["scheduler"] == "cosine_with_min_lr":   # annealed to a quarter of the start value
        kw["lr_scheduler_kwargs"] = {"min_lr_rate": 0.25}
    kw.update(r["adamw"] if pc in ("none", "alpha_svrg") else r["ivon"])
    corrected = pc in ("alpha_svrg", "ivon_pcm")
    # the sweeps vary the refresh interval and the start of the correction per run
    refresh, start_ratio = cfg.get("refresh", r["refresh"]), cfg.get("start_ratio", r["start_ratio"])
    if corrected:
        kw.update(pc_start_ratio=start_ratio, pc_refresh_steps=refresh,
                  pc_megabatch_factor=r["factor"], pc_alpha=cfg["alpha"], pc_rho1=cfg.get("rho", (0, 0))[0])
    if pc == "ivon_pcm":
        kw.update(pc_rho2=cfg.get("rho", (0, 0))[1], pc_mean_term_weight=cfg["w"])
    kw.update(cfg.get("extra", {}))
    clock = CPUClock()
    with tempfile.TemporaryDirectory() as out:
        args = PCTrainingArguments(output_dir=out, **kw)
        trainer = PCTrainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                            compute_metrics=classification_metrics if classifier else None,
                            callbacks=[clock])
        trainer.train()
        start = math.ceil(start_ratio * r["steps"]) if corrected else 0
        curve = [dict(p, examples=gradient_evaluations(p["step"], r["batch"], corrected, start,
                                                       refresh, r["factor"])) for p in clock.points]
        result = {"cfg": cfg, "regime": regime, "curve": curve, "logs": clock.logs,
                  "final": curve[-1], "cpu_s": clock.cpu_s, "start_step": start,
                  "n_params": sum(p.numel() for p in model.parameters())}
        opt = trainer.pc_optimizer
        if opt is not None and hasattr(opt, "posterior_std"):
            result["h_moved"] = h_moved(opt)
            if classifier:
                result["predictive"] = predictive_vs_mean(trainer, val)
    return result


def h_moved(opt) -> dict:
    """How far h moved from h0: quantiles of |h - h0| / h0 over all coordinates."""
    rel = torch.cat([((g_h.float() - group["hess_init"]).abs() / group["hess_init"]).reshape(-1)
                     for group, flat in zip(opt.param_groups, opt.flat_state())
                     for g_h in [flat["hess"]]])
    q = torch.quantile(rel[torch.randperm(len(rel), generator=torch.Generator().manual_seed(0))[:1_000_000]].double(),
                       torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {"median": q[0], "p90": q[1], "p99": q[2], "beta2": opt.param_groups[0]["beta2"]}


def predictive_vs_mean(trainer, data, samples: int = 8) -> dict:
    """Accuracy, NLL and ECE on ``data`` at the posterior mean and with the posterior predictive
    over ``samples`` draws."""
    out = {}
    for name, k in (("mean", 0), ("predictive", samples)):
        trainer.args.eval_mc_samples = k
        m = trainer.evaluate(data, metric_key_prefix=name)
        out[name] = {key: m[f"{name}_{key}"] for key in ("accuracy", "nll", "ece")}
    trainer.args.eval_mc_samples = 0
    return out
