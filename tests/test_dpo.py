"""The DPO workload (``hf-ivonpc dpo``): the corrupted solutions by hand, the preference pairs
and their splits, and the offline default through ``PCDPOTrainer`` on the real SmolLM2-135M."""

import json
import random
import re

import pytest

from hf_ivonpc.tasks import dpo as D
from hf_ivonpc.tasks import gsm8k as G


def test_corrupt_solution_changes_the_result_wherever_the_steps_state_it():
    rng = random.Random(0)
    wrong = D.corrupt_solution("3 + 69 = 72 apples, 172 in all, 72,000 grains, $72.\n#### 72", rng)
    body, answer = wrong.rsplit("#### ", 1)
    assert answer != "72" and G.extract_answer(wrong) is not None
    # the result and its restatements change; other numbers that contain 72 do not
    assert body == f"3 + 69 = {answer} apples, 172 in all, 72,000 grains, ${answer}.\n"
    # an answer the steps write with thousands commas
    wrong = D.corrupt_solution("$488,000 - $410,000 = $78,000 more; 178,000 no.\n#### 78000", random.Random(1))
    new = int(wrong.rsplit("#### ", 1)[1])
    assert new != 78000 and wrong.startswith(f"$488,000 - $410,000 = ${new:,} more; 178,000 no.\n")
    # decimals keep their form; a non-negative answer never becomes negative
    assert G.extract_answer(D.corrupt_solution("x = 2.5\n#### 2.5", random.Random(2))) != G.extract_answer("#### 2.5")
    for seed in range(50):
        assert G.extract_answer(D.corrupt_solution("#### 0", random.Random(seed))) > 0
    with pytest.raises(ValueError, match="not a number"):
        D.corrupt_solution("#### five", rng)


def test_preference_pairs_differ_only_in_the_result_and_keep_the_splits_apart():
    q, chosen, rejected = D.preference_pairs("train", 12, seed=0)
    assert (q, chosen) == G.gsm_symbolic_problems("train", 12, seed=0)
    assert D.preference_pairs("train", 12, seed=0) == (q, chosen, rejected)      # deterministic
    skeleton = lambda s: re.sub(r"\d[\d,]*(\.\d+)?", "N", s)  # noqa: E731
    for c, r in zip(chosen, rejected):
        assert G.extract_answer(c) != G.extract_answer(r) and skeleton(c) == skeleton(r)
    # validation: other instances of the training templates, never the test templates
    qv, _ = G.gsm_symbolic_problems("validation", 40, seed=0)
    qt, _ = G.gsm_symbolic_problems("test", 200, seed=0)
    opening = lambda s: " ".join(s.split()[3:9])  # noqa: E731  (mostly a template's fixed words)
    train_openings = {opening(x) for x in G.gsm_symbolic_problems("train", 200, seed=0)[0]}
    assert not set(qv) & set(q)
    assert not {opening(x) for x in qv} & {opening(x) for x in qt}
    assert len({opening(x) for x in qv} & train_openings) >= 5
    with pytest.raises(ValueError, match="split='dev' is invalid"):
        G.gsm_symbolic_problems("dev", 2)


def test_dpo_offline_default_trains_the_adapters_with_ivon_pcm(tmp_path, eager_kernels):
    """The offline default's settings, shortened, on a two-layer Llama with SmolLM2's tokenizer and
    chat template (the real model's forward passes would only slow the test): IVON-PCM corrects,
    TRL's DPO metrics are logged, the reference is the disabled adapters with precomputed
    log-probabilities, the adapter and its posterior are saved and the card names both."""
    from _tiny_lm import save_tiny_llama

    out = tmp_path / "dpo"
    model = save_tiny_llama(tmp_path / "llama", max_positions=512, num_layers=2)   # adapters on the top two
    r = D.main(["--model_name_or_path", model, "--output_dir", str(out), "--max_steps", "2", "--max_train_samples", "4",
                "--max_eval_samples", "2", "--per_device_train_batch_size", "2", "--pc_megabatch_factor", "1",
                "--pc_refresh_steps", "1", "--pc_start_ratio", "0.5", "--lora_r", "2", "--max_length", "256",
                "--logging_steps", "1", "--disable_tqdm", "true"])
    assert r["train_pairs"] == 4 and r["eval_pairs"] == 2
    assert {"eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"} <= set(r)
    assert "eval_perplexity" not in r
    logs = json.loads((out / "log_history.json").read_text())
    assert any("pc/megabatch_loss" in h for h in logs) and any("rewards/accuracies" in h for h in logs)
    assert (out / "adapter_model.safetensors").exists() and (out / "posterior.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "ivon_pcm" in card.lower() or "IVON-PCM" in card
    assert "DPOTrainer" in card and "posterior.safetensors" in card
    from hf_ivonpc import Posterior
    post = Posterior.from_pretrained(str(out))
    assert post.groups[0]["ess"] == 1e7          # the offline config's
