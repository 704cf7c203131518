"""PCTrainer's multiple-choice evaluation (``eval_answer_tokens``): the answer distribution at the
posterior mean and the predictive over posterior draws, side by side, checked by hand one
unpadded question at a time."""

import pytest
import torch

from hf_ivonpc import PCTrainer, PCTrainingArguments
from hf_ivonpc import uncertainty as U

ANSWERS = [" A", " B", " C", " D"]
QUESTIONS = ["Question: which is a mammal?\nAnswer:", "Question: 2 + 2?\nAnswer:",
             "Question: the sky is\nAnswer:", "Question: water boils at\nAnswer:",
             "Question: which planet is red?\nAnswer:"]
GOLD = [2, 0, 1, 3, 1]


@pytest.fixture(scope="module")
def tok():
    from hf_ivonpc.tasks.sft import load_tokenizer
    return load_tokenizer("smollm2")


def _model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


class Rows(torch.utils.data.Dataset):
    """Questions whose 'labels' are the gold answer's index (eval) or the tokens (training)."""

    def __init__(self, tok, lm: bool):
        self.rows = []
        for q, g in zip(QUESTIONS, GOLD):
            ids = torch.tensor(tok.encode(q + ANSWERS[g]) if lm else tok.encode(q))
            self.rows.append({"input_ids": ids, "labels": ids.clone() if lm else torch.tensor(g)})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def collate(rows, pad=0):
    """Left padding (the last position is every row's last token); token labels padded with -100."""
    n = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": torch.full((len(rows), n), pad), "attention_mask": torch.zeros(len(rows), n, dtype=torch.long)}
    lm = rows[0]["labels"].ndim == 1
    labels = torch.full((len(rows), n), -100) if lm else torch.stack([r["labels"] for r in rows])
    for i, r in enumerate(rows):
        m = len(r["input_ids"])
        out["input_ids"][i, n - m:] = r["input_ids"]
        out["attention_mask"][i, n - m:] = 1
        if lm:
            labels[i, n - m:] = r["labels"]
    out["labels"] = labels
    return out


def _trainer(tok, tmp_path, **over):
    kw = dict(output_dir=str(tmp_path), pc_method="ivon", max_steps=3, per_device_train_batch_size=2,
              per_device_eval_batch_size=2, learning_rate=0.5, ivon_ess=100.0, ivon_hess_init=1.0,
              eval_answer_tokens=ANSWERS, eval_mc_samples=4, report_to="none", save_strategy="no",
              logging_steps=1, use_cpu=True, seed=3)
    kw.update(over)
    return PCTrainer(model=_model(tok), args=PCTrainingArguments(**kw), train_dataset=Rows(tok, True),
                     eval_dataset=Rows(tok, False), data_collator=collate, processing_class=tok)


def _by_hand(trainer, tok, opt=None, k=0):
    """Answer probabilities one unpadded question at a time: at the mean, or the k draws of
    PCTrainer's evaluation generator (the same draws for every question)."""
    ids = [tok.encode(a, add_special_tokens=False)[0] for a in ANSWERS]
    model = trainer.model.eval()
    seed = trainer.args.seed + 7919 * (trainer.state.global_step + 1)
    rows = []
    with torch.no_grad():
        for q in QUESTIONS:
            x = torch.tensor([tok.encode(q)])
            if opt is None:
                rows.append(model(input_ids=x).logits[0, -1, ids].softmax(-1))
                continue
            saved, opt.generator = opt.generator, torch.Generator().manual_seed(seed)
            draws = []
            for _ in range(k):
                with opt.sampled_params():
                    draws.append(model(input_ids=x).logits[0, -1, ids].softmax(-1))
            opt.generator = saved
            rows.append(torch.stack(draws))
    return torch.stack(rows, -2).double().numpy()    # [N, C] or [S, N, C]


def test_evaluation_logs_the_mean_and_the_predictive_answer_distributions(tok, tmp_path):
    trainer = _trainer(tok, tmp_path)
    trainer.train()
    opt = trainer.pc_optimizer
    before = opt.generator.get_state()
    m = trainer.evaluate()
    assert torch.equal(opt.generator.get_state(), before)        # training noise untouched
    mean, draws = _by_hand(trainer, tok), _by_hand(trainer, tok, opt, 4)
    assert m["eval_mean_accuracy"] == pytest.approx(U.accuracy(mean, GOLD))
    assert m["eval_mean_nll"] == pytest.approx(U.nll(mean, GOLD), rel=1e-5)
    assert m["eval_mean_ece"] == pytest.approx(U.ece(mean, GOLD), rel=1e-4, abs=1e-7)
    assert m["eval_pred_nll"] == pytest.approx(U.nll(draws.mean(0), GOLD), rel=1e-5)
    assert m["eval_pred_epistemic"] == pytest.approx(U.decompose(draws)["epistemic"].mean(), rel=1e-4, abs=1e-9)
    assert m["eval_pred_k1_nll"] == pytest.approx(U.nll(draws[0], GOLD), rel=1e-5)
    assert m["eval_pred_k2_nll"] == pytest.approx(U.nll(draws[:2].mean(0), GOLD), rel=1e-5)
    assert m["eval_pred_kl_to_mean"] > 1e-6                      # the draws are not the mean
    assert m["eval_loss"] == m["eval_pred_nll"]
    assert "eval_perplexity" not in m                            # a per-question NLL has none
    logged = [h for h in trainer.state.log_history if "eval_mean_nll" in h]
    assert logged and logged[-1]["eval_pred_nll"] == m["eval_pred_nll"]


def test_without_draws_only_the_mean_is_reported(tok, tmp_path):
    trainer = _trainer(tok, tmp_path, eval_mc_samples=0, max_steps=1)
    trainer.train()
    m = trainer.evaluate()
    assert m["eval_loss"] == m["eval_mean_nll"] == pytest.approx(U.nll(_by_hand(trainer, tok), GOLD), rel=1e-5)
    assert not any(k.startswith("eval_pred") for k in m)


def test_bad_answer_settings_are_refused(tok, tmp_path):
    with pytest.raises(ValueError, match="eval_answer_tokens"):
        PCTrainingArguments(output_dir=str(tmp_path), eval_answer_tokens=[" A"])
    with pytest.raises(ValueError, match=r"eval_answer_tokens.*'zzqx yy' is \d tokens"):
        _trainer(tok, tmp_path, eval_answer_tokens=[" A", "zzqx yy"])
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PCTrainer(model=_model(tok), args=PCTrainingArguments(output_dir=str(tmp_path), eval_answer_tokens=ANSWERS,
                                                             report_to="none", use_cpu=True))
    trainer = _trainer(tok, tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"'labels' must be the index of its gold answer.*shape \(2, \d+\)"):
        trainer.evaluate(Rows(tok, True))
