import numpy as np
import pytest
from transformers import EvalPrediction

from hf_ivonpc.metrics import classification_metrics


def test_classification_metrics_by_hand():
    # two confident right answers (p = 0.9) and one hesitant wrong one (p = 0.6 on class 0)
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4]])
    m = classification_metrics(EvalPrediction(predictions=np.log(probs), label_ids=np.array([0, 1, 1])))
    assert m["accuracy"] == 2 / 3
    assert abs(m["nll"] - (-(2 * np.log(0.9) + np.log(0.4)) / 3)) < 1e-12
    # bins: {0.9, 0.9} accuracy 1 -> |1 - 0.9| * 2/3; {0.6} accuracy 0 -> 0.6 * 1/3
    assert abs(m["ece"] - (0.1 * 2 / 3 + 0.6 / 3)) < 1e-12
    # logits are normalised: shifting them changes nothing
    m2 = classification_metrics(EvalPrediction(predictions=np.log(probs) + 5.0, label_ids=np.array([0, 1, 1])))
    assert m2 == pytest.approx(m, rel=1e-12)
