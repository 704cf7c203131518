"""Every shipped config parses against its workload and starts: it builds its trainer and trains
three steps on a tiny model on CPU (sizes, data and GPU-only switches overridden; the optimizer,
schedule and correction settings as the file gives them). Config mistakes fail clearly."""

import math

import pytest

from hf_ivonpc import PCTrainingArguments
from hf_ivonpc.tasks import continual, dpo, gsm8k, mcqa, pretrain, vit, xsum
from hf_ivonpc.tasks.cli import CONFIGS, ConfigError, list_configs, parse_args, read_config

from _tiny_lm import save_tiny_llama

# config-name prefix -> (workload module, its arguments dataclass)
WORKLOADS = {"pretrain": (pretrain, pretrain.PretrainArguments),
             "continual": (continual, continual.ContinualArguments),
             "xsum": (xsum, xsum.XsumArguments), "gsm8k": (gsm8k, gsm8k.GSM8kArguments),
             "dpo": (dpo, dpo.DPOArguments), "vit": (vit, vit.ViTArguments), "mcqa": (mcqa, mcqa.MCQAArguments)}
CONFIG_NAMES = sorted(list_configs())


def test_every_config_belongs_to_a_workload():
    assert len(CONFIG_NAMES) >= 25 and not any(n.startswith("base") for n in CONFIG_NAMES)
    for name in CONFIG_NAMES:
        assert name.split("_")[0] in WORKLOADS, name


# ------------------------------------------------------------------------- every config starts
COMMON = ["--max_steps", "3", "--bf16", "false", "--use_cpu", "true", "--dataloader_num_workers", "0",
          "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "1",
          "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--disable_tqdm", "true",
          "--push_to_hub", "false"]


@pytest.fixture(autouse=True)
def _eager(eager_kernels):
    """The configs' plumbing is under test here: the tiny models' embeddings run the eager
    kernels, sparing the suite a compilation per new combination of flags."""


@pytest.fixture(scope="module")
def tiny_causal_lm(tmp_path_factory):
    """A two-layer Llama with SmolLM2's tokenizer, saved as a local model folder (two layers: the
    multiple-choice offline default's adapters sit on the top layers, above a frozen trunk)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), max_positions=128, num_layers=2)


@pytest.fixture(scope="module")
def tiny_clip_dir():
    from hf_ivonpc.data.tiny_clip import tiny_clip

    return str(tiny_clip("digits", steps=3, log=None))


def _overrides(prefix: str, tmp, lm: str, clip: str) -> list[str]:
    data = tmp.parent / f"data-{prefix}"   # prepared once per workload (the folder is reused)
    if prefix == "pretrain":
        return ["--dataset", "shakespeare", "--data_dir", str(data), "--n_layer", "1", "--n_head", "2",
                "--n_embd", "16", "--block_size", "16", "--max_eval_windows", "2", "--num_train_windows", "96"]
    if prefix == "continual":
        return ["--model_name_or_path", lm, "--dataset", "aclsum", "--data_dir", str(data),
                "--block_size", "16", "--max_eval_windows", "2", "--num_train_windows", "96"]
    if prefix == "xsum":
        return ["--model_name_or_path", lm, "--dataset", "aclsum", "--train_split", "train",
                "--eval_split", "test", "--model_dtype", "float32", "--max_train_samples", "24",
                "--max_eval_samples", "2", "--max_predict_samples", "1", "--max_source_length", "32",
                "--max_target_length", "8"]
    if prefix == "gsm8k":
        return ["--model_name_or_path", lm, "--dataset", "gsm_symbolic", "--model_dtype", "float32",
                "--max_train_samples", "24", "--max_eval_samples", "2", "--max_predict_samples", "1",
                "--max_length", "48"]
    if prefix == "dpo":
        return ["--model_name_or_path", lm, "--max_train_samples", "12", "--max_eval_samples", "2",
                "--max_length", "128", "--lora_top_layers", "1"]
    if prefix == "mcqa":
        return ["--model_name_or_path", lm, "--model_dtype", "float32", "--max_train_samples", "24",
                "--selection_size", "4", "--max_eval_samples", "2"] + (["--lora_top_layers", "1"] if "offline" in tmp.name else [])
    return ["--model_name_or_path", clip, "--dataset", "textiles", "--max_train_samples", "32",
            "--max_eval_samples", "4", "--zero_shot_eval", "false"]


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_starts(name, tmp_path_factory, tiny_causal_lm, tiny_clip_dir):
    prefix = name.split("_")[0]
    module, cls = WORKLOADS[prefix]
    tmp = tmp_path_factory.mktemp(name)
    argv = ["--config", name, "--output_dir", str(tmp)] + COMMON + _overrides(prefix, tmp, tiny_causal_lm,
                                                                             tiny_clip_dir)
    # the TRL workloads take TRL's configuration with the variational fields, the others PCTrainingArguments
    training_arguments = getattr(module, "training_arguments", lambda: PCTrainingArguments)()
    args, targs = parse_args((cls, training_arguments), None, argv)
    file = read_config(CONFIGS / f"{name}.yaml")
    assert targs.pc_method == file.get("pc_method", "ivon_pcm") and targs.output_dir == str(tmp)  # flags win
    if "offline" in name:   # the offline defaults run on a CPU as they are
        assert not file.get("bf16", False) and file.get("report_to", "none") in ([], ["none"], "none")
    trainer, report = module.build_trainer(args, targs)
    trainer.train()
    assert trainer.state.global_step == 3
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
    if targs.pc_method in ("ivon_pcm", "alpha_svrg"):   # a config's correction starts within 3 steps
        assert trainer.pc_optimizer.refreshes >= 1, f"{name}: the correction never started"
    assert set(report) >= {"dataset", "plot_keys"}


def test_bases_merge_and_fail_clearly(tmp_path):
    (tmp_path / "parent.yaml").write_text("max_steps: 3\nlearning_rate: 0.1\n")
    (tmp_path / "child.yaml").write_text("base: parent\nlearning_rate: 0.2\n")
    assert read_config(tmp_path / "child.yaml") == {"max_steps": 3, "learning_rate": 0.2}
    (targs,) = parse_args((PCTrainingArguments,), tmp_path / "child.yaml", ["--output_dir", str(tmp_path)])
    assert (targs.max_steps, targs.learning_rate) == (3, 0.2)
    (tmp_path / "loop.yaml").write_text("base: loop\n")
    with pytest.raises(ConfigError, match="cycle"):
        read_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: nowhere\n")
    with pytest.raises(ConfigError, match="base: nowhere: no such config"):
        read_config(tmp_path / "orphan.yaml")


def test_unknown_key_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_stepz: 3\n")
    with pytest.raises(ConfigError, match="'max_stepz' is not an argument.*max_steps"):
        parse_args((PCTrainingArguments,), bad, [])
    with pytest.raises(ConfigError, match="--config nothing.yaml: no such file"):
        parse_args((PCTrainingArguments,), None, ["--config", "nothing.yaml"])
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        parse_args((PCTrainingArguments,), bad, [])
