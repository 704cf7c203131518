"""Preference optimisation: DPO with LoRA on a causal LM through ``PCDPOTrainer`` (TRL's
``DPOTrainer``, IVON-PCM by default), evaluated by DPO's reward accuracy and preference loss on
held-out pairs (not in the paper: where preference tuning happens on the Hugging Face stack).

    hf-ivonpc dpo                       # offline default: SmolLM2-135M + LoRA, math preference pairs, CPU
    hf-ivonpc dpo --pc_method none --learning_rate 1e-4 --output_dir results/dpo_adamw
    hf-ivonpc dpo --dataset pairs.jsonl  # prompt / chosen / rejected columns

The prompt is the user turn and each response an assistant turn (TRL applies the model's chat
template). Only the LoRA adapters are trained (in the top two layers in the offline default, so
that the backward pass stops there); the reference policy is the model with its adapters
disabled, and its log-probabilities are computed once before training
(``precompute_ref_log_probs``, on in the offline default: otherwise every theta_out pass of the
corrected step runs the reference forward again). IVON's effective sample size counts preference
pairs. After training: DPO's evaluation on the held-out pairs (``eval_loss`` the preference loss,
``eval_rewards/accuracies`` the share of pairs whose chosen response has the larger implicit
reward, ``eval_rewards/margins``), written with the curves and the adapter to ``--output_dir``.

Data sets:

- ``gsm_symbolic`` (offline default): the math problems of ``hf-ivonpc gsm8k`` (reasoning-gym,
  train and test from disjoint templates) with the correct GSM8k-style solution as ``chosen`` and
  the same solution with its result changed as ``rejected`` (:func:`corrupt_solution`): the pair
  differs only in the numbers the arithmetic gets wrong, so preferring the chosen one means
  checking the arithmetic of a problem never seen.
- a Hub data set or a local .jsonl file with ``prompt``, ``chosen`` and ``rejected`` text columns.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Sequence

from .cli import run_workload
from .sft import LoRAArguments, chat_dataset, load_lora_model, load_split, load_tokenizer

GSM_SYMBOLIC = "gsm_symbolic"
COLUMNS = ("prompt", "chosen", "rejected")
#: how far a corrupted result moves from the right one
_OFFSETS = (1, 2, 3, 5, 10)


def corrupt_solution(solution: str, rng: random.Random) -> str:
    """``solution`` (ending in ``#### N``) with every standalone occurrence of its answer ``N``
    (also written with thousands commas) replaced by a wrong number (``N`` plus or minus one of :data:`_OFFSETS`, never negative when
    ``N`` is not): the final line and the steps that computed it say the same wrong thing."""
    body, answer = solution.rsplit("####", 1)
    answer = answer.strip()
    try:
        value = float(answer.replace(",", ""))
    except ValueError:
        raise ValueError(f"the solution's answer {answer!r} is not a number") from None
    choices = [value + s * d for d in _OFFSETS for s in (1, -1) if value < 0 or value + s * d >= 0]
    wrong = rng.choice(choices)
    integer = wrong == int(wrong) and "." not in answer
    wrong_text = str(int(wrong)) if integer else f"{wrong:g}"
    forms = {answer: wrong_text}
    if integer and abs(value) >= 1000:   # the steps may write 78000 as 78,000
        forms[f"{int(value):,}"] = f"{int(wrong):,}"
    for old, new in forms.items():
        body = re.sub(rf"(?<![\d.,]){re.escape(old)}(?!\d|[.,]\d)", new, body)
    return f"{body}#### {wrong_text}"


def preference_pairs(split: str, n: int, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """``n`` (question, correct solution, corrupted solution) triples of the gsm_symbolic problems
    (:func:`hf_ivonpc.tasks.gsm8k.gsm_symbolic_problems`: "train" and "test" from disjoint
    templates), the corruption drawn from ``seed``."""
    from .gsm8k import gsm_symbolic_problems

    questions, solutions = gsm_symbolic_problems(split, n, seed)
    rng = random.Random(f"{split}-{seed}")
    return questions, solutions, [corrupt_solution(s, rng) for s in solutions]


def load_pairs(dataset: str, split: str, max_samples: int | None = None, seed: int = 0,
               dataset_config: str | None = None) -> tuple[list[str], list[str], list[str]]:
    """(prompts, chosen, rejected) of one split, the first ``max_samples``; ``gsm_symbolic``
    generates them and needs ``max_samples``."""
    if dataset == GSM_SYMBOLIC:
        if max_samples is None:
            raise ValueError("gsm_symbolic generates its pairs: set max_train_samples / max_eval_samples")
        return preference_pairs(split, max_samples, seed)
    ds = load_split(dataset, split, dataset_config, columns=COLUMNS)
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    return tuple(list(ds[c]) for c in COLUMNS)


def preference_dataset(tokenizer, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str]):
    """The pairs as TRL's preference data set (conversational with a chat template)."""
    return chat_dataset(tokenizer, prompts, "Answer:", chosen=chosen, rejected=rejected)


@dataclass
class DPOArguments(LoRAArguments):
    dataset: str = field(default=GSM_SYMBOLIC, metadata={
        "help": "gsm_symbolic (offline: math problems, correct vs corrupted solutions; train and test "
                "from disjoint templates), or a Hub data set / local .jsonl file with prompt, chosen, "
                "rejected"})
    dataset_config: str | None = field(default=None, metadata={"help": "configuration of a Hub data set"})
    train_split: str = field(default="train", metadata={"help": "training split"})
    eval_split: str = field(default="test", metadata={"help": "evaluation split"})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "first N training pairs (None: all; gsm_symbolic generates N and needs it)"})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "first N evaluation pairs (None: all; gsm_symbolic generates N and needs it)"})
    eval_before_training: bool = field(default=False, metadata={
        "help": "also evaluate before training (base_* metrics: the policy equals its reference, so "
                "the rewards are 0 and the loss ln 2)"})


def build_trainer(args: DPOArguments, targs):
    """The pairs, the LoRA model and its ``PCDPOTrainer`` (``targs``: a ``PCDPOConfig``); the dict
    holds what :func:`~hf_ivonpc.tasks.cli.train_and_report` needs to finish the run."""
    tokenizer = load_tokenizer(args.model_name_or_path)
    common = dict(seed=targs.data_seed if targs.data_seed is not None else targs.seed,
                  dataset_config=args.dataset_config)
    train = preference_dataset(tokenizer, *load_pairs(args.dataset, args.train_split, args.max_train_samples, **common))
    val = preference_dataset(tokenizer, *load_pairs(args.dataset, args.eval_split, args.max_eval_samples, **common))

    model, n_params, n_trainable = load_lora_model(args, targs.seed)
    if targs.process_index == 0:
        print(f"{type(model.get_base_model()).__name__} + LoRA r={args.lora_r}: {n_trainable / 1e6:.2f}M "
              f"trainable of {n_params / 1e6:.1f}M parameters; {len(train)} training and {len(val)} "
              f"evaluation pairs ({args.dataset}); pc_method={targs.pc_method}")
    from ..trl import PCDPOTrainer

    trainer = PCDPOTrainer(model=model, args=targs, train_dataset=train, eval_dataset=val,
                           processing_class=tokenizer)
    # TRL drops the pairs whose prompt alone fills max_length: count what is trained on
    kept = {"train_pairs": len(trainer.train_dataset), "eval_pairs": len(trainer.eval_dataset)}
    for name, given in (("train_pairs", len(train)), ("eval_pairs", len(val))):
        if kept[name] < given and targs.process_index == 0:
            print(f"warning: {given - kept[name]} of {given} {name.split('_')[0]} pairs dropped: their prompt "
                  f"fills max_length={targs.max_length}")
    return trainer, dict(dataset=args.dataset, tags=("lora", "dpo"),
                         metrics={"n_params": n_params, "n_trainable_params": n_trainable, **kept},
                         before="base" if args.eval_before_training else None,
                         plot_keys=("loss", "eval_loss", "rewards/accuracies", "eval_rewards/accuracies"))


def training_arguments():
    """The trainer's arguments: ``PCDPOConfig`` (TRL's ``DPOConfig`` with the variational fields)."""
    from ..trl import PCDPOConfig

    return PCDPOConfig


def main(argv=None) -> dict:
    return run_workload(DPOArguments, "dpo_offline", build_trainer, argv, training_arguments=training_arguments())
