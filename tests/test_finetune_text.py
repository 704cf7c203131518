"""The fine-tuning workloads of App. D.4: ROUGE, GSM8k answer extraction, prompt/label building,
batched greedy generation, the two scripts on their offline defaults, LoRA through peft, configs."""

import json
from decimal import Decimal
from pathlib import Path

import pytest
import torch

from hf_ivonpc.tasks import gsm8k as G
from hf_ivonpc.tasks import xsum as S
from hf_ivonpc.tasks import sft
from hf_ivonpc.tasks.cli import CONFIGS, load_config



# ---------------------------------------------------------------- ROUGE
def test_rouge_on_hand_computed_pairs():
    # 3 of the reference's 6 unigrams, 2 of its 5 bigrams, LCS 3: P = 1, R = 1/2 -> F = 2/3
    # (ROUGE-2: P = 1, R = 2/5 -> F = 4/7)
    r = S.rouge(["the cat sat"], ["the cat sat on the mat"])
    assert r["rouge1"] == pytest.approx(200 / 3)
    assert r["rouge2"] == pytest.approx(400 / 7)
    assert r["rougeL"] == pytest.approx(200 / 3)
    # same words, swapped: all unigrams, no bigram, LCS 1 of 2
    r = S.rouge(["dog cat"], ["cat dog"])
    assert (r["rouge1"], r["rouge2"], r["rougeL"]) == pytest.approx((100.0, 0.0, 50.0))
    # Porter stemming (words longer than 3 letters), case and punctuation ignored
    assert S.rouge(["Cats running!"], ["cat runs"])["rouge1"] == pytest.approx(100.0)
    # averaged over examples: identical (100) and disjoint (0)
    r = S.rouge(["a b c", "x y"], ["a b c", "p q"])
    assert r == pytest.approx({"rouge1": 50.0, "rouge2": 50.0, "rougeL": 50.0})
    with pytest.raises(ValueError):
        S.rouge(["a"], ["a", "b"])


# ---------------------------------------------------------------- GSM8k answers
@pytest.mark.parametrize("text, expected", [
    ("so 3 * 24 = 72\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("#### -7", "-7"),
    ("#### 2.50", "2.5"),
    ("#### 72.", "72"),
    ("#### $5", "5"),
    ("#### -$1,000.25", "-1000.25"),
    ("####42", "42"),
    ("first try #### 3\nno wait\n#### 4", "4"),      # the last ####
    ("#### 18 dollars", "18"),
])
def test_extract_answer_reads_the_usual_formats(text, expected):
    assert G.extract_answer(text) == Decimal(expected)


@pytest.mark.parametrize("text", ["The answer is 72.", "", None, "#### ", "#### five", "72 ####"])
def test_extract_answer_without_an_answer_is_none(text):
    assert G.extract_answer(text) is None


def test_exact_match_compares_numbers():
    refs = ["steps\n#### 1234", "#### -3", "2.5", "#### 7", "#### 10"]
    preds = ["#### 1,234.", "x\n#### -3.0", "#### $2.50", "the answer is 7, not 8", "#### 11 (10 was wrong)"]
    m = G.exact_match(preds, refs)
    assert m["exact_match"] == pytest.approx(60.0)            # the first three
    assert m["answered"] == pytest.approx(80.0)               # all but the fourth
    assert m["exact_match_flexible"] == pytest.approx(80.0)   # last numbers 1234, -3, 2.5, 8, 10
    with pytest.raises(ValueError, match="holds no answer"):
        G.exact_match(["#### 1"], ["no number"])


def test_gsm_symbolic_splits_use_disjoint_templates_and_gsm8k_answers():
    q_train, s_train = G.gsm_symbolic_problems("train", 60, seed=0)
    q_test, s_test = G.gsm_symbolic_problems("test", 20, seed=0)
    assert len(q_train) == 60 and len(q_test) == 20
    assert G.gsm_symbolic_problems("test", 5, seed=0) == (q_test[:5], s_test[:5])   # prefix-stable
    assert not any(q.endswith("Do not include units.") for q in q_train + q_test)
    for s in s_train + s_test:
        assert s.rsplit("\n", 1)[1].startswith("#### ") and G.extract_answer(s) is not None
    # a template's questions share their opening words: no opening is in both splits
    opening = lambda q: " ".join(q.split()[3:9])  # noqa: E731  (names come first)
    assert not {opening(q) for q in q_train} & {opening(q) for q in q_test}


# ---------------------------------------------------------------- prompts, labels, generation
@pytest.fixture(scope="module")
def tokenizer():
    return sft.load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return sft.load_causal_lm("smollm2")


def test_prompt_without_chat_template(tokenizer):
    plain = tokenizer.__class__.from_pretrained(sft.model_path("smollm2"))
    plain.chat_template = None
    assert sft.build_prompt(plain, "Q?", "Answer:") == "Q?\nAnswer:\n"


def test_batched_greedy_generation_equals_one_at_a_time(smollm2, tokenizer):
    prompts = [sft.build_prompt(tokenizer, "Name a colour."),
               sft.build_prompt(tokenizer, "Write one sentence about the sea and the wind at night.")]
    together = sft.greedy_generate(smollm2, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    alone = [sft.greedy_generate(smollm2, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone and all(together)


def _norm_posterior(model, sigma):
    """A posterior over the final norm's weight only, of std ``sigma``."""
    from hf_ivonpc import Posterior

    name = "model.norm.weight"
    p = dict(model.named_parameters())[name]
    ess, wd = 1.0, 0.0
    hess = torch.full_like(p, 1.0 / (ess * sigma ** 2))
    return Posterior({name: hess.rsqrt()}, {name: hess}, [{"params": [name], "ess": ess, "weight_decay": wd}])


def test_posterior_generation_is_greedy_per_draw(smollm2, tokenizer):
    """Each draw's solutions are greedy decoding at that draw: at sigma_scale 0 every draw gives
    the mean's greedy texts (batched as greedy_generate batches them); with noise the draws differ,
    and the same seed repeats them."""
    prompts = [sft.build_prompt(tokenizer, "Name a colour."),
               sft.build_prompt(tokenizer, "Write one sentence about the sea and the wind at night."),
               sft.build_prompt(tokenizer, "What is 2 + 3?")]
    post = _norm_posterior(smollm2, 0.5)
    greedy = sft.greedy_generate(smollm2, tokenizer, prompts, max_new_tokens=4, batch_size=2)
    at_mean = sft.posterior_generate(smollm2, post, tokenizer, prompts, 4, 1, sigma_scale=0.0, batch_size=2)
    assert at_mean == [greedy]
    noisy = sft.posterior_generate(smollm2, post, tokenizer, prompts, 4, 2, seed=5, batch_size=2)
    assert len(noisy) == 2 and all(len(d) == 3 for d in noisy)
    assert any(noisy[0][i] != noisy[1][i] for i in range(3))
    # the same seed repeats the draws (same batches: texts from other paddings may round apart)
    assert sft.posterior_generate(smollm2, post, tokenizer, prompts, 4, 2, seed=5, batch_size=2) == noisy


def test_vote_metrics_by_hand():
    refs = ["#### 4", "#### 10", "#### 7", "#### 1"]
    draws = [["#### 4", "#### 10", "#### 3", "no answer"],
             ["#### 4", "#### 11", "#### 7", "no answer"],
             ["#### 5", "#### 12", "#### 3", "#### 1"]]
    m, records = G.vote_metrics(draws, refs)
    # majorities: 4 (2/3, right), 10 (1/3, first of a three-way tie, right), 3 (2/3, wrong), None (2/3, wrong)
    assert [r["majority"] for r in records] == ["4", "10", "3", None]
    assert [r["agreement"] for r in records] == pytest.approx([2 / 3, 1 / 3, 2 / 3, 2 / 3])
    assert m["eval_vote_exact_match"] == pytest.approx(50.0)
    assert m["eval_vote_draw_exact_match"] == pytest.approx(100 * 5 / 12)
    assert m["eval_vote_agreement_mean"] == pytest.approx(7 / 12)
    # most agreed first (ties in question order): right, wrong, wrong, right -> risks 0, 1/2, 2/3, 1/2
    assert m["eval_vote_aurc"] == pytest.approx((0 + 1 / 2 + 2 / 3 + 1 / 2) / 4)
    assert m["eval_vote_exact_match_at_50"] == pytest.approx(50.0)
    assert m["eval_vote_exact_match_at_80"] == pytest.approx(50.0)     # ceil(0.8 x 4) = all 4


# ---------------------------------------------------------------- the scripts
def _results(out: Path) -> dict:
    return json.loads((out / "all_results.json").read_text())


def test_finetune_xsum_offline_default_runs(tmp_path, eager_kernels):
    """The offline default (SmolLM2-135M, IVON-PCM) starts, evaluates before and after training,
    trains and saves the model with its posterior. One step suffices for that: the mega-batch
    refresh, the corrected step and the IVON update of all 135M weights all happen in it; short
    sources and summaries cut the forward and backward passes, which are most of the cost."""
    out = tmp_path / "xsum"
    S.main(["--max_steps", "1", "--output_dir", str(out), "--max_train_samples", "8",
                        "--per_device_train_batch_size", "2", "--pc_megabatch_factor", "1",
                        "--pc_refresh_steps", "1", "--max_source_length", "16", "--max_target_length", "8",
                        "--max_eval_samples", "2", "--max_predict_samples", "2", "--max_new_tokens", "4",
                        "--eval_before_training", "--eval_strategy", "no", "--logging_steps", "1",
                        "--disable_tqdm", "true"])
    r = _results(out)
    for key in ("eval_loss", "eval_rouge1", "eval_rougeL", "base_rouge1", "base_loss"):
        assert key in r, key
    assert r["eval_generated"] == 2 and r["train_examples"] == 8
    assert r["eval_loss"] != r["base_loss"]                              # it trained
    assert r["n_params"] > 100e6                                         # the real SmolLM2-135M
    preds = [json.loads(line) for line in (out / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 and preds[0]["reference"]
    assert (out / "model.safetensors").exists() and (out / "training_curves.png").exists()
    assert (out / "posterior.safetensors").exists()
    logs = json.loads((out / "log_history.json").read_text())
    assert any("pc/megabatch_loss" in h for h in logs)                  # the step was corrected


class _Recorder:
    """Replaces the workloads' PCSFTTrainer by a subclass that keeps its instances."""

    def __init__(self, monkeypatch):
        import hf_ivonpc.trl
        from hf_ivonpc.trl import PCSFTTrainer

        seen = self.seen = []

        class Recording(PCSFTTrainer):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                seen.append(self)

        monkeypatch.setattr(hf_ivonpc.trl, "PCSFTTrainer", Recording)


def test_finetune_gsm8k_offline_default_trains_only_lora_adapters(tmp_path, monkeypatch,
                                                                   eager_kernels):
    from safetensors.torch import load_file

    rec = _Recorder(monkeypatch)
    argv = ["--max_steps", "2", "--max_train_samples", "8", "--per_device_train_batch_size", "2",
            "--pc_megabatch_factor", "1", "--pc_refresh_steps", "1", "--max_length", "32",
            "--max_eval_samples", "2", "--max_predict_samples", "2", "--max_new_tokens", "4",
            "--lora_r", "2", "--eval_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true"]
    out = tmp_path / "gsm8k"
    G.main(argv + ["--output_dir", str(out), "--generate_samples", "2"])
    G.main(argv + ["--output_dir", str(tmp_path / "again")])
    # the adapters' random initialisation is seeded too: a second run repeats the first
    assert _results(tmp_path / "again")["eval_loss"] == _results(out)["eval_loss"]
    r = _results(out)
    for key in ("eval_loss", "eval_exact_match", "eval_exact_match_flexible", "eval_answered"):
        assert key in r, key
    assert r["eval_generated"] == 2
    assert r["eval_vote_samples"] == 2 and 0 < r["eval_vote_agreement_mean"] <= 1   # the posterior's vote
    votes = [json.loads(line) for line in (out / "eval_vote.jsonl").read_text().splitlines()]
    assert len(votes) == 2 and len(votes[0]["answers"]) == 2 and "greedy_at_mean" in votes[0]
    assert (out / "eval_vote_risk_coverage.png").exists()
    trainer = rec.seen[0]
    model, opt = trainer.model, trainer.pc_optimizer
    trainable = [p for p in model.parameters() if p.requires_grad]
    covered = {id(p) for g in opt.param_groups for p in g["params"]}
    assert covered == {id(p) for p in trainable}
    n_trainable = sum(p.numel() for p in trainable)
    assert sum(f["mean"].numel() for f in opt.flat_state()) == n_trainable == r["n_trainable_params"]
    assert n_trainable < 0.01 * r["n_params"]
    # the base weights are the pretrained ones, the adapters moved (B starts at zero)
    pretrained = load_file(Path(sft.model_path("smollm2")) / "model.safetensors")
    compared = 0
    for name, p in model.base_model.model.named_parameters():
        if "lora_" not in name:
            key = name.replace("base_layer.", "")
            if key in pretrained:
                assert torch.equal(p.detach(), pretrained[key]), name
                compared += 1
    assert compared >= 200
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()


# ---------------------------------------------------------------- configs and the Hub
def _config_names():
    return sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name.startswith(("xsum_", "gsm8k_")))


PAPER_METHODS = {"adamw": "none", "alpha_svrg": "alpha_svrg", "ivon": "ivon", "ivon_pc": "ivon_pcm",
                 "ivon_pcm": "ivon_pcm"}


@pytest.mark.parametrize("name", _config_names())
def test_configs_parse_into_the_script_arguments(name):

    from hf_ivonpc.tasks.cli import parse_args
    from hf_ivonpc.trl import PCSFTConfig

    script = S.XsumArguments if name.startswith("xsum") else G.GSM8kArguments
    cfg = load_config(CONFIGS / name, (script, PCSFTConfig))
    # every value is valid (bf16 needs a GPU: checked below, not built here)
    args, targs = parse_args((script, PCSFTConfig), argv=["--config", name, "--bf16", "false"])
    assert targs.report_to in ([], ["none"], "none") and not targs.fp16
    if name.endswith("_offline.yaml"):
        assert targs.pc_method == "ivon_pcm" and args.model_name_or_path == "smollm2"
        assert cfg["bf16"] is False and cfg["gradient_checkpointing"] is False   # TRL's defaults are for GPUs
        return
    method = name.split("_paper_")[1].removesuffix(".yaml")
    assert cfg["bf16"] is True and targs.pc_method == PAPER_METHODS[method]
    if method in ("ivon", "ivon_pc", "ivon_pcm"):   # App. D.4's values
        assert (targs.ivon_ess, targs.ivon_hess_init, targs.ivon_clip_radius) == (1e10, 1e-3, 1e-3)
        assert (targs.ivon_beta1, targs.ivon_beta2) == (0.9, 0.99999)
        assert targs.learning_rate == (0.01 if name.startswith("xsum") else 0.05)
    if method in ("ivon_pc", "alpha_svrg"):
        assert (targs.pc_alpha, targs.pc_refresh_steps, targs.pc_rho1) == (0.7, 50, 0.0)
    if name.startswith("gsm8k"):
        assert targs.completion_only_loss is False and targs.num_train_epochs == 3   # input and output tokens
    else:
        assert args.train_split == "train[:50%]" and targs.num_train_epochs == 1


def test_paper_data_sets_fail_clearly_offline(monkeypatch):
    from hf_ivonpc.data import MissingDataError

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingDataError, match="EdinburghNLP/xsum.*Hub access"):
        S.load_summaries("EdinburghNLP/xsum", "test")
    with pytest.raises(MissingDataError, match="openai/gsm8k.*main"):
        G.load_problems("openai/gsm8k", "test")
    with pytest.raises(OSError, match="huggingface-cli download"):
        sft.load_tokenizer("Qwen/Qwen2.5-0.5B-Instruct")
