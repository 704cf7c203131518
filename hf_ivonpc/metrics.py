"""Metrics for classifiers evaluated at the mean or with the posterior predictive."""

from __future__ import annotations

import numpy as np


def classification_metrics(eval_pred, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL and expected calibration error, as a Trainer ``compute_metrics``.

    ``predictions`` are logits or log-probabilities (they are normalised here), ``label_ids`` the
    classes. ECE uses ``n_bins`` equal-width confidence bins, weighted by their share of examples.
    """
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = np.asarray(logits, dtype=np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    probs = np.exp(logp)
    labels = np.asarray(labels)
    pred = probs.argmax(-1)
    conf = probs.max(-1)
    correct = (pred == labels).astype(np.float64)
    ece = 0.0
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return {"accuracy": float(correct.mean()),
            "nll": float(-logp[np.arange(len(labels)), labels].mean()),
            "ece": float(ece)}
