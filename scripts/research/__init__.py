"""The research code behind the evidence campaigns: not part of the ``hf_ivonpc`` package (the
wheel does not carry it), imported by the scripts beside it (``scripts/evidence.py``,
``scripts/logreg.py``, ``scripts/uncertainty.py``) and by the tests (``pythonpath`` in
pyproject.toml).

- :mod:`research.campaign`: what every campaign shares: cached runs keyed by the code that
  produced them, the tuning rule, intervals, CPU clocks, the read-off of a curve.
- :mod:`research.runner`: one run of a regime through ``PCTrainer``.
- :mod:`research.lm`, :mod:`research.image`, :mod:`research.continual`: the regimes' data and
  models (continual: an IVON-pretrained model continued on another corpus, budgets in CPU
  seconds).
- :mod:`research.evidence`: the budget-matched campaign over the regimes (``scripts/evidence.py``).
- :mod:`research.logreg`: the convex problems of the paper's Fig. 3.
"""
