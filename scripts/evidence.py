"""When does posterior correction pay? The budget-matched evidence campaign: AdamW, alpha-SVRG,
IVON, IVON with a 3x mini-batch, IVON-PC and IVON-PCM, each on its own schedule per budget, every
one tuned by the same rule (the protocol: ``research.evidence``'s docstring, or ``--help``).

    python scripts/evidence.py --regime lm --workers 2            # resumes if stopped
    python scripts/evidence.py --regime image --workers 2         # needs Debian's dataset-fashion-mnist
    python scripts/evidence.py --regime continual --seeds 5       # the paper's continual claim, per CPU second
    python scripts/evidence.py --regime lm --budgets 1,2,3        # more budgets
    python scripts/evidence.py --regime lm --report_only          # tables and plots from finished runs
    python scripts/evidence.py --regime lm --status               # what has finished so far

Writes ``<out>/<regime>.json`` (summary, tuning curves, every run), ``<regime>.md`` and
``<regime>.png``; finished runs are cached in ``<out>/<regime>/runs/``.
"""

from research.evidence import main

if __name__ == "__main__":
    main()
