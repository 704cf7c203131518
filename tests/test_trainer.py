"""PCTrainer on a tiny GPT-2 over a small real text."""

import pytest
import torch
from transformers import TrainerCallback

from hf_ivonpc import PCTrainer, PCTrainingArguments

from _tiny_lm import CharWindows, tiny_gpt2


def _args(tmp_path, method, **over):
    kw = dict(output_dir=str(tmp_path), pc_method=method, max_steps=40, learning_rate=0.05,
              per_device_train_batch_size=8, gradient_accumulation_steps=2, logging_steps=10,
              report_to=[], save_strategy="no", ivon_hess_init=0.1, ivon_clip_radius=float("inf"),
              ivon_ess=1e4, pc_megabatch_factor=4, pc_refresh_steps=10, pc_mean_term_weight=0.01,
              pc_start_step=10, disable_tqdm=True, use_cpu=True, seed=0,
              ivon_beta2=0.999)   # explicit: unset, it would depend on the run's length
    if method in ("none", "alpha_svrg"):
        kw["learning_rate"] = 3e-3
    kw.update(over)
    return PCTrainingArguments(**kw)


@pytest.mark.parametrize("method", ["none", "ivon", "ivon_pcm", "alpha_svrg"])
def test_every_method_lowers_the_loss(tmp_path, method):
    trainer = PCTrainer(model=tiny_gpt2(), args=_args(tmp_path, method), train_dataset=CharWindows(),
                        eval_dataset=CharWindows("val"))
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.5, (before, after)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    if method in ("ivon", "ivon_pcm"):
        assert "pc/sigma_mean" in logs[-1] and "grad_norm" not in logs[-1]
    if method in ("ivon_pcm", "alpha_svrg"):   # refreshed from step 10 on, every 10 steps
        assert trainer.pc_optimizer.refreshes == 3
        assert "pc/g_out_norm" in logs[-1]


class _Snapshot(TrainerCallback):
    def __init__(self, at_step):
        self.at_step, self.params = at_step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at_step:
            self.params = [p.detach().clone() for p in model.parameters()]


def test_before_start_step_ivon_pcm_is_ivon_with_one_forward_per_micro_batch(tmp_path):
    snaps, forwards = {}, {}
    for method in ("ivon", "ivon_pcm"):
        model = tiny_gpt2()
        count = {"n": 0}
        model.register_forward_pre_hook(lambda *a: count.__setitem__("n", count["n"] + 1))
        snap = _Snapshot(8)
        args = _args(tmp_path, method, max_steps=8 if method == "ivon" else 12, pc_start_step=8,
                     lr_scheduler_type="constant")
        trainer = PCTrainer(model=model, args=args, train_dataset=CharWindows(), callbacks=[snap])
        trainer.train()
        snaps[method] = snap.params
        forwards[method] = count["n"]
    for a, b in zip(snaps["ivon"], snaps["ivon_pcm"]):
        assert torch.equal(a, b)
    assert forwards["ivon"] == 8 * 2                 # one per micro-batch
    # ivon_pcm: the same 16 before the start, then per step a refresh every 10 steps
    # (4 x 2 micro-batches) plus two passes for each of 2 micro-batches: 16 + 8 + 4 x 4
    assert forwards["ivon_pcm"] == 16 + 8 + 4 * 4


def test_misuse_is_reported(tmp_path):
    with pytest.raises(ValueError, match="fp16=True is invalid.*bf16"):
        _args(tmp_path, "ivon", fp16=True)
    with pytest.raises(ValueError, match="pc_start_step=40 is invalid"):
        _args(tmp_path, "ivon_pcm", pc_start_step=40)
    with pytest.raises(ValueError, match="pc_method='adam' is invalid"):
        _args(tmp_path, "adam")
    with pytest.raises(ValueError, match="pc_rho1=2 is invalid"):
        _args(tmp_path, "ivon_pcm", pc_rho1=2)
    with pytest.raises(ValueError, match="pc_megabatch_factor=100 is invalid"):
        PCTrainer(model=tiny_gpt2(), args=_args(tmp_path, "ivon_pcm", pc_megabatch_factor=100),
                  train_dataset=CharWindows())

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(CharWindows())
    with pytest.raises(ValueError, match="iterable dataset"):
        PCTrainer(model=tiny_gpt2(), args=_args(tmp_path, "ivon_pcm"), train_dataset=Stream())

    # FSDP1/DeepSpeed need a distributed launch to be enabled: flag it on a built trainer
    trainer = PCTrainer(model=tiny_gpt2(), args=_args(tmp_path, "ivon"), train_dataset=CharWindows())
    trainer.is_fsdp_enabled = True   # with no plugin: FSDP1
    with pytest.raises(ValueError, match="pc_method='ivon' does not support FSDP1: use FSDP2.*--multi_gpu"):
        trainer._check_distributed()
    trainer.is_fsdp_enabled, trainer.is_deepspeed_enabled = False, True
    with pytest.raises(ValueError, match="pc_method='ivon' does not support DeepSpeed"):
        trainer._check_distributed()


class _CorrectionAtSnapshot(TrainerCallback):
    """Right after a refresh m_in = m_out and sigma_in = sigma_out: with shared noise and the same
    dropout masks theta_out = theta_in and both passes give the same gradient, so what the
    optimizer collected, sum(g_in - alpha g_out), is zero."""

    def __init__(self, trainer_ref):
        self.trainer_ref, self.residual = trainer_ref, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        opt = self.trainer_ref[0].pc_optimizer
        if state.global_step == args.pc_start_step:
            acc = torch.cat([f["acc_g"] for f in opt.flat_state(transient=True)])
            self.residual = (acc.abs().max() / torch.cat([f["g_out"] for f in opt.flat_state()]).abs().max()).item()


def test_both_passes_see_the_same_dropout(tmp_path):
    ref = []
    cb = _CorrectionAtSnapshot(ref)
    trainer = PCTrainer(model=tiny_gpt2(dropout=0.3), args=_args(tmp_path, "ivon_pcm", max_steps=11,
                                                                  pc_alpha=1.0),
                        train_dataset=CharWindows(), callbacks=[cb])
    ref.append(trainer)
    trainer.train()
    assert cb.residual is not None and cb.residual < 1e-6


def test_resume_between_two_refreshes_is_exact(tmp_path):
    over = dict(max_steps=12, pc_start_step=4, pc_refresh_steps=4, save_strategy="steps",
                save_steps=6, logging_steps=100)
    full = PCTrainer(model=tiny_gpt2(), args=_args(tmp_path / "a", "ivon_pcm", **over),
                     train_dataset=CharWindows())
    full.train()
    first = PCTrainer(model=tiny_gpt2(), args=_args(tmp_path / "b", "ivon_pcm", **{**over, "max_steps": 12}),
                      train_dataset=CharWindows())

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                control.should_training_stop = True
    first.add_callback(Stop())
    first.train()
    resumed = PCTrainer(model=tiny_gpt2(seed=1), args=_args(tmp_path / "b", "ivon_pcm", **over),
                        train_dataset=CharWindows())
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-6"))
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    a, b = full.pc_optimizer, resumed.pc_optimizer
    assert a.counters == b.counters and a.refreshes == 2
    for name in type(a).persistent_buffers:
        assert torch.equal(a.flat_state()[0][name], b.flat_state()[0][name]), name


@pytest.mark.parametrize("method", ["ivon", "ivon_pcm"])
def test_gradient_accumulation_matches_one_large_batch(tmp_path, method):
    """4 micro-batches of 2 and 1 of 8 give the same gradient estimate when the draws do not
    matter. Each micro-batch is paired with its own draw, so with real noise the two agree only
    in expectation; with sigma ~ 1e-14 they agree exactly up to rounding. The Hessian estimate is
    not compared: its variance grows as 1 / sigma^2. ivon_pcm's first step is corrected."""
    momentum = {}
    for bs, ga in ((8, 1), (2, 4)):
        args = _args(tmp_path / f"{bs}", method, max_steps=1, per_device_train_batch_size=bs,
                     gradient_accumulation_steps=ga, ivon_ess=1e28, pc_start_step=0,
                     pc_refresh_steps=1, pc_megabatch_factor=2, max_grad_norm=0.0)
        trainer = PCTrainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=CharWindows())
        trainer.train()
        opt = trainer.pc_optimizer
        assert opt.global_step == 1 and opt.refreshes == (1 if method == "ivon_pcm" else 0)
        momentum[bs] = torch.cat([f["momentum"] for f in opt.flat_state()])
    assert momentum[8].abs().max() > 1e-4
    assert torch.allclose(momentum[8], momentum[2], rtol=1e-4, atol=1e-7)


def test_posterior_predictive_evaluation_leaves_training_alone(tmp_path):
    """Evaluating during training (Trainer's own loop draws from the global RNG, so dropout
    differs from a run without evaluation) gives the same training with the predictive as with
    the mean: the predictive draws from a generator of its own."""
    finals, evals = {}, {}
    for mc in (0, 3):
        args = _args(tmp_path / str(mc), "ivon_pcm", max_steps=20, eval_mc_samples=mc,
                     eval_strategy="steps", eval_steps=5)
        trainer = PCTrainer(model=tiny_gpt2(), args=args, train_dataset=CharWindows(),
                            eval_dataset=CharWindows("val"))
        trainer.train()
        finals[mc] = [p.detach().clone() for p in trainer.model.parameters()]
        evals[mc] = (trainer.evaluate(), trainer.evaluate())
    for a, b in zip(finals[0], finals[3]):   # four predictive evaluations changed nothing
        assert torch.equal(a, b)
    mean_eval, (pred_a, pred_b) = evals[0][0], evals[3]
    assert pred_a["eval_loss"] == pred_b["eval_loss"]          # seeded per evaluation
    assert pred_a["eval_loss"] != mean_eval["eval_loss"]       # the draws do change the prediction
    assert abs(pred_a["eval_loss"] - mean_eval["eval_loss"]) < 0.5
    assert pred_a["eval_perplexity"] == pytest.approx(torch.tensor(pred_a["eval_loss"]).exp().item())


def test_eval_mc_samples_needs_a_posterior(tmp_path):
    with pytest.raises(ValueError, match="eval_mc_samples=2 is invalid"):
        _args(tmp_path, "alpha_svrg", eval_mc_samples=2)


def test_lora_only_adapters_carry_a_posterior(tmp_path):
    from peft import LoraConfig, get_peft_model
    base = tiny_gpt2(dropout=0.0)
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                            fan_in_fan_out=True, lora_dropout=0.0))
    trainer = PCTrainer(model=model, args=_args(tmp_path, "ivon_pcm", max_steps=15),
                        train_dataset=CharWindows())
    trainer.train()
    opt = trainer.pc_optimizer
    covered = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert covered == trainable and len(covered) == 4      # A and B of two c_attn adapters
    assert sum(f["mean"].numel() for f in opt.flat_state()) == sum(p.numel() for p in model.parameters()
                                                             if p.requires_grad)
    for n, p in model.base_model.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen[n.replace("base_layer.", "")]), n
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b)           # the adapters learned (B starts at 0)


def test_sequence_classifier_with_predictive_metrics(tmp_path):
    from sklearn.datasets import load_digits
    from transformers import BertConfig, BertForSequenceClassification

    from hf_ivonpc.metrics import classification_metrics
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.long) + 1
    y = torch.tensor(digits.target)

    class Digits(torch.utils.data.Dataset):
        def __init__(self, lo, hi):
            self.lo, self.hi = lo, hi

        def __len__(self):
            return self.hi - self.lo

        def __getitem__(self, i):
            return {"input_ids": x[self.lo + i], "labels": y[self.lo + i]}
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=18, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=10))
    args = _args(tmp_path, "ivon", max_steps=5, eval_mc_samples=4, per_device_eval_batch_size=64)
    trainer = PCTrainer(model=model, args=args, train_dataset=Digits(0, 1500),
                        eval_dataset=Digits(1500, 1797), compute_metrics=classification_metrics)
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval_accuracy", "eval_nll", "eval_ece", "eval_loss"} <= set(metrics)
    assert "eval_perplexity" not in metrics
    # the predictive's loss is the NLL of the averaged probabilities that the metrics see
    assert metrics["eval_nll"] == pytest.approx(metrics["eval_loss"], rel=1e-4)


def test_sequence_to_sequence_model_learns(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration
    from _tiny_lm import VOCAB

    class Copy(torch.utils.data.Dataset):   # copy a window of text
        def __init__(self):
            self.base = CharWindows(block=16)

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            ids = self.base[i]["input_ids"]
            return {"input_ids": ids, "labels": ids}
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=len(VOCAB), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0))
    trainer = PCTrainer(model=model, args=_args(tmp_path, "ivon_pcm", max_steps=40),
                        train_dataset=Copy(), eval_dataset=Copy())
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before - 0.5
    assert trainer.pc_optimizer.refreshes == 3


def test_default_ess_counts_likelihood_terms_with_a_floor(tmp_path):
    lm = PCTrainer(model=tiny_gpt2(), args=_args(tmp_path, "ivon", ivon_ess=None, ivon_hess_init=1e3),
                   train_dataset=CharWindows())
    lm.create_optimizer()   # floor 1 / (1e3 x 1e-6) = 1e3, below the 8,928 tokens
    assert lm.pc_optimizer.param_groups[0]["ess"] == len(CharWindows()) * 32
    assert lm.likelihood_terms() == len(CharWindows()) * 32
    small = PCTrainer(model=tiny_gpt2(), args=_args(tmp_path, "ivon", ivon_ess=None, ivon_hess_init=1e-3),
                      train_dataset=CharWindows())
    assert small.default_ess() == pytest.approx(1e9)   # initial sigma = 1e-3

    class NoLabels(torch.utils.data.Dataset):   # labels made by the collator
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"input_ids": CharWindows()[i]["input_ids"]}
    assert PCTrainer(model=tiny_gpt2(), args=_args(tmp_path, "ivon"),
                     train_dataset=NoLabels()).likelihood_terms() == 10 * 32

    class Classes(torch.utils.data.Dataset):
        def __len__(self):
            return 50

        def __getitem__(self, i):
            return {"input_ids": torch.zeros(8, dtype=torch.long), "labels": torch.tensor(1)}
    assert PCTrainer(model=tiny_gpt2(), args=_args(tmp_path, "ivon"),
                     train_dataset=Classes()).likelihood_terms() == 50


def test_learning_rate_default_depends_on_the_method(tmp_path):
    assert PCTrainingArguments(output_dir=str(tmp_path), pc_method="ivon").learning_rate == 1.0
    assert PCTrainingArguments(output_dir=str(tmp_path), pc_method="none").learning_rate == 5e-5
    assert PCTrainingArguments(output_dir=str(tmp_path), learning_rate=0.2).learning_rate == 0.2


def test_bf16_state_reaches_the_optimizer_and_the_posterior_file(tmp_path):
    from hf_ivonpc.posterior import Posterior
    args = _args(tmp_path, "ivon_pcm", max_steps=3, pc_start_step=1, pc_refresh_steps=2,
                 logging_steps=1, pc_state_dtype="bfloat16")
    trainer = PCTrainer(model=tiny_gpt2(), args=args, train_dataset=CharWindows())
    trainer.train()
    opt = trainer.pc_optimizer
    assert opt.refreshes == 1
    assert {n for n, t in opt.flat_state()[0].items() if t.dtype == torch.bfloat16} == {
        "momentum", "hess", "g_out", "h_out", "sigma_out"}
    trainer.save_model(str(tmp_path / "final"))
    post = Posterior.from_pretrained(str(tmp_path / "final"))
    name, std = next(iter(post.std.items()))
    assert std.dtype == torch.float32 and post.hess[name].dtype == torch.bfloat16
    # sigma recomputed from the stored bf16 h equals the optimizer's
    assert torch.equal(torch.cat([s.reshape(-1) for s in opt.posterior_std()]),
                       torch.cat([post.std[n].reshape(-1) for n in post.std]))


@pytest.mark.parametrize("method", ["none", "ivon"])
def test_causal_lm_loss_is_the_mean_over_predicted_tokens(tmp_path, method):
    """Trainer counts a causal LM's label tokens over labels[..., 1:] only for models whose
    loss_type names the causal-LM loss; GPT-2 leaves it None. The evaluation loss (and the
    training loss) must still be the mean over the predicted tokens: 31 per window of 32."""
    model = tiny_gpt2(dropout=0.0)
    val = CharWindows("val")
    trainer = PCTrainer(model=model, args=_args(tmp_path, method, per_device_eval_batch_size=8), eval_dataset=val)
    got = trainer.evaluate()["eval_loss"]
    ids = val.windows
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert got == pytest.approx(by_hand.item(), rel=1e-5)
    # a training step's loss is the same mean: its first logged loss is the model's own loss
    batch = {"input_ids": ids[:4], "labels": ids[:4]}
    assert trainer._get_num_items_in_batch([batch], torch.device("cpu")) == 4 * 31
