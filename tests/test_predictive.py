"""The answer-restricted posterior predictive: a softmax over chosen tokens at the last position,
per-draw probabilities and a test-time scale of sigma."""

import math

import pytest
import torch

from hf_ivonpc import Posterior
from hf_ivonpc.posterior import selected_logits

VOCAB = 40
ANSWERS = [7, 3, 11, 20]          # the answer tokens, in choice order


class Table(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: the last position's logits are a row of the table."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.linspace(-2, 2, VOCAB * VOCAB).reshape(VOCAB, VOCAB).sin())

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.table[input_ids]}


def _posterior(model, ess=50.0, wd=1e-2):
    names = [n for n, _ in model.named_parameters()]
    hess = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
    std = {n: h.add(wd).mul(ess).rsqrt() for n, h in hess.items()}
    return Posterior(std, hess, [{"params": names, "ess": ess, "weight_decay": wd}], method="ivon", step=0)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def _left_padded():
    ids = torch.tensor([[0, 0, 5, 9, 2], [4, 8, 1, 6, 13]])
    return {"input_ids": ids, "attention_mask": (torch.arange(5) >= torch.tensor([[2], [0]])).long()}


def test_restricted_scoring_equals_a_softmax_by_hand():
    model = Table()
    batch = _left_padded()
    probs = torch.softmax(selected_logits(model, batch, ANSWERS), -1)
    for row, last in enumerate((2, 13)):
        z = [model.table[last, t].item() for t in ANSWERS]
        by_hand = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
        assert probs[row].tolist() == pytest.approx(by_hand, rel=1e-6)
    # the predictive over one draw at sigma_scale 0 is that same softmax
    post = _posterior(model)
    assert torch.equal(post.predictive(model, batch, 1, select=ANSWERS, sigma_scale=0.0), probs)


def test_selection_computes_the_last_position_only_and_matches_the_full_logits():
    model = _tiny_llama()
    post = _posterior(model)
    batch = _left_padded()
    shapes = []
    hook = model.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.logits.shape)))
    mean, draws = post.predictive(model, batch, 3, seed=4, select=torch.tensor(ANSWERS), return_samples=True)
    hook.remove()
    assert shapes == [(2, 1, VOCAB)] * 3            # logits_to_keep=1: never [batch, length, vocab]
    assert mean.shape == (2, 4) and draws.shape == (3, 2, 4)
    torch.testing.assert_close(draws.mean(0), mean)
    # each draw equals the full forward's last-position logits at the same draw
    gen = torch.Generator().manual_seed(4)
    for s in range(3):
        with post.sample(model, generator=gen):
            full = model(**batch).logits[:, -1, ANSWERS].softmax(-1)
        torch.testing.assert_close(draws[s], full, rtol=1e-5, atol=1e-6)
    assert (draws[0] - draws[1]).abs().max() > 1e-3     # the draws differ: sigma is not negligible


def test_sigma_scale_zero_is_the_mean_bit_for_bit():
    model = _tiny_llama()
    post = _posterior(model)
    batch = _left_padded()
    with torch.no_grad():
        at_mean = selected_logits(model, batch, ANSWERS).float().softmax(-1)
        full_at_mean = model(**batch).logits.float().softmax(-1)
    mean, draws = post.predictive(model, batch, 4, select=ANSWERS, return_samples=True, sigma_scale=0)
    assert torch.equal(mean, at_mean) and all(torch.equal(d, at_mean) for d in draws)
    assert torch.equal(post.predictive(model, batch, 2, sigma_scale=0.0), full_at_mean)   # no selection
    assert not torch.equal(post.predictive(model, batch, 1, select=ANSWERS), at_mean)


def test_a_scoring_function_as_selection():
    """select may be a function of (model, inputs) scoring C answers, run at every draw."""
    model = _tiny_llama()
    post = _posterior(model)
    batch = _left_padded()
    calls = []

    def score(m, inputs):   # the letters' logits again, through the function path
        calls.append(m)
        return selected_logits(m, inputs, ANSWERS)

    by_ids = post.predictive(model, batch, 3, seed=1, select=ANSWERS, return_samples=True)
    by_fn = post.predictive(model, batch, 3, seed=1, select=score, return_samples=True)
    assert len(calls) == 3 and all(m is model for m in calls)
    assert torch.equal(by_ids[0], by_fn[0]) and torch.equal(by_ids[1], by_fn[1])


def test_sigma_scale_multiplies_the_perturbation():
    model = Table()
    post = _posterior(model)
    m = model.table.detach().clone()
    with post.sample(model, seed=3):
        one = model.table.detach() - m
    with post.sample(model, seed=3, sigma_scale=2.5):
        scaled = model.table.detach() - m
    torch.testing.assert_close(scaled, 2.5 * one)
    assert torch.equal(model.table.detach(), m)


def test_bad_input_is_refused():
    model = Table()
    post = _posterior(model)
    batch = _left_padded()
    with pytest.raises(ValueError, match=r"sigma_scale=-1.0 is invalid: accepted range is a finite number >= 0"):
        post.predictive(model, batch, 1, select=ANSWERS, sigma_scale=-1.0)
    with pytest.raises(ValueError, match=r"sigma_scale=nan is invalid"):
        with post.sample(model, seed=0, sigma_scale=float("nan")):
            pass
    with pytest.raises(ValueError, match=r"select=\[\] is invalid: accepted are token ids"):
        post.predictive(model, batch, 1, select=[])
    with pytest.raises(ValueError, match=r"token_ids holds 40: accepted range is 0 to 39"):
        selected_logits(model, batch, [1, 40])
    right = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].flip(-1)}
    with pytest.raises(ValueError, match="accepted are left-padded inputs"):
        post.predictive(model, right, 1, select=ANSWERS)


def test_vote_majority_and_agreement_by_hand():
    from hf_ivonpc.uncertainty import vote

    majority, agreement = vote([["7", "7", "3", "7"], ["1", "2", "1", "2", "3"], ["5"]])
    assert majority == ["7", "1", "5"]            # the 2-2 tie goes to the answer a draw gave first
    assert agreement.tolist() == [0.75, 0.4, 1.0]
    with pytest.raises(ValueError, match="answers holds a question with no answer"):
        vote([["1"], []])


def test_generate_votes_over_draws_and_scale_zero_is_greedy_at_the_mean():
    model = _tiny_llama()
    post = _posterior(model, ess=5.0)                  # wide: the draws' greedy continuations differ
    batch = _left_padded()
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        greedy = model.generate(**batch, **kw)[:, batch["input_ids"].shape[1]:].tolist()
    while any(row and row[-1] == 0 for row in greedy):   # without the trailing padding (pad id 0)
        greedy = [row[:-1] if row and row[-1] == 0 else row for row in greedy]
    at_mean = post.generate(model, batch, 3, seed=0, sigma_scale=0.0, **kw)
    assert at_mean["continuations"] == [greedy] * 3 and at_mean["agreement"].tolist() == [1.0, 1.0]
    out = post.generate(model, batch, 6, seed=1, answer=lambda ids: ids[0], **kw)
    assert len(out["continuations"]) == 6 and all(len(c) == 2 for c in out["continuations"])
    assert out["answers"] == [[c[i][0] for c in out["continuations"]] for i in range(2)]
    assert len({tuple(c[0]) for c in out["continuations"]}) > 1        # the draws answer differently
    for row, maj, agr in zip(out["answers"], out["majority"], out["agreement"]):
        assert agr == row.count(maj) / 6 and all(row.count(a) <= row.count(maj) for a in row)
    assert all(not c or c[-1] != 0 for draw in out["continuations"] for c in draw)   # no padding kept
    again = post.generate(model, batch, 6, seed=1, answer=lambda ids: ids[0], **kw)
    assert again["continuations"] == out["continuations"]            # seeded
    assert torch.equal(model.model.embed_tokens.weight, _tiny_llama().model.embed_tokens.weight)  # restored
    with pytest.raises(ValueError, match="n_samples=0 is invalid"):
        post.generate(model, batch, 0)
