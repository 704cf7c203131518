"""The model card PCTrainer writes (``README.md``), from ``hf_ivonpc/model_cards/posterior_model_card.md``.

Trainer's own card names ``args.optim`` as the optimizer, which is wrong when IVON, IVON-PCM or
alpha-SVRG did the training; this one says what was used, with every hyperparameter of the method,
the training data, the final metrics, sigma per layer type and a snippet that samples.
"""

from __future__ import annotations

import math
import os
import string
from pathlib import Path

from .optim.hparams import HPARAMS

TEMPLATE_NAME = "posterior_model_card.md"
PAPER = "SVRG and Beyond via Posterior Correction"

METHODS = {
    "ivon": ("IVON", "Improved Variational Online Newton (Shen et al., 2024): variational learning of "
             "a diagonal Gaussian posterior N(m, sigma^2) at Adam-like cost, sigma = 1 / sqrt(ess (h + delta)) "
             "with h an online Hessian estimate."),
    "ivon_pcm": ("IVON-PCM", "IVON with posterior correction of both its gradient and its Hessian "
                 "estimate from mega-batch statistics, with outer momentum rho1, rho2 (Algorithm 4 "
                 "of the paper)."),
    "alpha_svrg": ("alpha-SVRG", "the SVRG correction scaled by alpha (Yin et al., 2025) over a "
                   "point-estimate optimizer: a baseline of the paper; it learns no posterior."),
    "none": ("Trainer's optimizer", "a point estimate; no posterior."),
}


def template_path() -> Path:
    """``hf_ivonpc/model_cards/posterior_model_card.md`` (package data)."""
    path = Path(__file__).resolve().parent / "model_cards" / TEMPLATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"model card template {path} is missing: reinstall hf_ivonpc")
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.6g}"
    return str(v)


def _table(rows, header=("name", "value")) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


#: fields the card lists in its common rows
_LISTED_BELOW = ("eval_mc_samples", "pc_log_diagnostics")


def _hyperparameters(trainer) -> str:
    args = trainer.args
    method = args.pc_method
    opt = trainer.pc_optimizer
    steps = trainer.state.global_step
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    rows = []
    if method in ("ivon", "ivon_pcm"):
        if opt is not None:
            ess = opt.param_groups[0]["ess"]
        elif args.ivon_ess is not None or trainer.train_dataset is None:
            ess = args.ivon_ess if args.ivon_ess is not None else "default (likelihood terms in the data)"
        else:
            ess = trainer.resolved_ess()
        rows.append(("learning_rate", args.learning_rate, "eta, the step size of Alg. 4 (not rescaled by hess_init)"))
    # every hyperparameter of the method, with the first sentence of its help (optim.hparams)
    for h in HPARAMS:
        if h.field and method in h.methods and h.field not in _LISTED_BELOW:
            value = ess if h.field == "ivon_ess" else getattr(args, h.field)
            if value is None and opt is not None and h.kwarg in opt.param_groups[0]:
                value = opt.param_groups[0][h.kwarg]   # resolved for the run
            if h.field == "pc_start_step" and opt is not None:
                value = opt.start_step
            rows.append((h.field, value, h.summary))
    if method == "alpha_svrg" and opt is not None:
        rows += [("base optimizer", {"sgd": "SGD"}.get(opt.base, "AdamW"), "the point-estimate "
                  "optimizer under the correction, chosen from optim")]
    if method in ("alpha_svrg", "none"):
        rows += [("optim", str(getattr(args.optim, "value", args.optim)), "Trainer's optim argument"),
                 ("learning_rate", args.learning_rate, ""),
                 ("adam_beta1, adam_beta2, adam_epsilon",
                  f"{args.adam_beta1}, {args.adam_beta2}, {args.adam_epsilon}", "when the optimizer is Adam-like"),
                 ("weight_decay", args.weight_decay, "")]
    rows += [("lr_scheduler_type", str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)), ""),
             ("warmup_steps", args.warmup_steps, ""),
             ("per_device_train_batch_size", args.per_device_train_batch_size, ""),
             ("gradient_accumulation_steps", args.gradient_accumulation_steps, ""),
             ("processes", args.world_size, ""),
             ("total batch size", batch, "examples per optimizer step"),
             ("optimizer steps", steps, ""),
             ("max_grad_norm", args.max_grad_norm, "clipping of each micro-batch's gradient at its share"),
             ("precision", "bf16" if args.bf16 else "fp32", ""),
             ("eval_mc_samples", args.eval_mc_samples, "0: evaluated at the mean; k: predictive over k draws"),
             ("seed", args.seed, "")]
    return _table(rows, header=("hyperparameter", "value", "meaning"))


def _training_data(trainer, dataset) -> str:
    if dataset:
        names = [dataset] if isinstance(dataset, str) else list(dataset)
        lines = [f"- {', '.join(names)}"]
    else:
        lines = []
    for label, ds in (("training", trainer.train_dataset), ("evaluation", trainer.eval_dataset)):
        if ds is None or isinstance(ds, dict):
            continue
        name = getattr(getattr(ds, "info", None), "dataset_name", None) or type(ds).__name__
        size = f"{len(ds):,} examples" if hasattr(ds, "__len__") else "a stream"
        lines.append(f"- {label} set: {size} (`{name}`)")
    return "\n".join(lines) if lines else "Not recorded."


def _metrics(trainer) -> str:
    history = trainer.state.log_history
    skip = ("runtime", "per_second", "epoch", "step")
    rows = []
    train = [e for e in history if "loss" in e]
    if train:
        rows.append(("training loss (last logged)", train[-1]["loss"]))
    evals = [e for e in history if any(k.startswith("eval_") for k in e)]
    if evals:
        how = (f"posterior predictive over {trainer.args.eval_mc_samples} draws"
               if trainer.args.eval_mc_samples else "at the posterior mean")
        for k, v in evals[-1].items():
            if k.startswith("eval_") and not any(s in k for s in skip) and isinstance(v, (int, float)):
                rows.append((f"{k} ({how}, step {evals[-1].get('step', '?')})", v))
    return _table(rows, header=("metric", "value")) if rows else "No metrics were logged."


def _posterior_section(trainer, posterior, peft: bool) -> str:
    method = trainer.args.pc_method
    if method not in ("ivon", "ivon_pcm"):
        return (f"None: {METHODS[method][0]} learns a point estimate, so no `posterior.safetensors` "
                "is written. The weights are the trained point estimate.")
    if posterior is None:
        return "No posterior was saved with these weights (the optimizer did not exist yet)."
    scope = ("Only the LoRA adapter parameters carry a posterior (the base model is frozen). "
             if peft else "")
    wd = sorted({g["weight_decay"] for g in posterior.groups})
    ess = sorted({g["ess"] for g in posterior.groups})
    return (f"`posterior.safetensors` holds, per trainable parameter, the posterior standard deviation "
            f"sigma = 1 / sqrt(ess (h + delta)), IVON's Hessian estimate h and its momentum, after "
            f"{posterior.step} optimizer steps (ess = {', '.join(_fmt(e) for e in ess)}; delta = "
            f"{', '.join(_fmt(w) for w in wd)} by parameter group). The model's weights are the "
            f"posterior mean. {scope}sigma by layer type:\n\n{posterior.format_summary()}")


def _usage(trainer, repo: str, posterior, model) -> str:
    import transformers
    peft_config = getattr(model, "peft_config", None)
    base = model.get_base_model() if peft_config else model
    cls = type(base).__name__
    imp = cls if hasattr(transformers, cls) else "AutoModel"
    lines = [f"from transformers import {imp}"]
    if peft_config:
        base_id = getattr(next(iter(peft_config.values())), "base_model_name_or_path", None) or "BASE_MODEL"
        lines += ["from peft import PeftModel"]
    if posterior is not None:
        lines += ["from hf_ivonpc import Posterior"]
    lines.append("")
    if peft_config:
        lines += [f'base = {imp}.from_pretrained("{base_id}")',
                  f'model = PeftModel.from_pretrained(base, "{repo}")   # the adapter: the posterior mean']
    else:
        lines += [f'model = {imp}.from_pretrained("{repo}")   # the weights: the posterior mean']
    if posterior is None:
        return "\n".join(lines)
    lines += [f'posterior = Posterior.from_pretrained("{repo}", model=model)   # checks names, shapes, dtypes',
              "print(posterior.format_summary())",
              "",
              "inputs = ...   # a batch for the model, e.g. from its tokenizer",
              "with posterior.sample(model, seed=0):       # the weights are one draw from the posterior",
              "    outputs = model(**inputs)",
              "# output probabilities averaged over 8 draws (the posterior predictive)",
              "probs = posterior.predictive(model, inputs, n_samples=8)"]
    return "\n".join(lines)


def _trainer_description(trainer) -> str:
    """Which trainer wrote the card: ``PCTrainer`` over transformers' Trainer, or a combination
    with another library's trainer (TRL's), named with that library's version."""
    import sys
    mro = type(trainer).__mro__
    ours = next(c for c in mro if c.__module__.split(".")[0] == "hf_ivonpc")
    # the trainer the mixin is mixed into: the first class after ours that is not ours
    base = next(c for c in mro[mro.index(ours):] if c.__module__.split(".")[0] != "hf_ivonpc")
    ours = ours.__name__
    package = base.__module__.split(".")[0]
    if package == "transformers":
        return f"`{ours}`, a `transformers.Trainer` subclass"
    version = getattr(sys.modules.get(package), "__version__", "")
    return f"`{ours}`: {package.upper()}'s `{base.__name__}` ({package} {version}) with `PCTrainerMixin`"


def render_model_card(trainer, posterior=None, *, language=None, license=None, tags=None,
                      model_name=None, finetuned_from=None, tasks=None, dataset_tags=None,
                      dataset=None, dataset_args=None) -> str:
    """The card's text for a PCTrainer (``posterior``: what is saved next to the weights)."""
    from huggingface_hub import ModelCardData

    from ._version import __version__
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    peft = getattr(model, "peft_config", None) is not None
    method = args.pc_method
    title, description = METHODS[method]
    if method == "none":
        title = f"Trainer's optimizer `{getattr(args.optim, 'value', args.optim)}`"
    repo = (getattr(trainer, "hub_model_id", None) or args.hub_model_id or model_name
            or Path(args.output_dir).name)
    model_name = model_name or repo.split("/")[-1]
    tag_list = [tags] if isinstance(tags, str) else list(tags or [])
    for t in ["hf_ivonpc", method.replace("_", "-")] + (["variational-learning"] if posterior else []) \
            + list(getattr(model, "model_tags", None) or []):
        if t not in tag_list:
            tag_list.append(t)
    if finetuned_from is None:
        src = getattr(getattr(model.get_base_model() if peft else model, "config", None), "_name_or_path", "")
        finetuned_from = src if src and not os.path.isdir(src) and src.count("/") == 1 else None
    datasets = dataset_tags if dataset_tags is not None else dataset
    card_data = ModelCardData(language=language, license=license, library_name="peft" if peft else "transformers",
                              tags=tag_list, datasets=[datasets] if isinstance(datasets, str) else datasets,
                              base_model=finetuned_from)
    files = [("model.safetensors, config.json" if not peft else "adapter_model.safetensors, adapter_config.json",
              "the weights (the posterior mean when a posterior is saved), for `from_pretrained`")]
    if posterior is not None:
        files.append(("posterior.safetensors (or posterior-0000i-of-0000N[-b].safetensors shards with their index)",
                      "h and momentum per trainable parameter (sigma follows from h, ess and weight decay); "
                      "metadata in its header (method, ess, weight decay, hess_init, step, version)"))
    files.append(("README.md", "this card"))
    verb = "learned a diagonal Gaussian posterior over its weights" if posterior is not None else "was trained"
    values = dict(
        card_data=card_data.to_yaml(),
        model_name=model_name,
        method_sentence=(f"This model {verb} with **{title}**"
                         + (f", from [{finetuned_from}](https://huggingface.co/{finetuned_from})" if finetuned_from else "")
                         + (f" on {', '.join([dataset] if isinstance(dataset, str) else dataset)}" if dataset else "")
                         + "."),
        method_title=title, method_description=description[0].upper() + description[1:],
        library_version=__version__,
        trainer_description=_trainer_description(trainer),
        files_table=_table(files, header=("file", "content")),
        hyperparameters=_hyperparameters(trainer),
        training_data=_training_data(trainer, dataset),
        metrics=_metrics(trainer),
        posterior_section=_posterior_section(trainer, posterior, peft),
        usage=_usage(trainer, repo, posterior, model),
    )
    return string.Template(template_path().read_text(encoding="utf-8")).substitute(values)
