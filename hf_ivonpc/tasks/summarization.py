"""Abstractive summarization with a causal LM (the paper's XSUM workload, App. D.4): data, prompts
and ROUGE.

Data sets:

- ``aclsum`` (offline default, installed from PyPI): 250 ACL papers (train 100 / val 50 /
  test 100). Source: the abstract; target: one of the three human-written one-sentence summaries,
  by default ``approach`` ("They propose ..."), the sentence saying what the paper does, the
  closest to XSUM's one-sentence "what is this article about" summaries.
- ``EdinburghNLP/xsum`` (the paper's; Hub access needed): ``document`` -> ``summary``; the paper
  trains on ``train[:50%]`` and tests on ``test``.
- any other Hub data set or a local .jsonl file, with ``source_column`` / ``target_column``.

ROUGE comes from ``rouge_score`` (``evaluate.load("rouge")`` downloads its script): F1 x 100 with
Porter stemming, averaged over examples (rouge_score's bootstrap aggregator would draw from
numpy's global RNG).
"""

from __future__ import annotations

from typing import Sequence

from .sft import PromptCompletionDataset, build_prompt, load_split, truncate_text

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
ACLSUM = "aclsum"
ACLSUM_TARGETS = ("challenge", "approach", "outcome")
ACLSUM_SOURCES = ("abstract", "body")
DEFAULT_INSTRUCTION = "Summarize the following text in one sentence."


def rouge(predictions: Sequence[str], references: Sequence[str],
          rouge_types: Sequence[str] = ROUGE_TYPES) -> dict[str, float]:
    """Mean ROUGE F1 x 100 of each prediction against its reference (stemmed, rouge_score's
    default tokenizer: lower-cased alphanumeric words)."""
    from rouge_score.rouge_scorer import RougeScorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("ROUGE of no predictions")
    scorer = RougeScorer(list(rouge_types), use_stemmer=True)
    totals = dict.fromkeys(rouge_types, 0.0)
    for pred, ref in zip(predictions, references):
        for k, s in scorer.score(ref, pred).items():  # target first
            totals[k] += s.fmeasure
    return {k: 100.0 * v / len(predictions) for k, v in totals.items()}


def load_summaries(dataset: str, split: str, source_column: str | None = None,
                   target_column: str | None = None, dataset_config: str | None = None,
                   max_samples: int | None = None) -> tuple[list[str], list[str]]:
    """(sources, targets) of one split, the first ``max_samples`` of them.

    ``aclsum``: splits train / val (or validation) / test; ``source_column`` abstract (default) or
    body; ``target_column`` challenge, approach (default) or outcome. Otherwise a Hub data set or a
    local .jsonl file (:func:`~hf_ivonpc.tasks.sft.load_split`), columns document / summary by
    default (XSUM's)."""
    if dataset == ACLSUM:
        from ..data import aclsum_papers

        src, tgt = source_column or "abstract", target_column or "approach"
        if src not in ACLSUM_SOURCES:
            raise ValueError(f"source_column={src!r} is invalid for aclsum: accepted values are {ACLSUM_SOURCES}")
        if tgt not in ACLSUM_TARGETS:
            raise ValueError(f"target_column={tgt!r} is invalid for aclsum: accepted values are {ACLSUM_TARGETS}")
        papers = aclsum_papers("val" if split == "validation" else split)[:max_samples]
        return [p[src] for p in papers], [p["summaries"][tgt] for p in papers]
    src, tgt = source_column or "document", target_column or "summary"
    ds = load_split(dataset, split, dataset_config, columns=(src, tgt))
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    return list(ds[src]), list(ds[tgt])


def summarization_prompt(tokenizer, source: str, instruction: str = DEFAULT_INSTRUCTION,
                         max_source_length: int | None = None) -> str:
    """Zero-shot prompt: the instruction, a blank line and the source cut to
    ``max_source_length`` tokens."""
    text = truncate_text(tokenizer, source, max_source_length)
    return build_prompt(tokenizer, f"{instruction}\n\n{text}", response_prefix="Summary:")


def summarization_dataset(tokenizer, sources: Sequence[str], targets: Sequence[str],
                          instruction: str = DEFAULT_INSTRUCTION, max_source_length: int | None = 512,
                          max_target_length: int | None = 64,
                          loss_on_prompt: bool = False) -> PromptCompletionDataset:
    """Tokenized prompt -> summary pairs (the target cut to ``max_target_length`` tokens for
    training; ``references`` keep it whole for ROUGE)."""
    prompts = [summarization_prompt(tokenizer, s, instruction, max_source_length) for s in sources]
    completions = [truncate_text(tokenizer, t, max_target_length) for t in targets]
    return PromptCompletionDataset(tokenizer, prompts, completions, loss_on_prompt=loss_on_prompt,
                                   references=targets)
