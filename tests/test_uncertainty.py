"""The uncertainty metrics against examples worked by hand."""

import math

import numpy as np
import pytest
import torch

from hf_ivonpc import uncertainty as U

# four two-class questions: confidences 0.85 (right), 0.75 (wrong), 0.65 (right), 0.62 (right)
PROBS = np.array([[0.85, 0.15], [0.75, 0.25], [0.35, 0.65], [0.62, 0.38]])
LABELS = np.array([0, 1, 1, 0])


def test_accuracy_nll_brier_by_hand():
    assert U.accuracy(PROBS, LABELS) == 0.75
    assert U.nll(PROBS, LABELS) == pytest.approx(-(math.log(.85) + math.log(.25) + math.log(.65) + math.log(.62)) / 4)
    # sum over the two classes of the squared error: 2 (1 - p_gold)^2
    assert U.brier(PROBS, LABELS) == pytest.approx(2 * (.15**2 + .75**2 + .35**2 + .38**2) / 4)
    assert U.brier(torch.tensor(PROBS), torch.tensor(LABELS)) == pytest.approx(U.brier(PROBS, LABELS))


def test_ece_by_hand():
    # 10 bins: (0.8, 0.9] holds 0.85 (right), (0.7, 0.8] 0.75 (wrong), (0.6, 0.7] 0.65 and 0.62 (both right)
    assert U.ece(PROBS, LABELS, n_bins=10) == pytest.approx(.25 * .15 + .25 * .75 + .5 * (1 - .635))
    # 2 bins: all four in (0.5, 1]: accuracy 3/4 against mean confidence 0.7175
    assert U.ece(PROBS, LABELS, n_bins=2) == pytest.approx(abs(.75 - .7175))
    # a bin's upper edge belongs to it: with 2 bins confidence 0.5 (right) is in (0, 0.5], apart
    # from 0.75 (wrong) in (0.5, 1]: 1/2 |1 - 0.5| + 1/2 |0 - 0.75| (together they would give 0.125)
    assert U.ece(np.array([[0.5, 0.5], [0.75, 0.25]]), np.array([0, 1]), n_bins=2) == pytest.approx(0.625)
    assert U.ece(np.array([[1.0, 0.0]]), np.array([0])) == 0.0


def test_summary_names_and_ece_bins():
    s = U.summary(PROBS, LABELS)
    assert set(s) == {"accuracy", "nll", "brier", "ece", "ece_10", "aurc", "acc_at_80", "confidence", "entropy"}
    assert s["ece_10"] == pytest.approx(U.ece(PROBS, LABELS, 10))
    assert s["ece"] == pytest.approx(U.ece(PROBS, LABELS, 15))


def test_risk_coverage_aurc_and_selective_accuracy_by_hand():
    conf = np.array([0.6, 0.9, 0.7, 0.8])      # most confident first: 0.9, 0.8, 0.7, 0.6
    correct = np.array([0, 1, 1, 0])            # right, wrong, right, wrong in that order
    coverage, risk = U.risk_coverage(conf, correct)
    np.testing.assert_allclose(coverage, [.25, .5, .75, 1.0])
    np.testing.assert_allclose(risk, [0, 1 / 2, 1 / 3, 1 / 2])
    assert U.aurc(conf, correct) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    assert U.accuracy_at_coverage(conf, correct, 0.75) == pytest.approx(2 / 3)
    assert U.accuracy_at_coverage(conf, correct, 0.8) == pytest.approx(0.5)   # ceil(3.2) = 4 answered
    assert U.accuracy_at_coverage(conf, correct, 0.25) == 1.0


def test_decomposition_on_known_distributions():
    p = np.array([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    agree = U.decompose(np.stack([p, p, p]))
    np.testing.assert_allclose(agree["epistemic"], 0.0, atol=1e-12)    # every draw the same: no MI
    np.testing.assert_allclose(agree["total"], agree["aleatoric"], atol=1e-12)
    assert agree["total"][1] == pytest.approx(math.log(3))
    # two confident draws that disagree: no aleatoric part, log 2 of mutual information
    split = U.decompose(np.array([[[1.0, 0.0]], [[0.0, 1.0]]]))
    assert split["aleatoric"][0] == pytest.approx(0.0, abs=1e-9)
    assert split["epistemic"][0] == pytest.approx(math.log(2))
    rng = np.random.default_rng(0)
    draws = rng.dirichlet(np.ones(4), size=(8, 20))
    parts = U.decompose(draws)
    np.testing.assert_allclose(parts["total"], parts["aleatoric"] + parts["epistemic"], atol=1e-12)
    assert (parts["epistemic"] > 0).all()
    s = U.predictive_summary(draws, rng.integers(0, 4, 20))
    assert s["entropy"] == pytest.approx(s["aleatoric"] + s["epistemic"])


def test_ood_auroc_by_hand():
    # pairs (out, in): 0.3 > 0.1, 0.3 > 0.2, 0.15 > 0.1, 0.15 < 0.2: 3 of 4 ordered right
    assert U.ood_auroc([0.1, 0.2], [0.3, 0.15]) == pytest.approx(0.75)


def test_temperature_scaling_recovers_the_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20000, 4)) * 3
    labels = np.array([rng.choice(4, p=q) for q in U.apply_temperature(logits, 2.0)])
    t = U.fit_temperature(logits, labels)
    assert t == pytest.approx(2.0, rel=0.05)
    assert U.nll(U.apply_temperature(logits, t), labels) < U.nll(U.apply_temperature(logits, 1.0), labels)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"n_bins=0 is invalid: accepted range is an integer >= 1"):
        U.ece(PROBS, LABELS, n_bins=0)
    with pytest.raises(ValueError, match="probs is not a probability distribution"):
        U.accuracy(PROBS * 2, LABELS)
    with pytest.raises(ValueError, match=r"labels holds values from 0 to 2: accepted range is 0 to 1"):
        U.nll(PROBS, np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"coverage=0 is invalid: accepted range is \(0, 1\]"):
        U.accuracy_at_coverage([0.5], [1], 0)
    with pytest.raises(ValueError, match="temperature=-1.0 is invalid"):
        U.apply_temperature(PROBS, -1.0)
    with pytest.raises(ValueError, match="sample_probs has shape"):
        U.decompose(PROBS)
