"""PCTrainer inside TRL (``hf_ivonpc.trl``): the combined configurations keep TRL's defaults,
SFT and DPO train with IVON-PCM on a tiny Llama with a character tokenizer, TRL's metrics count
each real micro-batch once, the card follows the posterior, and online trainers are refused."""

import dataclasses
import math
import os
import pickle

import pytest

trl = pytest.importorskip("trl", reason="TRL comes with the tasks and trl extras: pip install 'hf_ivonpc[trl]'")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import HfArgumentParser, TrainingArguments  # noqa: E402

from hf_ivonpc import PCTrainingArguments  # noqa: E402
from hf_ivonpc.trainer import PCTrainerMixin  # noqa: E402
from hf_ivonpc.trl import PCDPOConfig, PCDPOTrainer, PCSFTConfig, PCSFTTrainer  # noqa: E402

from _tiny_lm import TEXT, VOCAB  # noqa: E402

PAIRS = [(PCSFTConfig, trl.SFTConfig), (PCDPOConfig, trl.DPOConfig),
         (PCTrainingArguments, TrainingArguments)]


def _tokenizer():
    """A character tokenizer over the tiny corpus (no download)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(VOCAB)}}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(VOCAB) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=1))


def _lines(n):
    return [line.strip() for line in TEXT.splitlines() if len(line.strip()) > 30][:n]


def _sft_data(n=16):
    lines = _lines(n)
    return Dataset.from_dict({"prompt": [s[:10] for s in lines], "completion": [s[10:30] for s in lines]})


def _dpo_data(n=16):
    lines = _lines(n)
    return Dataset.from_dict({"prompt": [s[:10] for s in lines], "chosen": [s[10:22] for s in lines],
                              "rejected": [s[10:22][::-1] for s in lines]})


def _run_args(tmp_path, **over):
    """A short CPU run: one epoch of 16 examples in 4 steps, the correction from step 1."""
    kw = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[],
              use_cpu=True, bf16=False, gradient_checkpointing=False, logging_steps=2,
              save_strategy="no", pc_start_step=1, pc_refresh_steps=2, pc_megabatch_factor=2,
              seed=0, disable_tqdm=True)
    kw.update(over)
    return kw


# ---------------------------------------------------------------------------------- configurations
@pytest.mark.parametrize("pc_cls, base_cls", PAIRS, ids=lambda c: c.__name__)
def test_configs_keep_the_base_defaults_and_ivons_learning_rate(pc_cls, base_cls):
    base = base_cls(output_dir="out", use_cpu=True)
    for method in ("ivon", "ivon_pcm", "alpha_svrg", "none"):
        pc = pc_cls(output_dir="out", use_cpu=True, pc_method=method)
        changed = [f.name for f in dataclasses.fields(base)
                   if f.name != "learning_rate" and getattr(pc, f.name) != getattr(base, f.name)]
        assert not changed, (method, changed)
        want = 1.0 if method in ("ivon", "ivon_pcm") else base.learning_rate
        assert pc.learning_rate == want, (method, pc.learning_rate)
    if base_cls is not TrainingArguments:   # TRL's own defaults, which a full-class merge loses
        assert (base.logging_steps, base.gradient_checkpointing, base.bf16) == (10, True, True)


@pytest.mark.parametrize("cls", [PCSFTConfig, PCDPOConfig])
@pytest.mark.parametrize("name, value, accepted", [
    ("pc_method", "adamw", "one of"), ("pc_alpha", -0.5, "a finite number >= 0"),
    ("pc_refresh_steps", 0, "an integer >= 1"), ("pc_rho1", 1.5, "[0, 1]"),
    ("eval_mc_samples", -1, "an integer >= 0")])
def test_configs_reject_bad_values(cls, name, value, accepted):
    with pytest.raises(ValueError, match=rf"{name}={value!r} is invalid: accepted range is .*"
                                         rf"{accepted.replace('[', '.').replace(']', '.')}"):
        cls(output_dir="out", use_cpu=True, **{name: value})


def test_dpo_refuses_the_posterior_predictive_in_evaluation():
    with pytest.raises(ValueError, match=r"eval_mc_samples=2 is invalid with DPO: accepted range is 0"):
        PCDPOConfig(output_dir="out", use_cpu=True, eval_mc_samples=2)
    PCSFTConfig(output_dir="out", use_cpu=True, eval_mc_samples=2)   # defined for SFT's loss


@pytest.mark.parametrize("cls", [PCSFTConfig, PCDPOConfig])
def test_configs_round_trip_through_the_parser_and_pickling(cls):
    flags = dict(output_dir="out", use_cpu=True, pc_method="ivon_pcm", pc_alpha=0.25,
                 pc_megabatch_factor=4, ivon_beta2=0.999, pc_state_dtype="bfloat16",
                 pc_shared_noise=False, logging_steps=3)
    cli = []
    for k, v in flags.items():
        cli += [f"--{k}"] if v is True else ([f"--no_{k}"] if v is False else [f"--{k}", str(v)])
    (parsed,) = HfArgumentParser(cls).parse_args_into_dataclasses(cli)
    direct = cls(**flags)
    assert type(parsed) is cls
    assert dataclasses.asdict(parsed) == dataclasses.asdict(direct)
    assert (parsed.pc_alpha, parsed.ivon_beta2, parsed.pc_shared_noise, parsed.learning_rate) == (0.25, 0.999, False, 1.0)
    # Trainer pickles its arguments into every checkpoint (training_args.bin), without the token
    direct.hub_token = "secret"
    back = pickle.loads(pickle.dumps(direct))
    assert type(back) is cls and back.hub_token is None
    assert dataclasses.asdict(back) == {**dataclasses.asdict(direct), "hub_token": None}


# ---------------------------------------------------------------------------------- SFT
def test_pc_method_none_gives_plain_sfttrainers_losses(tmp_path):
    common = dict(max_steps=3, logging_steps=1, per_device_train_batch_size=4, report_to=[],
                  use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no",
                  seed=0, disable_tqdm=True)
    losses = []
    for trainer_cls, config_cls, extra in ((trl.SFTTrainer, trl.SFTConfig, {}),
                                           (PCSFTTrainer, PCSFTConfig, {"pc_method": "none"})):
        args = config_cls(output_dir=str(tmp_path / trainer_cls.__name__), **common, **extra)
        trainer = trainer_cls(model=_llama(), args=args, train_dataset=_sft_data(), processing_class=_tokenizer())
        trainer.train()
        losses.append([(e["loss"], e["mean_token_accuracy"], e["num_tokens"])
                       for e in trainer.state.log_history if "loss" in e])
    assert len(losses[0]) == 3 and losses[0] == losses[1]


def test_ivon_pcm_sft_logs_the_true_token_count_saves_the_posterior_and_its_card(tmp_path, eager_kernels):
    data = _sft_data(16)
    args = PCSFTConfig(**_run_args(tmp_path, save_strategy="steps", save_steps=4, eval_mc_samples=2))
    trainer = PCSFTTrainer(model=_llama(), args=args, train_dataset=data, eval_dataset=_sft_data(8),
                           processing_class=_tokenizer())
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert trainer.pc_optimizer.correction_active and trainer.pc_optimizer.refreshes == 2
    assert {"pc/grad_var_ratio", "pc/megabatch_loss", "pc/sigma_mean"} <= set(logs[-1])
    # one epoch in 4 steps: every example's tokens once, not again for theta_out or the mega-batch
    assert logs[-1]["num_tokens"] == sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    # TRL's card, written at the checkpoint, describes the checkpoint's posterior
    card = (tmp_path / "README.md").read_text()
    assert "`PCSFTTrainer`: TRL's `SFTTrainer`" in card and "IVON-PCM" in card
    assert "`posterior.safetensors` holds" in card and "after 4 optimizer steps" in card
    (tmp_path / "README.md").unlink()
    trainer.save_model()   # into output_dir: the weights, the posterior, then the card
    assert (tmp_path / "posterior.safetensors").is_file()
    assert "`posterior.safetensors` holds" in (tmp_path / "README.md").read_text()
    trainer.create_model_card(dataset_name="tiny-readme-lines", tags=["tiny"])   # TRL's signature
    card = (tmp_path / "README.md").read_text()
    assert "tiny-readme-lines" in card and "- tiny" in card and "- sft" in card
    assert "`posterior.safetensors` holds" in card and "No posterior" not in card
    # the posterior predictive over 2 draws: a token NLL, with SFT's metrics of the predictive
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert 0 <= metrics["eval_mean_token_accuracy"] <= 1 and metrics["eval_entropy"] > 0


# ---------------------------------------------------------------------------------- DPO
@pytest.mark.parametrize("reference", ["ref_model", "lora_disabled_adapters", "precomputed"])
def test_dpo_trains_with_ivon_pcm(tmp_path, eager_kernels, reference):
    model, ref_model, over = _llama(), None, {}
    if reference == "ref_model":
        ref_model = _llama()
        ref_before = [p.detach().clone() for p in ref_model.parameters()]
    elif reference == "lora_disabled_adapters":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
        base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    else:
        over["precompute_ref_log_probs"] = True
    # one epoch of 8 pairs in 2 steps, the correction (and a refresh) from step 1
    args = PCDPOConfig(**_run_args(tmp_path, max_steps=2, **over))
    trainer = PCDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=_dpo_data(8),
                           eval_dataset=_dpo_data(4), processing_class=_tokenizer())
    assert trainer.likelihood_terms() == 8   # preference pairs, not tokens
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert trainer.pc_optimizer.correction_active and trainer.pc_optimizer.refreshes == 1
    assert all(math.isfinite(e["loss"]) for e in logs)
    assert {"pc/grad_var_ratio", "rewards/accuracies", "rewards/margins"} <= set(logs[-1])
    ds = trainer.train_dataset
    pairs = zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])
    assert logs[-1]["num_tokens"] == sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs)
    if reference == "ref_model":
        assert all(torch.equal(a, b) for a, b in zip(ref_before, ref_model.parameters()))
        metrics = trainer.evaluate()
        assert "eval_loss" in metrics and "eval_rewards/accuracies" in metrics
        assert "eval_perplexity" not in metrics   # exp of a DPO loss means nothing
    if reference == "lora_disabled_adapters":
        assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if "lora_" not in n)
        assert {n for g in trainer.pc_optimizer.param_groups for p in g["params"]
                for n, q in model.named_parameters() if q is p} <= {n for n, _ in model.named_parameters() if "lora_" in n}


# ---------------------------------------------------------------------------------- refusals
def _online_trainers():
    out = [trl.GRPOTrainer, trl.RLOOTrainer]
    try:
        from trl.experimental.online_dpo import OnlineDPOTrainer
        out.append(OnlineDPOTrainer)
    except Exception:  # an experimental module that needs more than the core install
        pass
    return out


@pytest.mark.parametrize("online", _online_trainers(), ids=lambda c: c.__name__)
def test_online_trainers_are_refused_when_combined(online):
    with pytest.raises(TypeError, match=rf"PCTrainerMixin into {online.__name__}.*generates its "
                                        r"training batches inside the training step.*Supported: "):
        type(f"PC{online.__name__}", (PCTrainerMixin, online), {})


def test_an_sft_trainer_needs_the_combined_config(tmp_path):
    args = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[])
    with pytest.raises(ValueError, match="args is a SFTConfig: PCSFTTrainer needs PCSFTConfig"):
        PCSFTTrainer(model=_llama(), args=args, train_dataset=_sft_data(4), processing_class=_tokenizer())
    assert os.path.isdir(tmp_path)


def test_readme_trl_example_runs(tmp_path, eager_kernels):
    import re
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    [code] = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "PCSFTTrainer(" in b]
    # the same code, shortened for CPU: two steps, a local output folder
    code = code.replace('output_dir="out"', f'output_dir="{tmp_path}", use_cpu=True, bf16=False, max_steps=2, '
                        'report_to=[], gradient_checkpointing=False, save_strategy="no", '
                        'pc_megabatch_factor=2, per_device_train_batch_size=4, disable_tqdm=True')
    ns = dict(model=_llama(), dataset=_sft_data(8), tokenizer=_tokenizer())
    exec(compile(code, "README.md", "exec"), ns)
    opt = ns["trainer"].pc_optimizer
    assert type(opt).__name__ == "IVONPC" and opt.correction_active   # pc_start_ratio 0.1 of 2 steps: from step 1


@pytest.mark.parametrize("template", [True, False], ids=["chat_template", "plain"])
def test_workload_data_through_trl_gives_the_tokens_the_project_prepared(tmp_path, template):
    """The workloads' data (``sft.chat_dataset``) as PCSFTTrainer prepares it: the
    prompt is exactly what greedy generation feeds the model (``encode_prompt(build_prompt(..))``),
    then the completion and EOS, as the project's own preparation wrote them before the workloads
    moved to TRL; with a chat template, the template's newline after its end-of-turn token follows
    (TRL renders the whole conversation). The loss is on the completion only unless
    ``completion_only_loss=False``; ``max_length`` cuts; padding is on the right and carries no
    loss, on the offline SmolLM2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_ivonpc.tasks import sft
    tok = sft.load_tokenizer("smollm2")
    if not template:
        tok = tok.__class__.from_pretrained(sft.model_path("smollm2"))
        tok.chat_template, tok.pad_token = None, tok.eos_token
    messages = ["What is 2 + 3?", "Summarize in one sentence: The cat sat on the mat, then it slept.",
                "Name a colour."]
    completions = ["#### 5", "A cat slept on a mat.", " Blue"]
    before = []    # the project's own preparation: prompt + completion + EOS
    for m, c in zip(messages, completions):
        p = sft.encode_prompt(tok, sft.build_prompt(tok, m))
        before.append((p, p + tok(c + tok.eos_token, add_special_tokens=False)["input_ids"]))
    tail = tok("\n", add_special_tokens=False)["input_ids"] if template else []

    def prepared(**over):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=16,
                                             num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1))
        args = PCSFTConfig(output_dir=str(tmp_path), pc_method="none", use_cpu=True, bf16=False, report_to=[], **over)
        return PCSFTTrainer(model=model, args=args, processing_class=tok,
                            train_dataset=sft.chat_dataset(tok, messages, completion=completions))

    trainer = prepared()
    rows = [trainer.train_dataset[i] for i in range(3)]
    for (p, ids), row in zip(before, rows):
        assert row["input_ids"] == ids + tail
        assert row["labels"] == [-100] * len(p) + row["input_ids"][len(p):]
    everywhere = prepared(completion_only_loss=False).train_dataset
    assert [everywhere[i]["labels"] for i in range(3)] == [r["input_ids"] for r in rows]
    (p, _), cut = before[0], prepared(max_length=len(before[0][0]) + 2).train_dataset[0]
    assert cut["input_ids"] == rows[0]["input_ids"][:len(p) + 2]
    batch = trainer.data_collator(rows)
    short = min(range(3), key=lambda i: len(rows[i]["input_ids"]))
    n = len(rows[short]["input_ids"])
    assert batch["attention_mask"][short].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert batch["labels"][short, n:].eq(-100).all()
