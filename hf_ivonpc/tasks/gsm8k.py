"""Math word problems (the paper's GSM8k workload, App. D.4): data, prompts and exact match.

Data sets:

- ``gsm_symbolic`` (offline default): reasoning-gym's generators built from GSM8k problems
  (GSM-Symbolic templates, 85 usable), each example a question and a GSM8k-style solution ending in
  ``#### N``. Train and test use disjoint templates, as GSM8k's train and test problems are
  distinct: every fifth template (17 of 85) is held out for the test split. Examples are drawn
  deterministically from a seed (train: ``seed``, test: ``seed + 1``). Reasoning-gym's suffix
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

import re
from decimal import Decimal, InvalidOperation
from typing import Sequence

from .sft import PromptCompletionDataset, build_prompt, load_split

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
    training templates, "test" from the held-out ones (see the module docstring)."""
    try:
        import reasoning_gym
        from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok
    except ImportError as e:
        from ..data import MissingDataError

        raise MissingDataError("the gsm_symbolic data needs reasoning-gym: run "
                               "`pip install reasoning-gym==0.1.25`") from e
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is invalid for gsm_symbolic: accepted values are 'train', 'test'")
    held_out = set(sorted(tasks_ok)[::HELD_OUT_EVERY])
    want_test = split == "test"
    # each example's template is drawn uniformly: about n / share examples give n of this split
    share = len(held_out) / len(tasks_ok) if want_test else 1 - len(held_out) / len(tasks_ok)
    size = int(n / share * 1.5) + 50
    ds = reasoning_gym.create_dataset(GSM_SYMBOLIC, size=size, seed=seed + want_test)
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


def gsm8k_dataset(tokenizer, questions: Sequence[str], solutions: Sequence[str],
                  max_length: int | None = 512, loss_on_prompt: bool = True) -> PromptCompletionDataset:
    """Tokenized question -> solution pairs; by default the loss covers input and output tokens,
    as in the paper's GSM8k runs."""
    prompts = [gsm8k_prompt(tokenizer, q) for q in questions]
    return PromptCompletionDataset(tokenizer, prompts, solutions, max_length=max_length,
                                   loss_on_prompt=loss_on_prompt)
