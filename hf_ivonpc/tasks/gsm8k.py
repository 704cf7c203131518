"""Math word problems: LoRA fine-tuning of a causal LM with ``PCSFTTrainer`` (TRL's ``SFTTrainer``,
IVON-PCM by default), evaluated zero-shot by greedy decoding and exact match (App. D.4 of the
paper: Llama-3.1-8B on GSM8k).

    hf-ivonpc gsm8k                     # offline default: SmolLM2-135M + LoRA on gsm_symbolic, CPU
    accelerate launch -m hf_ivonpc gsm8k --config gsm8k_paper_ivon_pc
    hf-ivonpc gsm8k --pc_method none --learning_rate 2e-4 --output_dir results/gsm8k_adamw

The question is the user turn and the solution, ending in ``#### N``, the assistant turn: TRL's
prompt-completion data, to which TRL applies the model's chat template (``Question\\nAnswer:\\n``
without one); as in the paper the loss covers input and output tokens (the configs set TRL's
``completion_only_loss`` false; true: the solution only). Only the LoRA adapters (peft) are
trained, so only they get optimizer and posterior state. After training: the eval loss on the
test split and the exact match (%) of the number after the last ``####`` of greedy solutions of
the first ``max_predict_samples`` test questions, at the posterior mean (plus the "flexible" last-
number match and the share of answers given in ``####`` form). Writes ``all_results.json``,
``eval_predictions.jsonl``, ``log_history.json``, ``training_curves.png`` and the adapter to
``--output_dir``; ``--eval_before_training`` adds the same figures before fine-tuning (``base_*``).

Data sets:

- ``gsm_symbolic`` (offline default): reasoning-gym's generators built from GSM8k problems
  (GSM-Symbolic templates, 85 usable), each example a question and a GSM8k-style solution ending in
  ``#### N``. Train and test use disjoint templates, as GSM8k's train and test problems are
  distinct: every fifth template (17 of 85) is held out for the test split. Examples are drawn
  deterministically from a seed (train: ``seed``, test: ``seed + 1``; ``validation``: the training
  templates under ``seed + 2``). Reasoning-gym's suffix
  "Give the result as your final answer. Do not include units." is removed (GSM8k has none), and
  the solution's final line is written ``#### <answer>`` with reasoning-gym's own answer (its
  solutions sometimes end in "8.0" where the answer is 8).
- ``openai/gsm8k`` (the paper's; Hub access needed), configuration ``main``: ``question`` ->
  ``answer`` (solution with ``<<...>>`` calculator annotations and ``#### N``).

Evaluation is zero-shot greedy decoding scored by exact match (:func:`extract_answer`): the number
after the LAST ``####`` of the generation, equal as a number to the reference's (``#### 72.``,
``#### $1,234``, ``#### -3``, ``#### 2.50`` are read as 72, 1234, -3, 2.5; no ``####`` or no
number after it is wrong). ``exact_match_flexible`` takes the last number anywhere in the
generation instead (lm-evaluation-harness's "flexible-extract"), which credits a model that has
not learned the ``####`` format; both are percentages.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Sequence

import numpy as np

from .cli import run_workload
from .sft import (LoRAArguments, build_prompt, generation_evaluator, load_lora_model, load_split,
                  load_tokenizer, chat_dataset)

GSM_SYMBOLIC = "gsm_symbolic"
#: reasoning-gym appends this to every question; GSM8k has nothing like it
_RG_SUFFIX = " Give the result as your final answer. Do not include units."
#: every HELD_OUT_EVERY-th usable template (in sorted order) is a test template
HELD_OUT_EVERY = 5

# an optional sign and/or dollar sign, then digits with thousands commas and decimals
_LEADING_NUMBER = re.compile(r"\s*(-?)\s*\$?\s*(-?)\s*(\d[\d,]*(?:\.\d+)?|\.\d+)")
_ANY_NUMBER = re.compile(r"(-?)\$?(\d[\d,]*(?:\.\d+)?)")


def _to_number(sign: str, digits: str) -> Decimal | None:
    try:
        value = Decimal(digits.replace(",", ""))
    except InvalidOperation:
        return None
    return -value if sign else value


def extract_answer(text: str | None) -> Decimal | None:
    """The number after the last ``####`` (commas, a ``$`` and a trailing period dropped), or None
    when there is no ``####`` or no number right after it."""
    if not text or "####" not in text:
        return None
    m = _LEADING_NUMBER.match(text.rsplit("####", 1)[1])
    return _to_number(m.group(1) or m.group(2), m.group(3)) if m else None


def extract_last_number(text: str | None) -> Decimal | None:
    """The last number anywhere in ``text`` (the "flexible" extraction)."""
    found = _ANY_NUMBER.findall(text or "")
    return _to_number(*found[-1]) if found else None


def reference_answer(reference: str) -> Decimal:
    """The reference's number: after its ``####`` (a GSM8k solution) or the whole text (a bare
    answer such as reasoning-gym's "28080")."""
    value = extract_answer(reference) if "####" in reference else extract_answer("####" + reference)
    if value is None:
        raise ValueError(f"the reference {reference[-80:]!r} holds no answer")
    return value


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Percent of predictions whose extracted answer equals the reference's, strict (``####``) and
    flexible (last number), and percent of predictions with a ``####`` answer at all."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("exact match of no predictions")
    strict = flexible = answered = 0
    for pred, ref in zip(predictions, references):
        gold = reference_answer(ref)
        got = extract_answer(pred)
        answered += got is not None
        strict += got is not None and got == gold
        last = extract_last_number(pred)
        flexible += last is not None and last == gold
    n = len(predictions) / 100.0
    return {"exact_match": strict / n, "exact_match_flexible": flexible / n, "answered": answered / n}


def gsm_symbolic_problems(split: str, n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` (question, solution) pairs from reasoning-gym's ``gsm_symbolic``: "train" from the
    training templates, "test" from the held-out ones (see the module docstring), "validation"
    from the training templates drawn under another seed (other instances of the templates trained
    on: a selection set that is neither trained on nor the test split)."""
    try:
        import reasoning_gym
        from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok
    except ImportError as e:
        from ..data import MissingDataError

        raise MissingDataError("the gsm_symbolic data needs reasoning-gym: run "
                               "`pip install reasoning-gym==0.1.25`") from e
    splits = ("train", "test", "validation")
    if split not in splits:
        raise ValueError(f"split={split!r} is invalid for gsm_symbolic: accepted values are {splits}")
    held_out = set(sorted(tasks_ok)[::HELD_OUT_EVERY])
    want_test = split == "test"
    # each example's template is drawn uniformly: about n / share examples give n of this split
    share = len(held_out) / len(tasks_ok) if want_test else 1 - len(held_out) / len(tasks_ok)
    size = int(n / share * 1.5) + 50
    ds = reasoning_gym.create_dataset(GSM_SYMBOLIC, size=size, seed=seed + splits.index(split))
    questions, solutions = [], []
    for i, template in enumerate(ds.task_indices):
        if (template in held_out) != want_test:
            continue
        entry = ds[i]
        question = entry["question"]
        if question.endswith(_RG_SUFFIX):
            question = question[: -len(_RG_SUFFIX)]
        steps = entry["metadata"]["answer_cot"].rsplit("####", 1)[0].rstrip()
        questions.append(question)
        solutions.append(f"{steps}\n#### {entry['answer']}")
        if len(questions) == n:
            return questions, solutions
    raise RuntimeError(f"only {len(questions)} of {n} gsm_symbolic {split} examples in {size} draws")


def load_problems(dataset: str, split: str, max_samples: int | None = None, seed: int = 0,
                  dataset_config: str | None = None) -> tuple[list[str], list[str]]:
    """(questions, solutions) of one split, the first ``max_samples`` of them. ``gsm_symbolic``
    needs ``max_samples`` (it generates that many); otherwise a Hub data set (``openai/gsm8k``,
    configuration ``main``) or a local .jsonl file with ``question`` and ``answer``."""
    if dataset == GSM_SYMBOLIC:
        if max_samples is None:
            raise ValueError("gsm_symbolic generates its examples: set max_train_samples / max_eval_samples")
        return gsm_symbolic_problems(split, max_samples, seed)
    config = dataset_config or ("main" if dataset.endswith("gsm8k") else None)
    ds = load_split(dataset, split, config, columns=("question", "answer"))
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    return list(ds["question"]), list(ds["answer"])


def gsm8k_prompt(tokenizer, question: str) -> str:
    """Zero-shot: the bare question as the user turn (or ``Question\\nAnswer:\\n`` without a chat
    template)."""
    return build_prompt(tokenizer, question, response_prefix="Answer:")


def gsm8k_dataset(tokenizer, questions: Sequence[str], solutions: Sequence[str]):
    """Question -> solution pairs as TRL's prompt-completion data set."""
    return chat_dataset(tokenizer, questions, "Answer:", completion=solutions)


@dataclass
class GSM8kArguments(LoRAArguments):
    dataset: str = field(default="gsm_symbolic", metadata={
        "help": "gsm_symbolic (offline, reasoning-gym; train and test from disjoint templates), "
                "openai/gsm8k (Hub) or a local .jsonl file with question/answer"})
    dataset_config: str | None = field(default=None, metadata={
        "help": "configuration of a Hub data set (default 'main' for gsm8k)"})
    train_split: str = field(default="train", metadata={"help": "training split"})
    eval_split: str = field(default="test", metadata={"help": "evaluation split"})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "first N training examples (None: all; gsm_symbolic generates N and needs it)"})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "first N evaluation examples for the eval loss (None: all)"})
    max_predict_samples: int | None = field(default=None, metadata={
        "help": "first N evaluation questions solved by greedy decoding for exact match (None: all)"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest generated solution, in tokens"})
    eval_before_training: bool = field(default=False, metadata={
        "help": "also evaluate the model before fine-tuning (base_* metrics)"})
    generate_samples: int = field(default=0, metadata={
        "help": "after training, also solve the max_predict_samples questions greedily at this many "
                "posterior draws (IVON methods) and report the majority answer's exact match, each "
                "draw's, and selective accuracy ranked by the draws' agreement (eval_vote_*); 0: off"})
    generate_sigma_scale: float = field(default=1.0, metadata={
        "help": "sigma multiplied by this in the draws of generate_samples (>= 0)"})

    def __post_init__(self):
        if not (isinstance(self.generate_samples, int) and self.generate_samples >= 0):
            raise ValueError(f"generate_samples={self.generate_samples!r} is invalid: accepted range is an "
                             "integer >= 0")
        if not (math.isfinite(self.generate_sigma_scale) and self.generate_sigma_scale >= 0):
            raise ValueError(f"generate_sigma_scale={self.generate_sigma_scale!r} is invalid: accepted range "
                             "is a finite number >= 0")


def vote_metrics(draw_texts: Sequence[Sequence[str]], references: Sequence[str],
                 prefix: str = "eval") -> tuple[dict[str, float], list[dict]]:
    """The vote of several posterior draws' solutions (``draw_texts`` [draw][question]): the
    majority of the draws' extracted answers (no answer is an answer too, and a wrong one), its
    agreement, and, ranking questions by agreement (answer the most agreed first), the AURC and
    the exact match of the 50% and 80% most agreed. Exact matches in percent; returns the metrics
    and one record per question."""
    from .. import uncertainty as U

    gold = [reference_answer(r) for r in references]
    answers = [[extract_answer(d[i]) for d in draw_texts] for i in range(len(references))]
    majority, agreement = U.vote(answers)
    correct = np.array([m is not None and m == g for m, g in zip(majority, gold)], dtype=float)
    per_draw = np.array([[a is not None and a == g for a in row] for row, g in zip(answers, gold)], dtype=float)
    metrics = {f"{prefix}_vote_exact_match": 100 * correct.mean(),
               f"{prefix}_vote_draw_exact_match": 100 * per_draw.mean(),
               f"{prefix}_vote_agreement_mean": float(agreement.mean()),
               f"{prefix}_vote_aurc": U.aurc(agreement, correct),
               f"{prefix}_vote_exact_match_at_50": 100 * U.accuracy_at_coverage(agreement, correct, 0.5),
               f"{prefix}_vote_exact_match_at_80": 100 * U.accuracy_at_coverage(agreement, correct, 0.8),
               f"{prefix}_vote_samples": len(draw_texts)}
    records = [{"answers": [None if a is None else str(a) for a in row],
                "majority": None if m is None else str(m), "agreement": float(a), "reference": str(g)}
               for row, m, a, g in zip(answers, majority, agreement, gold)]
    return metrics, records


def _with_vote(evaluate, trainer, tokenizer, prompts, references, args: GSM8kArguments):
    """``evaluate`` plus, after training ("eval"), the vote of ``generate_samples`` posterior draws
    (:func:`vote_metrics`), written to ``eval_vote.jsonl`` and ``eval_vote_risk_coverage.png``."""
    import time

    from .. import uncertainty as U
    from .sft import posterior_generate

    def with_vote(prefix: str) -> dict[str, float]:
        metrics = evaluate(prefix)
        if prefix != "eval":
            return metrics
        posterior = trainer.posterior()
        model = trainer.accelerator.unwrap_model(trainer.model)
        t = time.perf_counter()
        texts = posterior_generate(model, posterior, tokenizer, prompts, args.max_new_tokens, args.generate_samples,
                                   seed=trainer.args.seed, sigma_scale=args.generate_sigma_scale,
                                   batch_size=trainer.args.per_device_eval_batch_size,
                                   autocast=trainer.accelerator.autocast)
        seconds = time.perf_counter() - t
        vote, records = vote_metrics(texts, references, prefix)
        vote[f"{prefix}_vote_seconds_per_draw"] = seconds / args.generate_samples
        vote[f"{prefix}_vote_sigma_scale"] = args.generate_sigma_scale
        trainer.log(dict(vote))
        metrics.update(vote)
        if trainer.is_world_process_zero():
            out = Path(trainer.args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            greedy = [extract_answer(p["prediction"]) for p in map(json.loads, (out / f"{prefix}_predictions.jsonl").open())]
            with (out / f"{prefix}_vote.jsonl").open("w") as f:
                for r, g in zip(records, greedy):
                    f.write(json.dumps({**r, "greedy_at_mean": None if g is None else str(g)}) + "\n")
            correct = np.array([r["majority"] is not None and r["majority"] == r["reference"] for r in records], float)
            U.plot_risk_coverage({f"majority of {args.generate_samples} draws, by agreement":
                                  (np.array([r["agreement"] for r in records]), correct)},
                                 None, out / f"{prefix}_vote_risk_coverage.png",
                                 title=f"{out.name}: {len(records)} questions")
        return metrics
    return with_vote


def build_trainer(args: GSM8kArguments, targs):
    """The data, the model and its ``PCSFTTrainer`` (``targs``: a ``PCSFTConfig``); the dict holds what :func:`train_and_report` needs
    to finish the run (the generation metrics among them)."""
    if args.generate_samples and targs.pc_method not in ("ivon", "ivon_pcm"):
        raise ValueError(f"generate_samples={args.generate_samples} is invalid with pc_method="
                         f"{targs.pc_method!r}: accepted range is 0 (only IVON methods have a posterior)")
    tokenizer = load_tokenizer(args.model_name_or_path)
    common = dict(seed=targs.data_seed if targs.data_seed is not None else targs.seed,
                  dataset_config=args.dataset_config)
    questions, solutions = load_problems(args.dataset, args.train_split, args.max_train_samples, **common)
    train = gsm8k_dataset(tokenizer, questions, solutions)
    # the eval loss reads the first max_eval_samples examples, generation the first max_predict_samples
    sizes = (args.max_eval_samples, args.max_predict_samples)
    questions, solutions = load_problems(args.dataset, args.eval_split,
                                           None if None in sizes else max(sizes), **common)
    n = args.max_eval_samples
    val = gsm8k_dataset(tokenizer, questions[:n], solutions[:n])
    n = args.max_predict_samples
    prompts = [gsm8k_prompt(tokenizer, q) for q in questions[:n]]
    references = solutions[:n]

    model, n_params, n_trainable = load_lora_model(args, targs.seed)
    if targs.process_index == 0:
        print(f"{type(model.get_base_model()).__name__} + LoRA r={args.lora_r}: {n_trainable / 1e6:.2f}M "
              f"trainable of {n_params / 1e6:.1f}M parameters; {len(train)} training and {len(val)} "
              f"evaluation examples ({args.dataset}); pc_method={targs.pc_method}")
    from ..trl import PCSFTTrainer

    trainer = PCSFTTrainer(model=model, args=targs, train_dataset=train, eval_dataset=val,
                           processing_class=tokenizer)

    evaluate = generation_evaluator(trainer, tokenizer, prompts, references, exact_match, args.max_new_tokens)
    if args.generate_samples:
        evaluate = _with_vote(evaluate, trainer, tokenizer, prompts, references, args)

    return trainer, dict(dataset=args.dataset, tags=("lora", "gsm8k"),
                         metrics={"n_params": n_params, "n_trainable_params": n_trainable,
                                  "train_examples": len(train)},
                         evaluate=evaluate, before="base" if args.eval_before_training else None,
                         plot_keys=("loss", "eval_loss", "eval_exact_match"))


def training_arguments():
    """The trainer's arguments: ``PCSFTConfig`` (TRL's ``SFTConfig`` with the variational fields)."""
    from ..trl import PCSFTConfig

    return PCSFTConfig


def main(argv=None) -> dict:
    return run_workload(GSM8kArguments, "gsm8k_offline", build_trainer, argv, training_arguments=training_arguments())
