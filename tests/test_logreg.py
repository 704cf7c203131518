"""scripts/logreg.py (the paper's Fig. 3): problems, cost accounting, inner steps, alpha
selection, --quick's JSON, orderings."""

import importlib.util
import json
import math
import os
import time

import pytest
import torch

from research import logreg as L

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


def test_trace_records_inner_steps(cancer):
    """Every recorded point holds the inner steps so far: a plain step costs B/N, a corrected one
    2B/N, an outer pass 1 epoch and no step; steps_to_tol is read at epochs_to_tol's point."""
    n = cancer.n
    for method, per_step in (("svrg", 2 * 5 / n), ("sgd", 5 / n)):
        tr = L.run(cancer, method, 0.1, 7.0, seed=0)
        assert len(tr.steps) == len(tr.epochs) == len(tr.losses)
        assert tr.steps[0] == 0 and tr.steps == sorted(tr.steps)
        assert len(tr.refresh_steps) == len(tr.refreshes)
        for e, k in zip(tr.epochs, tr.steps):
            passes = sum(r < e - 1e-9 for r in tr.refreshes)  # outer passes finished by then
            assert e == pytest.approx(passes + per_step * k), (method, e, k)
        assert tr.steps[-1] == max(tr.steps) > 0
    assert tr.steps[-1] == int(7.0 * n / 5)  # sgd: every step is a plain one
    tr = L.run(cancer, "svrg", 0.5, 12.0, seed=0)
    assert tr.refresh_steps == [k * round(n / 5) for k in range(4)]  # at 0, 3, 6, 9 epochs
    for run in (tr, L.run(cancer, "sgd", 0.1, 4.0, seed=0)):
        for tol in (0.3, 0.1, 0.05, 0.02):
            e = run.epochs_to_tol(cancer.optimum, tol)
            assert e is not None and 0 < run.steps_to_tol(cancer.optimum, tol)
            assert run.steps_to_tol(cancer.optimum, tol) == run.steps[run.epochs.index(e)]
        assert run.steps_to_tol(cancer.optimum, 1e-12) is None


# ------------------------------------------------------------------------ alpha
def _trace(losses, diverged=False):
    return L.Trace(epochs=[float(i) for i in range(len(losses))], losses=losses,
                   steps=list(range(len(losses))), diverged=diverged)


def test_pick_alpha_ranks_like_the_learning_rates():
    """By epochs to tol among runs still within tol at the end, then by final loss; runs that
    leave tol again rank after them, failed runs last; a tie goes to the larger alpha."""
    opt = 1.0
    runs = {
        1.0: _trace([2.0, 1.005, 1.003, 1.02]),  # reached at 1 but ends outside tol
        0.5: _trace([2.0, 1.5, 1.008, 1.001]),   # reached at 2, stays
        0.25: _trace([2.0, 1.5, 1.009, 1.004]),  # reached at 2 too, higher final loss
        0.1: _trace([2.0, 1.001], diverged=True),
    }
    scores = {a: L.score(tr, opt) for a, tr in runs.items()}
    assert L.pick_alpha(scores) == 0.5
    del scores[0.5]
    assert L.pick_alpha(scores) == 0.25
    del scores[0.25]
    assert L.pick_alpha(scores) == 1.0  # outside tol at the end beats a failed run
    tie = {a: (0, 3.0, 1.002) for a in L.ALPHA_GRID}
    assert L.pick_alpha(tie) == 1.0
    assert L.pick_alpha({0.1: (1, 1.5, 0.0), 0.25: (1, 1.4, 0.0)}) == 0.25
    with pytest.raises(ValueError):
        L.pick_alpha({})


def test_tune_alpha_selects_jointly(cancer, monkeypatch):
    """tune_alpha tunes the learning rate at every alpha and returns the winner's pair."""
    seen = []

    def fake_tune(problem, method, epochs, seed, log=None, alpha=1.0, **kw):
        seen.append(alpha)
        lr = {0.1: 2**-9, 0.25: 2**-8, 0.5: 2**-7, 1.0: 2**-6}[alpha]
        ett = {0.1: None, 0.25: 4.5, 0.5: 3.9, 1.0: 4.2}[alpha]
        final = 1.001 if ett else 1.2
        sc = (0, ett, final) if ett else (1, final, 0.0)
        return lr, {lr: (sc, ett, final, None), lr * 2: ((2, 0.0, 0.0), None, math.inf, None)}

    monkeypatch.setattr(L, "tune", fake_tune)
    alpha, lr, per_alpha = L.tune_alpha(cancer, "ivon_pc", 30.0, 1000)
    assert sorted(seen) == sorted(L.ALPHA_GRID) and set(per_alpha) == set(L.ALPHA_GRID)
    assert (alpha, lr) == (0.5, 2**-7)
    assert per_alpha[0.25]["lr"] == 2**-8 and per_alpha[0.25]["epochs_to_tol"] == 4.5
    with pytest.raises(ValueError):
        L.tune_alpha(cancer, "svrg", 30.0, 1000)


def test_alpha_reaches_the_optimizer(cancer):
    w = torch.nn.Parameter(torch.zeros(cancer.d, dtype=torch.float64))
    for method in L.ALPHA_METHODS:
        opt = L.make_optimizer(method, [w], 0.01, cancer, 0, 10, alpha=0.25)
        assert opt.param_groups[0]["alpha"] == 0.25, method
    for method in ("sgd", "svrg", "ivon", "vsgd_pc"):
        with pytest.raises(ValueError):
            L.make_optimizer(method, [w], 0.01, cancer, 0, 10, alpha=0.5)
    # a smaller alpha changes the trajectory, alpha = 1 is the default
    a1 = L.run(cancer, "ivon_pc", 2**-5, 4.0, seed=0)
    assert L.run(cancer, "ivon_pc", 2**-5, 4.0, seed=0, alpha=1.0).losses == a1.losses
    assert L.run(cancer, "ivon_pc", 2**-5, 4.0, seed=0, alpha=0.25).losses[-1] != a1.losses[-1]


def test_ivon_family_is_unclipped(cancer):
    """The docstring's "no clipping": IVONPC's own default clip_radius (1e-3) must not leak in."""
    w = torch.nn.Parameter(torch.zeros(cancer.d, dtype=torch.float64))
    for method in ("ivon", "ivon_pc", "ivon_pc_indep"):
        opt = L.make_optimizer(method, [w], 0.01, cancer, 0, 10)
        assert opt.param_groups[0]["clip_radius"] == math.inf, method


def test_alpha_tables_are_consistent():
    """TUNED_LR of an alpha method is its TUNED_ALPHA_LR at TUNED_ALPHA (one --tune run)."""
    mod = _script()
    for name in L.PROBLEMS:
        for method in ("ivon_pc", "von_pc"):
            alpha = mod.TUNED_ALPHA[name][method]
            lrs = mod.TUNED_ALPHA_LR[name][method]
            assert set(lrs) == set(L.ALPHA_GRID) and alpha in L.ALPHA_GRID, (name, method)
            assert mod.TUNED_LR[name][method] == lrs[alpha], (name, method)


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
    mod = _script()
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
            # inner steps next to epochs
            stt, per_seed = res["inner_steps_to_tol"], res["inner_steps_to_tol_per_seed"]
            assert len(per_seed) == len(res["seeds"]) == len(res["inner_steps_per_seed"])
            assert all(isinstance(k, int) and k > 0 for k in res["inner_steps_per_seed"])
            assert (stt is None) == (ett is None), (name, method)
            if ett is not None:
                assert 0 <= stt <= max(res["inner_steps_per_seed"])
                n_steps = ett * entry["n"] / 5  # what ett buys in plain steps
                if method in L.CORRECTED:  # 2B/N per step, and outer passes that take none
                    assert stt < n_steps / 2 + 1e-6, (name, method)
                else:
                    assert stt == pytest.approx(n_steps), (name, method)
            # alpha: tuned for the methods that have one, from the table in --quick
            if method in L.ALPHA_METHODS:
                assert res["alpha"] == mod.TUNED_ALPHA[name][method] and res["alpha_grid"] is None
            elif method in L.CORRECTED:
                assert res["alpha"] == 1.0
            else:
                assert res["alpha"] is None
        for method, why in entry.get("skipped", {}).items():
            assert method == "von_pc" and isinstance(why, str)
    assert (out / "logreg.png").stat().st_size > 10_000
    import matplotlib.image

    height, width = matplotlib.image.imread(out / "logreg.png").shape[:2]
    assert height > 0.5 * width  # two rows of panels: against epochs and against inner steps


def test_quick_runs_at_the_tuned_alpha(quick, cancer):
    """The reported runs use the tabulated alpha (VON-PC's is 0.5 on breast cancer)."""
    data, mod = quick[0], _script()
    res = data["problems"]["breast_cancer"]["methods"]["von_pc"]
    assert res["alpha"] == mod.TUNED_ALPHA["breast_cancer"]["von_pc"] != 1.0
    tr = L.run(cancer, "von_pc", res["lr"], data["problems"]["breast_cancer"]["epochs"],
               res["seeds"][0], alpha=res["alpha"])
    assert tr.losses[-1] == res["final_loss_per_seed"][0]


def test_committed_results_select_the_tabulated_alpha():
    """docs/results/logreg/logreg.json holds the tuning seed's run at every alpha: the selection
    rule picks TUNED_ALPHA from them, at the learning rates of TUNED_ALPHA_LR."""
    mod = _script()
    with open(os.path.join(ROOT, "docs", "results", "logreg", "logreg.json")) as f:
        data = json.load(f)
    checked = 0
    for name, entry in data["problems"].items():
        for method, res in entry["methods"].items():
            if method not in L.ALPHA_METHODS:
                continue
            grid = {float(a): v for a, v in res["alpha_grid"].items()}
            assert set(grid) == set(L.ALPHA_GRID), (name, method)
            assert {a: v["lr"] for a, v in grid.items()} == mod.TUNED_ALPHA_LR[name][method]
            picked = L.pick_alpha({a: tuple(v["rank_key"]) for a, v in grid.items()})
            assert picked == res["alpha"] == mod.TUNED_ALPHA[name][method], (name, method)
            assert res["alpha_reproduced"] and res["lr"] == mod.TUNED_LR[name][method]
            checked += 1
    assert checked == 2 * len(L.PROBLEMS)


def test_quick_runs_in_about_a_minute(quick):
    # ~20 s on one idle core; the margin is for a loaded machine
    assert quick[3] < 180


def _ett(data, problem, method):
    e = data["problems"][problem]["methods"][method]["epochs_to_tol"]
    return math.inf if e is None else e


# The paper's Fig. 3 ordering, by epochs to 1% of the optimum. With every method's learning rate
# the best of its grid and IVON-PC's alpha tuned with it (scripts/logreg.py), it holds on the
# largest problem only: on the two smaller ones the uncorrected method is already within 1% before
# the corrected one has paid for its second full pass. Numbers: --quick (seed 0, 12 epochs) / full
# run (3 seeds, 30 epochs; docs/results/logreg). IVON-PC's tuned alpha: 1, 0.5, 1.
NOT_REPRODUCED = {
    ("svrg", "breast_cancer"): "SGD 3.95 vs SVRG 8.17 epochs (full: 4.02 vs 8.68)",
    ("svrg", "synthetic_2000x20"): "SGD 2.15 vs SVRG 4.10 epochs (full: 2.28 vs 4.10)",
    ("ivon_pc", "breast_cancer"): "IVON 7.17 vs IVON-PC 11.80 epochs (full: 7.70 vs 11.86)",
    ("ivon_pc", "synthetic_2000x20"): "IVON 3.55 vs IVON-PC 4.20 epochs (full: 3.70 vs 4.30)",
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


# Per inner step (the paper's ImageNet result is "better per step, not per example") the
# corrected methods are ahead on every problem, the outer passes not counted: --quick's seed 0
# SGD/SVRG 450/294, 860/420, 4650/1200 and IVON/IVON-PC 816/444, 1420/440, 4650/1200 inner steps
# (full run: 458/304, 913/420, 4833/1250 and 876/428, 1480/460, 4500/1250).
@pytest.mark.parametrize("corrected,plain", [("svrg", "sgd"), ("ivon_pc", "ivon")])
@pytest.mark.parametrize("problem", list(L.PROBLEMS))
def test_corrected_reaches_tolerance_in_fewer_inner_steps(quick, problem, corrected, plain):
    methods = quick[0]["problems"][problem]["methods"]
    steps = {m: methods[m]["inner_steps_to_tol"] for m in (corrected, plain)}
    assert None not in steps.values(), steps
    assert steps[corrected] < steps[plain], steps
