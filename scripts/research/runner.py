"""One run of the evidence campaign (``scripts/evidence.py``) in any regime: ``lm``
(:mod:`research.lm`), ``image`` and ``digits`` (:mod:`research.image`).

One run trains one method with one configuration through ``PCTrainer`` (single-threaded, so that
its CPU time is its cost) on a schedule that ends at its own budget of gradient evaluations, and
returns its curve on the selection and the report splits against steps, gradient evaluations
and CPU time, the optimizer's diagnostics, how far h moved from h0, and for classifiers the
posterior predictive against the mean on the report split.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from . import continual, image, lm
from .campaign import CPUClock, gradient_evaluations, steps_for_budget, torch_threads

#: per regime: the run's shape and every method's fixed settings (the tuned ones come per run)
REGIMES = {"lm": lm.SPEC, "image": image.SPEC, "digits": image.DIGITS, "continual": continual.SPEC,
           "continual_tiny": continual.TINY}
#: the paper's outer momentum for GPT-2 pretraining (App. D.2): IVON-PCM's rho
PAPER_RHO = (0.6, 0.1)
#: the methods of a run's ``cfg["method"]``: ``ivon_3x`` is IVON with a mini-batch three times
#: larger (as many gradient evaluations per step as a corrected step's two passes and its share of
#: the mega-batch, roughly: what the correction's variance reduction must beat)
METHODS = ("adamw", "alpha_svrg", "ivon", "ivon_3x", "ivon_pc", "ivon_pcm")
PC_METHOD = {"adamw": "none", "alpha_svrg": "alpha_svrg", "ivon": "ivon", "ivon_3x": "ivon",
             "ivon_pc": "ivon_pcm", "ivon_pcm": "ivon_pcm"}
CORRECTED = ("alpha_svrg", "ivon_pc", "ivon_pcm")


def pretrained_folder(regime: str) -> Path:
    """Where a continual regime keeps its pretrained model (the data cache: weights are never
    committed)."""
    from hf_ivonpc.data import cache_dir

    return Path(cache_dir()) / "research" / regime


def _model_and_data(regime: str, seed: int):
    if regime == "lm":
        return lm.model_and_data(seed, REGIMES[regime])
    if regime.startswith("continual"):
        return continual.model_and_data(seed, REGIMES[regime], pretrained_folder(regime))
    return image.model_and_data(regime, seed)


def budget_unit(regime: str) -> str:
    """"examples" (gradient evaluations) or "cpu_s" (CPU seconds of one thread)."""
    return REGIMES[regime].get("budget_unit", "examples")


def base_budget(regime: str) -> float:
    """The regime's base budget: gradient evaluations (its ``steps`` x ``batch``) or CPU seconds."""
    r = REGIMES[regime]
    return r["cpu_s"] if budget_unit(regime) == "cpu_s" else r["steps"] * r["batch"]


def run_shape(regime: str, cfg: dict) -> dict:
    """A run's batch, steps and correction start: the schedule (warm-up, cosine, the correction's
    start) of every run ends at its own budget, ``cfg["budget"]`` gradient evaluations (default:
    the regime's base budget)."""
    r = REGIMES[regime]
    method = cfg["method"]
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid: accepted are {METHODS}")
    batch = r["batch"] * (3 if method == "ivon_3x" else 1)
    corrected = method in CORRECTED
    refresh, start_ratio = cfg.get("refresh", r["refresh"]), cfg.get("start_ratio", r["start_ratio"])
    if budget_unit(regime) == "cpu_s":   # the campaign converts seconds to steps per method
        if not (isinstance(cfg.get("steps"), int) and cfg["steps"] >= 1):
            raise ValueError(f"steps={cfg.get('steps')!r} is invalid for regime {regime!r}: accepted is an "
                             "integer >= 1 (its budgets are CPU seconds, converted by the campaign)")
        steps = cfg["steps"]
    else:
        steps = steps_for_budget(cfg.get("budget", base_budget(regime)), batch, corrected, start_ratio,
                                 refresh, r["factor"])
    return {"batch": batch, "steps": steps, "corrected": corrected, "refresh": refresh,
            "start_ratio": start_ratio, "start": math.ceil(start_ratio * steps) if corrected else 0,
            "eval_every": max(1, steps // r["evals"])}


def train_run(regime: str, cfg: dict, threads: int = 1) -> dict:
    """One run on ``threads`` threads (its CPU time is its cost): ``cfg`` holds method, seed, lr,
    budget and, for the corrected methods, alpha, mean_term_weight (w) and rho; the regime fixes the
    rest. The caller's thread count is restored afterwards."""
    with torch_threads(threads):
        return _train_run(regime, cfg)


def _train_run(regime: str, cfg: dict) -> dict:
    from hf_ivonpc.args import PCTrainingArguments
    from hf_ivonpc.metrics import classification_metrics
    from hf_ivonpc.trainer import PCTrainer

    r = REGIMES[regime]
    shape = run_shape(regime, cfg)
    pc = PC_METHOD[cfg["method"]]
    model, train, select, report = _model_and_data(regime, cfg["seed"])
    classifier = regime in ("image", "digits")
    kw = dict(pc_method=pc, max_steps=shape["steps"], learning_rate=cfg["lr"],
              per_device_train_batch_size=shape["batch"], per_device_eval_batch_size=256,
              lr_scheduler_type=r["scheduler"], warmup_steps=r["warmup_ratio"], max_grad_norm=1.0,
              eval_strategy="steps", eval_steps=shape["eval_every"], eval_on_start=True,
              logging_steps=shape["eval_every"], save_strategy="no", report_to=[], disable_tqdm=True,
              use_cpu=True, seed=cfg["seed"], dataloader_num_workers=0)
    if r["scheduler"] == "cosine_with_min_lr":   # annealed to a quarter of the start value
        kw["lr_scheduler_kwargs"] = {"min_lr_rate": 0.25}
    kw.update(r["adamw"] if pc in ("none", "alpha_svrg") else r["ivon"])
    if shape["corrected"]:
        kw.update(pc_start_ratio=shape["start_ratio"], pc_refresh_steps=shape["refresh"],
                  pc_megabatch_factor=r["factor"], pc_alpha=cfg["alpha"], pc_rho1=cfg.get("rho", (0, 0))[0])
    if pc == "ivon_pcm":
        kw.update(pc_rho2=cfg.get("rho", (0, 0))[1], pc_mean_term_weight=cfg["w"])
    kw.update(cfg.get("extra", {}))
    clock = CPUClock()
    with tempfile.TemporaryDirectory() as out:
        args = PCTrainingArguments(output_dir=out, **kw)
        trainer = PCTrainer(model=model, args=args, train_dataset=train,
                            eval_dataset={"select": select, "report": report},
                            compute_metrics=classification_metrics if classifier else None,
                            callbacks=[clock])
        if regime.startswith("continual") and pc in ("ivon", "ivon_pcm"):   # IVON continues its posterior
            from hf_ivonpc.tasks.continual import init_optimizer_from_posterior
            init_optimizer_from_posterior(trainer, str(pretrained_folder(regime)))
        trainer.train()
        curve = [dict(p, examples=gradient_evaluations(p["step"], shape["batch"], shape["corrected"],
                                                       shape["start"], shape["refresh"], r["factor"]))
                 for p in clock.points]
        result = {"cfg": cfg, "regime": regime, "shape": shape, "curve": curve, "logs": clock.logs,
                  "final": curve[-1], "cpu_s": clock.cpu_s, "start_step": shape["start"],
                  "n_params": sum(p.numel() for p in model.parameters())}
        opt = trainer.pc_optimizer
        if opt is not None and hasattr(opt, "posterior_std"):
            result["h_moved"] = h_moved(opt)
            if classifier:
                result["predictive"] = predictive_vs_mean(trainer, report)
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
