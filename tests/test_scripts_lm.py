"""The pretraining and continual-pretraining workloads and data preparation on the offline corpora,
a handful of steps."""

import json
import math

import pytest
import torch

from transformers import AutoModelForCausalLM

from hf_ivonpc.data import prepare
from hf_ivonpc.tasks import continual, pretrain

# the scripts' plumbing is under test: the eager kernels (see conftest's ``eager_kernels``)
pytestmark = pytest.mark.usefixtures("eager_kernels")

MODEL = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32"]
TINY = MODEL + ["--block_size", "32", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--max_eval_windows", "8", "--eval_steps", "2", "--logging_steps", "1", "--save_steps", "4",
        "--pc_start_step", "2", "--pc_refresh_steps", "2", "--pc_megabatch_factor", "2",
        "--disable_tqdm", "true", "--use_cpu", "true"]


def test_prepare_data_then_pretrain_writes_results(tmp_path):
    data = tmp_path / "data"
    meta = prepare.main(["--dataset", "shakespeare", "--out", str(data)])
    assert meta["tokens"]["train"] > 1_000_000 and meta["vocab_size"] == 50257
    stamp = (data / "train.bin").stat().st_mtime_ns

    out = tmp_path / "out"
    metrics = pretrain.main(TINY + ["--data_dir", str(data), "--max_steps", "4",
                                                   "--output_dir", str(out)])
    assert (data / "train.bin").stat().st_mtime_ns == stamp        # prepared data is reused
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["eval_perplexity"] == metrics["eval_perplexity"]
    assert math.isclose(saved["eval_perplexity"], math.exp(saved["eval_loss"]), rel_tol=1e-9)
    assert saved["n_params"] > 1e6                                  # GPT-2's vocabulary dominates
    assert (out / "training_curves.png").stat().st_size > 1000
    card = (out / "README.md").read_text()
    assert "IVON-PCM" in card and "eval_perplexity" in card
    history = json.loads((out / "log_history.json").read_text())
    assert any("pc/g_out_norm" in r for r in history)               # the correction ran
    assert any("eval_perplexity" in r for r in history)             # and reached the logs
    model = AutoModelForCausalLM.from_pretrained(out)               # plain from_pretrained
    assert model.config.n_layer == 1 and (out / "checkpoint-4").is_dir()


def test_continual_pretraining_continues_the_posterior(tmp_path):
    """From a pretrain.py output: IVON starts from the saved h and momentum, not from
    ivon_hess_init, and the run completes with its results."""
    from hf_ivonpc import PCTrainingArguments, Posterior
    from hf_ivonpc.tasks.cli import parse_args

    src = tmp_path / "pre"
    pretrain.main(TINY + ["--data_dir", str(tmp_path / "shk"), "--max_steps", "3",
                                         "--pc_method", "ivon", "--ivon_hess_init", "0.5",
                                         "--ivon_beta2", "0.999",   # h stays near 0.5 in 3 steps
                                         "--output_dir", str(src)])
    saved = Posterior.from_pretrained(src)
    script = continual
    argv = TINY[len(MODEL):] + ["--model_name_or_path", str(src), "--dataset", "aclsum",
                                "--data_dir", str(tmp_path / "acl"), "--max_steps", "3",
                                "--ivon_hess_init", "1e-3", "--pc_method", "ivon_pcm",
                                "--output_dir", str(tmp_path / "cont")]
    trainer, _ = script.build_trainer(*parse_args((script.ContinualArguments, PCTrainingArguments), None, argv))
    opt = trainer.pc_optimizer
    for name, p in trainer.model.named_parameters():
        assert torch.equal(opt.state[p]["hess"], saved.hess[name]), name
        assert torch.equal(opt.state[p]["momentum"], saved.momentum[name]), name
    assert min(h.min().item() for h in saved.hess.values()) > 0.1   # far from the 1e-3 of a restart

    metrics = script.main(argv)
    assert "eval_perplexity" in metrics and (tmp_path / "cont" / "all_results.json").exists()
    assert (tmp_path / "cont" / "posterior.safetensors").exists()


def test_continual_finds_the_posterior_of_a_hub_repository(tmp_path, monkeypatch):
    """A Hub id gets its posterior.safetensors through the Hub cache; a repository (or, offline,
    an uncached one) without the file starts from ivon_hess_init; a local folder is looked into."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    cached = tmp_path / "hub" / "posterior.safetensors"
    cached.parent.mkdir()
    cached.write_bytes(b"")

    def download(repo_id, filename, **kw):
        assert filename == "posterior.safetensors"
        if repo_id == "org/gpt2-ivon":
            return str(cached)
        raise LocalEntryNotFoundError(f"{repo_id}/{filename} is not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert continual.posterior_file("org/gpt2-ivon") == str(cached)
    assert continual.posterior_file("org/gpt2-plain") is None
    assert continual.posterior_file(str(cached.parent)) == str(cached)
    assert continual.posterior_file(str(tmp_path)) is None
