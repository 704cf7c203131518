"""What a posterior is measured by on a classification (or multiple-choice) task.

Inputs are probabilities over C classes (answer choices) for N examples, ``probs`` [N, C], or
one such array per posterior draw, ``sample_probs`` [S, N, C] (from
``Posterior.predictive(..., select=token_ids, return_samples=True)``), with the gold classes
``labels`` [N]. NumPy arrays or torch tensors are accepted; results are Python floats or NumPy
arrays, computed in float64.

- :func:`accuracy`, :func:`nll`, :func:`brier` (scikit-learn's multiclass Brier score, not halved
  for two classes either: the sum over classes of the squared error, averaged over examples),
  :func:`ece` (equal-width bins of the confidence, the maximum probability, each bin (lo, hi]; the gap between accuracy and mean
  confidence weighted by the bin's share of the examples).
- :func:`decompose`: total uncertainty H(mean_s p_s) = aleatoric mean_s H(p_s) + epistemic (the
  mutual information between the answer and the weights), per example, in nats.
- :func:`risk_coverage`, :func:`aurc`, :func:`accuracy_at_coverage`: selective prediction, answering
  the most confident questions first.
- :func:`ood_auroc`: how well an uncertainty score separates out-of-distribution questions from
  in-distribution ones (scikit-learn's ROC AUC, out-of-distribution the positive class).
- :func:`fit_temperature` / :func:`apply_temperature`: temperature scaling, a 1-D minimisation of
  the NLL over log T on a selection split.
- :func:`summary` / :func:`predictive_summary`: all of the above as one dict of floats.
- :func:`plot_reliability`, :func:`plot_risk_coverage`: a reliability diagram, risk-coverage
  curves (PNG).
- :func:`question_metrics`: the mean's and the predictive's metrics of several evaluation sets
  (in and out of distribution) as one flat dict, with the k-curve and temperature scaling.
- :func:`vote`: the majority answer of several posterior draws' generations and its agreement
  (``Posterior.generate``).
"""

from __future__ import annotations

import math

import numpy as np

#: equal-width bins of the expected calibration error (15 as most LLM calibration papers, and 10)
ECE_BINS = (15, 10)
#: the share of questions answered in :func:`accuracy_at_coverage`'s default
COVERAGE = 0.8
_TINY = 1e-12


def _array(x, name: str, ndim: int) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"{name} has shape {a.shape}: accepted is an array of {ndim} dimensions")
    if a.size == 0:
        raise ValueError(f"{name} has shape {a.shape}: accepted is a non-empty array")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(a)).sum())} non-finite values: accepted are finite numbers")
    return a


def _probs(probs, name: str = "probs", ndim: int = 2) -> np.ndarray:
    p = _array(probs, name, ndim)
    if p.shape[-1] < 2:
        raise ValueError(f"{name} has {p.shape[-1]} class(es): accepted are at least 2")
    if (p < 0).any() or np.abs(p.sum(-1) - 1).max() > 1e-4:
        raise ValueError(f"{name} is not a probability distribution over its last axis (values in [0, 1] "
                         f"summing to 1; sums range from {p.sum(-1).min():.6g} to {p.sum(-1).max():.6g})")
    return p / p.sum(-1, keepdims=True)   # fp32 softmaxes sum to 1 within 1e-7 only


def _labels(labels, n: int, n_classes: int) -> np.ndarray:
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels has shape {y.shape} and dtype {y.dtype}: accepted are {n} integers")
    if (y < 0).any() or (y >= n_classes).any():
        raise ValueError(f"labels holds values from {y.min()} to {y.max()}: accepted range is 0 to {n_classes - 1}")
    return y


def _pair(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    p = _probs(probs)
    return p, _labels(labels, p.shape[0], p.shape[1])


def accuracy(probs, labels) -> float:
    p, y = _pair(probs, labels)
    return float((p.argmax(-1) == y).mean())


def nll(probs, labels) -> float:
    """Mean negative log-probability of the gold class (nats)."""
    p, y = _pair(probs, labels)
    return float(-np.log(np.maximum(p[np.arange(len(y)), y], _TINY)).mean())


def brier(probs, labels) -> float:
    """scikit-learn's multiclass Brier score: mean over examples of sum_c (p_c - [c = y])^2."""
    from sklearn.metrics import brier_score_loss

    p, y = _pair(probs, labels)
    return float(brier_score_loss(y, p, labels=list(range(p.shape[1])), scale_by_half=False))


def ece(probs, labels, n_bins: int = 15) -> float:
    """Expected calibration error over ``n_bins`` equal-width confidence bins (lo, hi]."""
    if not (isinstance(n_bins, int) and not isinstance(n_bins, bool) and n_bins >= 1):
        raise ValueError(f"n_bins={n_bins!r} is invalid: accepted range is an integer >= 1")
    p, y = _pair(probs, labels)
    conf = p.max(-1)
    correct = (p.argmax(-1) == y).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        inside = bins == b
        total += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return float(total)


def entropy(probs) -> np.ndarray:
    """Shannon entropy (nats) over the last axis."""
    p = np.asarray(probs, dtype=np.float64)
    return -(p * np.log(np.maximum(p, _TINY))).sum(-1)


def decompose(sample_probs) -> dict[str, np.ndarray]:
    """Per example: ``total`` = H(mean over draws), ``aleatoric`` = mean over draws of H(p_s) and
    ``epistemic`` = total - aleatoric (the mutual information, >= 0; 0 when every draw agrees)."""
    ps = _probs(sample_probs, "sample_probs", ndim=3)
    total = entropy(ps.mean(0))
    aleatoric = entropy(ps).mean(0)
    return {"total": total, "aleatoric": aleatoric, "epistemic": np.maximum(total - aleatoric, 0.0)}


def _selective(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    c = _array(confidence, "confidence", 1)
    ok = _array(correct, "correct", 1)
    if c.shape != ok.shape:
        raise ValueError(f"confidence has {c.shape[0]} entries but correct {ok.shape[0]}: accepted are equal lengths")
    order = np.argsort(-c, kind="stable")   # most confident first; ties keep their order
    return c[order], ok[order]


def risk_coverage(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, risk): answering the k most confident examples, k = 1..N, covers k / N of them
    with risk 1 - (their accuracy)."""
    _, ok = _selective(confidence, correct)
    k = np.arange(1, len(ok) + 1)
    return k / len(ok), 1.0 - np.cumsum(ok) / k


def aurc(confidence, correct) -> float:
    """Area under the risk-coverage curve: the mean of the risk over k = 1..N (lower is better)."""
    return float(risk_coverage(confidence, correct)[1].mean())


def accuracy_at_coverage(confidence, correct, coverage: float = COVERAGE) -> float:
    """Accuracy on the ceil(coverage N) most confident examples."""
    if not (isinstance(coverage, (int, float)) and 0 < coverage <= 1):
        raise ValueError(f"coverage={coverage!r} is invalid: accepted range is (0, 1]")
    _, ok = _selective(confidence, correct)
    k = max(1, math.ceil(coverage * len(ok) - 1e-9))
    return float(ok[:k].mean())


def ood_auroc(score_in, score_out) -> float:
    """ROC AUC of an uncertainty score (higher: more likely out of distribution) separating
    ``score_out`` (positives) from ``score_in``; 0.5 is chance."""
    from sklearn.metrics import roc_auc_score

    a, b = _array(score_in, "score_in", 1), _array(score_out, "score_out", 1)
    return float(roc_auc_score(np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b]))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """softmax(logits / T). Log-probabilities are valid logits, so a predictive is scaled through
    its log."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} is invalid: accepted range is a finite number > 0")
    return np.exp(_log_softmax(_array(logits, "logits", 2) / temperature))


def fit_temperature(logits, labels, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T in ``bounds`` minimising the NLL of softmax(logits / T) on (``logits``,
    ``labels``), a selection split: a bounded 1-D minimisation over log T."""
    from scipy.optimize import minimize_scalar

    lo, hi = bounds
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"bounds={bounds!r} is invalid: accepted is (lo, hi) with 0 < lo < hi < inf")
    z = _array(logits, "logits", 2)
    y = _labels(labels, z.shape[0], z.shape[1])

    def loss(log_t: float) -> float:
        return float(-_log_softmax(z / math.exp(log_t))[np.arange(len(y)), y].mean())

    res = minimize_scalar(loss, bounds=(math.log(lo), math.log(hi)), method="bounded",
                          options={"xatol": 1e-6})
    return float(math.exp(res.x))


def summary(probs, labels, coverage: float = COVERAGE) -> dict[str, float]:
    """accuracy, nll, brier, ece (15 bins), ece_10, aurc, acc_at_<coverage>, confidence (mean of
    the maximum probability) and entropy (mean)."""
    p, y = _pair(probs, labels)
    conf, correct = p.max(-1), (p.argmax(-1) == y).astype(np.float64)
    out = {"accuracy": accuracy(p, y), "nll": nll(p, y), "brier": brier(p, y)}
    out.update({("ece" if b == ECE_BINS[0] else f"ece_{b}"): ece(p, y, b) for b in ECE_BINS})
    out.update({"aurc": aurc(conf, correct),
                f"acc_at_{round(coverage * 100)}": accuracy_at_coverage(conf, correct, coverage),
                "confidence": float(conf.mean()), "entropy": float(entropy(p).mean())})
    return out


def predictive_summary(sample_probs, labels, coverage: float = COVERAGE) -> dict[str, float]:
    """:func:`summary` of the mean over draws, plus the mean aleatoric and epistemic uncertainty
    (``entropy`` is the total) and the AURC with the mutual information as the abstention score."""
    ps = _probs(sample_probs, "sample_probs", ndim=3)
    mean = ps.mean(0)
    out = summary(mean, labels, coverage)
    parts = decompose(ps)
    correct = (mean.argmax(-1) == _labels(labels, mean.shape[0], mean.shape[1])).astype(np.float64)
    out.update({"aleatoric": float(parts["aleatoric"].mean()), "epistemic": float(parts["epistemic"].mean()),
                "aurc_epistemic": aurc(-parts["epistemic"], correct)})
    return out


def safe_log(p: np.ndarray) -> np.ndarray:
    """log p with p floored at 1e-12 (a probability rounded to 0 stays finite)."""
    return np.log(np.maximum(p, _TINY))


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row (nats)."""
    return (p * (safe_log(p) - safe_log(q))).sum(-1)


def question_metrics(results: dict[str, dict], sel: dict | None, prefix: str) -> tuple[dict, dict]:
    """Mean and predictive metrics of several evaluation sets, as one flat dict of floats.

    ``results``: name -> {"mean": [N, C] probabilities at the posterior mean, "draws": [S, N, C]
    per-draw probabilities or None, "labels": [N], "seconds": {"mean": s, "draws": s}}; the first
    set is the in-distribution one (its keys carry no set name), the others are out of
    distribution. ``sel``: the same for a selection split (or None), on which temperatures are
    fitted and whose own metrics are reported as ``{prefix}_{mean,pred}_selection_*``.

    Keys: ``{prefix}_mean_*`` (:func:`summary`), ``{prefix}_pred_*`` (:func:`predictive_summary`
    of the draws, with ``kl_to_mean``), ``{prefix}_{mean,pred}_ts_*`` (temperature-scaled),
    ``{prefix}_pred_k{k}_{accuracy,nll,ece}`` for k = 1, 2, 4, ... < S (the first k of the same
    draws), seconds, and for each out-of-distribution set (and pooled) the AUROC of 1 - max
    probability and of the mutual information. Returns them and the fitted temperatures
    ({"mean": T, "pred": T})."""
    temps = {}
    metrics: dict[str, float] = {}
    if sel is not None:
        temps["mean"] = fit_temperature(safe_log(sel["mean"]), sel["labels"])
        # the selection split's own metrics: what hyperparameters are chosen by (never the test sets)
        metrics.update({f"{prefix}_mean_selection_{k}": v for k, v in summary(sel["mean"], sel["labels"]).items()})
        if sel["draws"] is not None:
            temps["pred"] = fit_temperature(safe_log(sel["draws"].mean(0)), sel["labels"])
            metrics.update({f"{prefix}_pred_selection_{k}": v
                            for k, v in predictive_summary(sel["draws"], sel["labels"]).items()})
    metrics.update({f"{prefix}_{kind}_temperature": t for kind, t in temps.items()})
    names = list(results)
    for i, name in enumerate(names):
        r = results[name]
        tag = f"{prefix}_{{kind}}_" + ("" if i == 0 else f"{name}_")
        kinds = {"mean": r["mean"]}
        if r["draws"] is not None:
            kinds["pred"] = r["draws"].mean(0)
        for kind, probs in kinds.items():
            stats = summary(probs, r["labels"]) if kind == "mean" else predictive_summary(r["draws"], r["labels"])
            metrics.update({tag.format(kind=kind) + k: v for k, v in stats.items()})
            if kind in temps:
                scaled = apply_temperature(safe_log(probs), temps[kind])
                metrics.update({tag.format(kind=f"{kind}_ts") + k: v for k, v in summary(scaled, r["labels"]).items()})
        if r["draws"] is not None:
            metrics[tag.format(kind="pred") + "kl_to_mean"] = float(kl(kinds["pred"], r["mean"]).mean())
            if i == 0:   # the k-curve: the predictive over the first k of the same draws
                k = 1
                while k < r["draws"].shape[0]:
                    first_k = r["draws"][:k].mean(0)
                    metrics.update({f"{prefix}_pred_k{k}_{key}": fn(first_k, r["labels"])
                                    for key, fn in (("accuracy", accuracy), ("nll", nll), ("ece", ece))})
                    k *= 2
        metrics[tag.format(kind="mean") + "seconds"] = r["seconds"]["mean"]
        if r["draws"] is not None:
            metrics[tag.format(kind="pred") + "seconds_per_draw"] = r["seconds"]["draws"] / r["draws"].shape[0]
    if len(names) > 1:
        first = results[names[0]]
        scores_in = {"mean": 1 - first["mean"].max(-1)}
        if first["draws"] is not None:
            scores_in["pred"] = 1 - first["draws"].mean(0).max(-1)
            scores_in["pred_epistemic"] = decompose(first["draws"])["epistemic"]
        pooled: dict[str, list] = {k: [] for k in scores_in}
        for name in names[1:]:
            r = results[name]
            out = {"mean": 1 - r["mean"].max(-1)}
            if r["draws"] is not None:
                out["pred"] = 1 - r["draws"].mean(0).max(-1)
                out["pred_epistemic"] = decompose(r["draws"])["epistemic"]
            for key, score in out.items():
                kind, _, by = key.partition("_")
                metrics[f"{prefix}_{kind}_{name}_ood_auroc" + (f"_{by}" if by else "")] = ood_auroc(scores_in[key], score)
                pooled[key].append(score)
        for key, parts in pooled.items():
            kind, _, by = key.partition("_")
            metrics[f"{prefix}_{kind}_ood_auroc" + (f"_{by}" if by else "")] = ood_auroc(scores_in[key], np.concatenate(parts))
    return metrics, temps


def reliability_bins(probs, labels, n_bins: int = 15) -> list[dict]:
    """Per non-empty bin (lo, hi]: its edges, count, accuracy and mean confidence."""
    p, y = _pair(probs, labels)
    conf, correct = p.max(-1), (p.argmax(-1) == y)
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    return [{"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": int((bins == b).sum()),
             "accuracy": float(correct[bins == b].mean()), "confidence": float(conf[bins == b].mean())}
            for b in np.unique(bins)]


def plot_reliability(curves: dict, labels, path, n_bins: int = 15, title: str = "") -> None:
    """Reliability diagram of several predictions of the same questions (``curves``: name ->
    probs [N, C]), with each one's ECE in the legend, written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
    for name, probs in curves.items():
        rows = reliability_bins(probs, labels, n_bins)
        ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker="o", ms=3,
                label=f"{name} (ECE {ece(probs, labels, n_bins):.3f})")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_risk_coverage(curves: dict, labels, path, title: str = "") -> None:
    """Risk-coverage curves (answer the most confident first) of several predictions of the same
    questions, each one's AURC in the legend, written to ``path`` (PNG). ``curves``: name -> probs
    [N, C] (confidence = max probability, scored against ``labels``) or name -> (confidence [N],
    correct [N]) for answers that are not a distribution (e.g. a vote's agreement; ``labels``
    unused)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, probs in curves.items():
        if isinstance(probs, tuple):
            conf, correct = (np.asarray(x) for x in probs)
        else:
            probs = np.asarray(probs)
            conf, correct = probs.max(-1), probs.argmax(-1) == np.asarray(labels)
        cov, risk = risk_coverage(conf, correct)
        ax.plot(cov, risk, label=f"{name} (AURC {aurc(conf, correct):.3f})")
    ax.set(xlabel="coverage (share answered)", ylabel="risk (error rate of the answered)", xlim=(0, 1),
           title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def vote(answers) -> tuple[list, np.ndarray]:
    """Majority vote per question over its draws' answers (``answers``: one list of hashable
    answers per question): the most frequent answer (a tie goes to the one given first) and the
    share of draws that gave it (the agreement, in (0, 1]: rank questions by it to abstain on the
    least agreed; see :func:`risk_coverage`)."""
    majority, agreement = [], []
    for row in answers:
        if not len(row):
            raise ValueError("answers holds a question with no answer: accepted are one or more per question")
        counts: dict = {}
        for a in row:
            counts[a] = counts.get(a, 0) + 1
        best = max(counts.values())
        majority.append(next(a for a in row if counts[a] == best))
        agreement.append(best / len(row))
    return majority, np.asarray(agreement, dtype=np.float64)
