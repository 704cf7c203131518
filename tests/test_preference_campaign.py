"""scripts/preference.py (the DPO comparison): the tuning rule grows each grid until its best is
interior, the control arm changes one thing only (IVON-PCM at IVON's learning rate), differences
are paired by seed, and the report is rebuilt from the cache alone. The workload is replaced by a
synthetic one whose loss is known (a real run takes minutes)."""

import json
import math
from pathlib import Path

import pytest

from _scripts import load_script

P = load_script("preference")
#: the synthetic optimum of each method's learning rate, and a per-method offset of its loss
BEST = {"none": (3e-3, 0.60), "ivon": (1.0, 0.64), "ivon_pcm": (3.0, 0.62)}


def _fake_dpo(calls):
    def main(argv):
        a = dict(zip(argv[::2], argv[1::2]))
        method, lr, seed = a["--pc_method"], float(a["--learning_rate"]), int(a["--seed"])
        calls.append((method, lr, seed, a["--eval_split"]))
        best, offset = BEST[method]
        loss = offset + 0.1 * abs(math.log10(lr / best)) + 0.001 * seed
        out = Path(a["--output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "log_history.json").write_text(json.dumps([{"step": 1, "loss": loss}]))
        return {"eval_loss": loss, "eval_rewards/accuracies": 1 - loss, "eval_rewards/margins": 2 * lr}
    return main


@pytest.fixture
def campaign(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from hf_ivonpc.tasks import dpo

    calls = []
    monkeypatch.setattr(dpo, "main", _fake_dpo(calls))
    monkeypatch.setattr(P, "OUT", tmp_path / "preference")
    monkeypatch.chdir(tmp_path)          # the runs' scratch folders land here
    monkeypatch.setattr(P, "code_version", lambda files: "test")
    return calls, tmp_path / "preference"


def test_tuning_control_arm_and_paired_differences(campaign):
    calls, out = campaign
    report = P.main(["--workers", "1"])
    methods = report["methods"]
    assert {m: r["learning_rate"] for m, r in methods.items()} == {
        "adamw": 3e-3, "ivon": 1.0, "ivon_pcm": 3.0, P.CONTROL: 1.0}
    # every grid grew until its best was interior: one point past the best on each side
    for m in ("adamw", "ivon", "ivon_pcm"):
        lrs = sorted(float(k) for k in methods[m]["lr_curve"])
        assert lrs[0] < methods[m]["learning_rate"] < lrs[-1]
    # the control is IVON-PCM (not IVON) at IVON's tuned learning rate, on the reported seeds, on test
    assert sorted(c[2] for c in calls if c[:2] == ("ivon_pcm", 1.0) and c[3] == "test") == list(P.SEEDS)
    assert methods[P.CONTROL]["lr_curve"] is None
    assert methods[P.CONTROL]["gradient_evaluations"] == methods["ivon_pcm"]["gradient_evaluations"] \
        > methods["ivon"]["gradient_evaluations"]
    # tuning never reads the test pairs, reporting never reads the validation pairs
    assert {c[2] for c in calls if c[3] == "validation"} == {P.TUNE_SEED}
    assert {c[2] for c in calls if c[3] == "test"} == set(P.SEEDS)
    # paired by seed: the synthetic seed term cancels, the difference is the offsets' and the lr's
    diff = methods[P.CONTROL]["eval_loss - ivon"]
    assert diff["mean"] == pytest.approx(0.62 + 0.1 * math.log10(3.0) - 0.64) and diff["ci95"] == pytest.approx(0, abs=1e-12)
    text = (out / "README.md").read_text()
    assert P.CONTROL in text and "Test preference loss per seed" in text
    assert (out / "lr_curves.png").stat().st_size > 5000
    # --report_only rebuilds the same report from the cache without training
    n = len(calls)
    first = (out / "preference.json").read_text()
    (out / "preference.json").unlink()
    again = P.main(["--report_only"])
    assert len(calls) == n
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(report)) == json.loads(first)


def test_report_only_refuses_to_train_and_workers_are_checked(campaign):
    calls, _ = campaign
    with pytest.raises(SystemExit, match="--report_only: the run"):
        P.main(["--report_only"])
    assert calls == []
    with pytest.raises(SystemExit):
        P.main(["--workers", "0"])
    assert calls == []
