"""scripts/logreg.py (the paper's Fig. 3): problems, cost accounting, --quick's JSON, orderings."""

import importlib.util
import json
import math
import os
import time

import pytest
import torch

from hf_ivonpc.tasks import logreg as L

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    path = os.path.join(ROOT, "scripts", "logreg.py")
    spec = importlib.util.spec_from_file_location("logreg_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------ problem and loop
@pytest.fixture(scope="module")
def cancer():
    return L.load_problem("breast_cancer")


def test_newton_optimum_matches_sklearn(cancer):
    from sklearn.linear_model import LogisticRegression

    # sklearn minimises C sum_i loss_i + |w|^2 / 2: the same problem with C = 1 / (N delta)
    clf = LogisticRegression(C=1.0 / (cancer.n * cancer.delta), fit_intercept=False, tol=1e-12,
                             max_iter=10_000).fit(cancer.X.numpy(), cancer.y.numpy())
    w = torch.from_numpy(clf.coef_[0])
    assert cancer.full_loss(w) == pytest.approx(cancer.optimum, rel=1e-9)
    assert cancer.full_loss(w) >= cancer.optimum - 1e-14
    w_opt = cancer.w_opt.clone().requires_grad_(True)
    loss = cancer.data_loss(w_opt) + 0.5 * cancer.delta * w_opt.square().sum()
    (g,) = torch.autograd.grad(loss, w_opt)
    assert float(g.norm()) < 1e-10


def test_closed_form_gradient_is_backward(cancer):
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(cancer.d, dtype=torch.float64, generator=gen))
    idx = torch.tensor([3, 14, 15, 92, 65, 35, 89])
    (0.7 * cancer.data_loss(w, idx)).backward()
    expected, w.grad = w.grad, None
    cancer.backward(w, idx, 0.7)
    torch.testing.assert_close(w.grad, expected, rtol=1e-12, atol=1e-14)


def test_cost_accounting(cancer):
    """Outer pass = 1 epoch, corrected step = 2B/N, plain step = B/N; a refresh every N/B steps."""
    n, m = cancer.n, round(cancer.n / 5)
    tr = L.run(cancer, "svrg", 0.1, 7.0, seed=0)
    inner = 2 * m * 5 / n
    assert tr.refreshes == pytest.approx([0.0, 1 + inner])
    assert tr.epochs[-1] <= 7.0 + 1e-9
    assert tr.epochs[1] == pytest.approx(1.0)  # right after the first full pass
    assert tr.losses[1] == tr.losses[0]  # a refresh does not move the mean
    tr = L.run(cancer, "sgd", 0.1, 2.0, seed=0)
    assert not tr.refreshes and 2.0 - 5 / n < tr.epochs[-1] <= 2.0
    assert tr.epochs_to_tol(cancer.optimum, tol=1e9) == 0.0


# ------------------------------------------------------------------------ --quick
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("logreg")
    t0 = time.perf_counter()
    returned = _script().main(["--quick", "--out", str(out)])
    seconds = time.perf_counter() - t0
    with open(out / "logreg.json") as f:
        data = json.load(f)
    return data, returned, out, seconds


def test_quick_json_schema(quick):
    data, returned, out, _ = quick
    assert data == json.loads(json.dumps(returned))
    assert set(data) == {"problems"}
    assert set(data["problems"]) == set(L.PROBLEMS)
    for name, entry in data["problems"].items():
        assert isinstance(entry["optimum"], float) and 0 < entry["optimum"] < math.log(2)
        methods = entry["methods"]
        assert set(methods) | set(entry.get("skipped", {})) == set(L.METHODS), name
        for method, res in methods.items():
            if res["final_loss"] is None:  # only when a run blew up to inf/nan
                assert res["failures"], (name, method)
            else:
                assert isinstance(res["final_loss"], float), (name, method)
                assert res["final_loss"] >= entry["optimum"] - 1e-12
            ett = res["epochs_to_tol"]
            assert ett is None or (isinstance(ett, float) and 0 <= ett <= entry["epochs"])
            assert res["lr"] > 0 and res["seeds"]
        for method, why in entry.get("skipped", {}).items():
            assert method == "von_pc" and isinstance(why, str)
    assert (out / "logreg.png").stat().st_size > 10_000


def test_quick_runs_in_about_a_minute(quick):
    # ~20 s on one idle core; the margin is for a loaded machine
    assert quick[3] < 180


def _ett(data, problem, method):
    e = data["problems"][problem]["methods"][method]["epochs_to_tol"]
    return math.inf if e is None else e


# The paper's Fig. 3 ordering, by epochs to 1% of the optimum. With every method's learning rate
# the best of its grid (scripts/logreg.py), it holds on the largest problem only: on the two
# smaller ones the uncorrected method is already within 1% before the corrected one has paid for
# its second full pass. Numbers: --quick (seed 0, 12 epochs) / full run (3 seeds, 30 epochs).
NOT_REPRODUCED = {
    ("svrg", "breast_cancer"): "SGD 3.95 vs SVRG 8.17 epochs (full: 4.02 vs 8.68)",
    ("svrg", "synthetic_2000x20"): "SGD 2.15 vs SVRG 4.10 epochs (full: 2.28 vs 4.10)",
    ("ivon_pc", "breast_cancer"): "IVON 7.17 vs IVON-PC 11.80 epochs (full: 7.70 vs 11.86)",
    ("ivon_pc", "synthetic_2000x20"): "IVON 3.55 vs IVON-PC 4.20 epochs (full: 3.70 vs 4.20)",
}


def _cases(method):
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True,
                                                       reason=NOT_REPRODUCED[method, name]))
            if (method, name) in NOT_REPRODUCED else name for name in L.PROBLEMS]


@pytest.mark.parametrize("problem", _cases("svrg"))
def test_svrg_reaches_tolerance_before_sgd(quick, problem):
    data = quick[0]
    assert _ett(data, problem, "svrg") < _ett(data, problem, "sgd")


@pytest.mark.parametrize("problem", _cases("ivon_pc"))
def test_ivon_pc_reaches_tolerance_before_ivon(quick, problem):
    # on synthetic_5000x100 --quick's seed 0 gives 4.40 vs 4.65; over the full run's 3 seeds the
    # two tie (4.50 vs 4.50)
    data = quick[0]
    assert _ett(data, problem, "ivon_pc") < _ett(data, problem, "ivon")
