"""Abstractive summarization: full fine-tuning of a causal LM with ``PCSFTTrainer`` (TRL's
``SFTTrainer``, IVON-PCM by default), evaluated by greedy decoding and ROUGE (App. D.4 of the
paper: Qwen2.5-0.5B-Instruct on XSUM).

    hf-ivonpc xsum                      # offline default: SmolLM2-135M on ACLSum, CPU
    accelerate launch -m hf_ivonpc xsum --config xsum_paper_ivon_pc
    hf-ivonpc xsum --pc_method none --learning_rate 1e-4 --output_dir results/xsum_adamw

The source (an article, or a paper's abstract for ACLSum) follows a one-line instruction in the
user turn, the summary is the assistant turn: TRL's prompt-completion data, to which TRL applies
the model's chat template; the loss is on the summary tokens (TRL's ``completion_only_loss``).
After training: the eval loss (and perplexity) on the test split and ROUGE-1/2/L F1 x 100
(``rouge_score``) of greedy summaries of the first ``max_predict_samples`` test sources, at the posterior mean. Writes
``all_results.json``, ``eval_predictions.jsonl``, ``log_history.json``, ``training_curves.png`` and
the model to ``--output_dir``; ``--eval_before_training`` adds the same figures for the model before fine-tuning
(``base_*`` keys).

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

from dataclasses import dataclass, field
from typing import Sequence

from transformers import set_seed

from .cli import run_workload
from .sft import (CausalLMArguments, build_prompt, generation_evaluator, load_causal_lm, load_split,
                  load_tokenizer, chat_dataset, truncate_text)

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


#: what follows the source in a prompt without a chat template
RESPONSE_PREFIX = "Summary:"


def summarization_message(tokenizer, source: str, instruction: str = DEFAULT_INSTRUCTION,
                          max_source_length: int | None = None) -> str:
    """The user turn: the instruction, a blank line and the source cut to ``max_source_length``
    tokens."""
    return f"{instruction}\n\n{truncate_text(tokenizer, source, max_source_length)}"


def summarization_prompt(tokenizer, source: str, instruction: str = DEFAULT_INSTRUCTION,
                         max_source_length: int | None = None) -> str:
    """Zero-shot prompt: :func:`summarization_message` as the user turn of the chat template."""
    return build_prompt(tokenizer, summarization_message(tokenizer, source, instruction, max_source_length),
                        response_prefix=RESPONSE_PREFIX)


def summarization_dataset(tokenizer, sources: Sequence[str], targets: Sequence[str],
                          instruction: str = DEFAULT_INSTRUCTION, max_source_length: int | None = 512,
                          max_target_length: int | None = 64):
    """Source -> summary pairs as TRL's prompt-completion data set (the target cut to
    ``max_target_length`` tokens for training; ROUGE reads the whole reference)."""
    messages = [summarization_message(tokenizer, s, instruction, max_source_length) for s in sources]
    completions = [truncate_text(tokenizer, t, max_target_length) for t in targets]
    return chat_dataset(tokenizer, messages, RESPONSE_PREFIX, completion=completions)


@dataclass
class XsumArguments(CausalLMArguments):
    dataset: str = field(default="aclsum", metadata={
        "help": "aclsum (offline: abstract -> one-sentence summary), EdinburghNLP/xsum (Hub), another "
                "Hub data set or a local .jsonl file"})
    dataset_config: str | None = field(default=None, metadata={"help": "configuration of a Hub data set"})
    train_split: str = field(default="train", metadata={
        "help": "training split (Hub data sets accept slices: the paper's is 'train[:50%]')"})
    eval_split: str = field(default="test", metadata={"help": "evaluation split"})
    source_column: str | None = field(default=None, metadata={
        "help": "text to summarize (default: 'abstract' for aclsum, 'document' otherwise)"})
    target_column: str | None = field(default=None, metadata={
        "help": "reference summary (default: 'approach' for aclsum, one of challenge/approach/outcome; "
                "'summary' otherwise)"})
    instruction: str = field(default=DEFAULT_INSTRUCTION, metadata={
        "help": "instruction put before the source in the user turn"})
    max_train_samples: int | None = field(default=None, metadata={"help": "first N training examples (None: all)"})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "first N evaluation examples for the eval loss (None: all)"})
    max_predict_samples: int | None = field(default=None, metadata={
        "help": "first N evaluation examples summarized by greedy decoding for ROUGE (None: all)"})
    max_source_length: int = field(default=512, metadata={"help": "tokens of the source kept"})
    max_target_length: int = field(default=64, metadata={"help": "tokens of the training summary kept"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest generated summary, in tokens"})
    eval_before_training: bool = field(default=False, metadata={
        "help": "also evaluate the model before fine-tuning (base_* metrics)"})


def build_trainer(args: XsumArguments, targs):
    """The data, the model and its ``PCSFTTrainer`` (``targs``: a ``PCSFTConfig``); the dict holds what :func:`train_and_report` needs
    to finish the run (the generation metrics among them)."""
    tokenizer = load_tokenizer(args.model_name_or_path)
    columns = dict(source_column=args.source_column, target_column=args.target_column,
                   dataset_config=args.dataset_config)
    sources, targets = load_summaries(args.dataset, args.train_split, max_samples=args.max_train_samples,
                                        **columns)
    train = summarization_dataset(tokenizer, sources, targets, args.instruction, args.max_source_length,
                                  args.max_target_length)
    # the eval loss reads the first max_eval_samples examples, generation the first max_predict_samples
    sizes = (args.max_eval_samples, args.max_predict_samples)
    sources, targets = load_summaries(args.dataset, args.eval_split,
                                        max_samples=None if None in sizes else max(sizes), **columns)
    n = args.max_eval_samples
    val = summarization_dataset(tokenizer, sources[:n], targets[:n], args.instruction,
                                args.max_source_length, args.max_target_length)
    n = args.max_predict_samples
    prompts = [summarization_prompt(tokenizer, s, args.instruction, args.max_source_length)
               for s in sources[:n]]
    references = targets[:n]

    set_seed(targs.seed)
    model = load_causal_lm(args.model_name_or_path, args.model_dtype, args.attn_implementation)
    n_params = sum(p.numel() for p in model.parameters())
    if targs.process_index == 0:
        print(f"{type(model).__name__} {n_params / 1e6:.1f}M parameters; {len(train)} training and "
              f"{len(val)} evaluation examples ({args.dataset}); pc_method={targs.pc_method}")
    from ..trl import PCSFTTrainer

    trainer = PCSFTTrainer(model=model, args=targs, train_dataset=train, eval_dataset=val,
                           processing_class=tokenizer)

    evaluate = generation_evaluator(trainer, tokenizer, prompts, references, rouge, args.max_new_tokens)

    return trainer, dict(dataset=args.dataset, tags=("summarization",),
                         metrics={"n_params": n_params, "train_examples": len(train)},
                         evaluate=evaluate, before="base" if args.eval_before_training else None,
                         plot_keys=("loss", "eval_loss", "eval_rouge1", "eval_rougeL"))


def training_arguments():
    """The trainer's arguments: ``PCSFTConfig`` (TRL's ``SFTConfig`` with the variational fields)."""
    from ..trl import PCSFTConfig

    return PCSFTConfig


def main(argv=None) -> dict:
    return run_workload(XsumArguments, "xsum_offline", build_trainer, argv, training_arguments=training_arguments())
