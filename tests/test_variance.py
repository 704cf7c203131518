"""The correction's variance measurement (``research.variance``) on the digits regime: the window
positions, the identities at theta = theta_out, and one measured position."""

import math
import random

import pytest

from research import variance as V


def test_positions_are_inside_the_corrected_part_of_the_run():
    spec = V.REGIMES["lm"]
    places = V.positions("lm", 1000, 200, seed=0)
    start, K = math.ceil(spec["start_ratio"] * 1000), spec["refresh"]
    assert all(t0 >= start and (t0 - start) % K == 0 and 0 <= k < K and t0 + k < 1000 for t0, k in places)
    assert len({k for _, k in places}) == K                       # every offset is drawn
    with pytest.raises(ValueError, match="steps=5 is invalid"):
        V.positions("lm", 5, 1)


@pytest.fixture(scope="module")
def digits_trainer():
    """The digits regime's IVON run (a few seconds) and two of its snapshots."""
    kept = {}
    with V._keeping_trainer({10, 13}, kept):
        V.train_run("digits", {"method": "ivon", "seed": 0, "lr": 1.0})
    return kept["trainer"], kept["snapshots"]


def test_at_the_anchor_the_mini_batch_part_is_one_minus_alpha_of_the_plain_noise(digits_trainer):
    """theta = theta_out: both passes see the same gradient, so V_mini(alpha) = (1 - alpha)^2 V_plain
    (and the covariance equals both variances)."""
    trainer, snaps = digits_trainer
    m = V.measure_position(trainer, snaps[10], snaps[10], batch=32, factor=4, refresh=10, n_pairs=6, n_mega=3,
                           rng=random.Random(0))
    assert m["cov_in_out"] == pytest.approx(m["v_plain"], rel=1e-9) == m["v_plain_out"]
    for alpha, v in m["by_alpha"].items():
        assert v["v_mini"] == pytest.approx((1 - float(alpha)) ** 2 * m["v_plain"], rel=1e-6, abs=1e-12)
        assert v["v_mega"] == pytest.approx(float(alpha) ** 2 * m["v_mega_alpha1"])
        assert v["window_ratio"] == pytest.approx((v["v_mini"] + 10 * v["v_mega"]) / m["v_plain"])


def test_a_position_inside_the_window_measures_finite_positive_variances(digits_trainer):
    trainer, snaps = digits_trainer
    assert any((snaps[13][n] != snaps[10][n]).any() for n in snaps[10])     # the weights moved
    m = V.measure_position(trainer, snaps[13], snaps[10], batch=32, factor=4, refresh=10, n_pairs=6, n_mega=3,
                           rng=random.Random(0))
    assert m["v_plain"] > 0 and m["v_mega_alpha1"] > 0 and m["noise_scale"] > 0
    assert m["cov_in_out"] != pytest.approx(m["v_plain"], rel=1e-6)
    # averaging 4 mini-batches cuts their variance about 4-fold: measured within a factor of 4 of it
    assert 0.25 < m["v_mega_alpha1"] / m["v_mega_predicted_alpha1"] < 4
