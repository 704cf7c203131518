"""Every hyperparameter of IVON, IVON-PCM and the correction, defined once.

Each :class:`HParam` holds the optimizer keyword, the ``PCTrainingArguments`` field that sets it,
its default, its accepted range and its help text. The optimizers take their defaults and checks
from here, ``PCTrainingArguments`` builds its fields and checks from here, ``PCTrainer`` maps the
fields to the optimizer's keywords through here, and the model card reads its rows from here.

``IVON(...)`` keeps the defaults of ivon-opt 0.1.3 (it is a drop-in replacement for it) where they
differ from the project's: those differences are the ``ivon_opt`` column, and nowhere else.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite(x: Any) -> bool:
    return _number(x) and math.isfinite(x)


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Range:
    """An accepted range: a predicate and the words that describe it in an error."""

    ok: Callable[[Any], bool]
    text: str

    def check(self, name: str, value: Any) -> None:
        """Raise a ValueError naming ``name``, ``value`` and the accepted range."""
        if not self.ok(value):
            raise ValueError(f"{name}={value!r} is invalid: accepted range is {self.text}")


POSITIVE = Range(lambda v: _finite(v) and v > 0, "a finite number > 0")
NONNEG = Range(lambda v: _finite(v) and v >= 0, "a finite number >= 0")
BETA = Range(lambda v: _finite(v) and 0 <= v < 1, "[0, 1)")
UNIT = Range(lambda v: _finite(v) and 0 <= v <= 1, "[0, 1]")
RADIUS = Range(lambda v: _number(v) and v > 0 and v == v, "a number > 0 (inf disables clipping)")
INT1 = Range(lambda v: _integer(v) and v >= 1, "an integer >= 1")
INT0 = Range(lambda v: _integer(v) and v >= 0, "an integer >= 0")
BOOL = Range(lambda v: isinstance(v, bool), "True or False")
FRACTION = Range(lambda v: _finite(v) and 0 <= v < 1, "a fraction in [0, 1)")
STATE_DTYPE = Range(lambda v: v in ("float32", "bfloat16"), "'float32' or 'bfloat16'")
#: eta of Alg. 4 is a step size per coordinate of at most eta x clip_radius; beyond 100 a typo
LEARNING_RATE = Range(lambda v: _finite(v) and 0 < v <= 100, "a finite number in (0, 100]")


def check_int_min(name: str, value: Any, low: int) -> None:
    Range(lambda v: _integer(v) and v >= low, f"an integer >= {low}").check(name, value)


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: ``kwarg`` of the optimizers, ``field`` of ``PCTrainingArguments``."""

    kwarg: str | None
    field: str | None
    default: Any
    range: Range
    help: str
    #: the pc_method values it applies to (the model card lists it for these)
    methods: tuple[str, ...] = ("ivon", "ivon_pcm")
    #: ivon-opt 0.1.3's default where ``IVON(...)`` keeps it for compatibility (else the project's)
    ivon_opt: Any = None

    def check(self, value: Any, name: str | None = None) -> None:
        self.range.check(name or self.field or self.kwarg, value)

    @property
    def summary(self) -> str:
        """The help's first sentence (for tables and model cards)."""
        return re.split(r"(?<!Alg)\. ", self.help)[0].rstrip(".")


_IVON = ("ivon", "ivon_pcm")
_PC = ("ivon_pcm", "alpha_svrg")

HPARAMS: tuple[HParam, ...] = (
    HParam("ess", "ivon_ess", None, POSITIVE,
           "IVON's effective sample size kappa (sigma = 1 / sqrt(kappa (h + delta))). Unset: the "
           "number of likelihood terms in the training set (predicted tokens for language models, "
           "examples otherwise), and at least 1 / (h0 x sigma0_max^2), so that the initial "
           "posterior std is at most 1e-3."),
    HParam("hess_init", "ivon_hess_init", 1e-3, POSITIVE,
           "Initial Hessian h0: the first steps are g / h0 (clipped) and the initial sigma follows "
           "from it.", ivon_opt=1.0),
    HParam("beta1", "ivon_beta1", 0.9, BETA, "Momentum of the gradient."),
    HParam("beta2", "ivon_beta2", 0.99999, BETA,
           "Momentum of the Hessian h. After T steps h has moved 1 - beta2^T of the way from h0 "
           "(2% at 2,000 steps for 0.99999). Unset in PCTrainingArguments: 1 - 1/T for a run of T "
           "optimizer steps, at most 0.99999, so that h moves 63% of the way, as with the paper's "
           "0.99999 over its 100k steps."),
    HParam("clip_radius", "ivon_clip_radius", 1e-3, RADIUS,
           "Element-wise clipping of the preconditioned step: a weight moves by at most "
           "learning_rate x clip_radius per step (inf disables it).", ivon_opt=math.inf),
    HParam("weight_decay", "weight_decay", 0.0, NONNEG,
           "delta, the prior precision per likelihood term (0 on biases and norms).",
           ivon_opt=1e-4),
    HParam("rescale_lr", None, False, BOOL,
           "Multiply the learning rate by (h0 + delta), as ivon-opt does; False: learning_rate is "
           "the step size eta of Alg. 4.", ivon_opt=True),
    HParam("alpha", "pc_alpha", 0.5, NONNEG,
           "Weight of the correction (0 is IVON exactly). With a refresh every m steps from a "
           "mega-batch of K mini-batches the gain needs alpha^2 m / K well below 1 (0.25 at the "
           "default m = K = 10); 0.5 was the best of 0.1, 0.25, 0.5 and 1 for alpha-SVRG, IVON-PC "
           "and IVON-PCM in the evidence campaign's tuning. The paper tunes it per task (0.1 "
           "CIFAR-10, 0.6 ImageNet, 0.7 continual pretraining).", methods=_PC),
    HParam("rho1", "pc_rho1", 0.0, UNIT,
           "Outer momentum of g_out: weight of the old estimate (0: always the freshest "
           "mega-batch; 0.6 in the paper's GPT-2 pretraining).", methods=_PC),
    HParam("rho2", "pc_rho2", 0.0, UNIT,
           "Outer momentum of h_out: weight of the old estimate (0.1 in the paper's GPT-2 "
           "pretraining).", methods=("ivon_pcm",)),
    HParam("mean_term_weight", "pc_mean_term_weight", 0.01, NONNEG,
           "Weight of Alg. 4 line 14's extra mean term, which multiplies a noisy Hessian estimate "
           "(0.01 in the paper's logistic-regression and image runs; 1.0 with clip_radius 1e-3 "
           "for its transformers).", methods=("ivon_pcm",)),
    HParam("refresh_every", "pc_refresh_steps", 10, INT1,
           "Optimizer steps between two refreshes of the outer statistics (the inner-loop "
           "length m).", methods=_PC),
    HParam("start_step", "pc_start_step", 0, INT0,
           "Optimizer steps without correction first (no second pass, no refresh; 50,000 in the "
           "paper's GPT-2 run).", methods=_PC),
    HParam("shared_noise", "pc_shared_noise", True, BOOL,
           "theta_out reuses theta_in's standard-normal draw (common random numbers).",
           methods=_PC),
    HParam("state_dtype", "pc_state_dtype", "float32", STATE_DTYPE,
           "Storage of the optimizer state: 'bfloat16' keeps momentum, h, the per-step gradient "
           "statistics and IVON-PCM's outer statistics in bf16, computed in fp32 and written "
           "with stochastic rounding (IVON 20 -> 14 bytes per parameter, IVON-PCM 40 -> 26; "
           "16 -> 10 and 36 -> 22 on GPUs, where the noise is drawn again instead of kept); "
           "the mean and the noise stay fp32.", methods=_IVON),
    HParam(None, "pc_start_ratio", 0.0, FRACTION,
           "Share of the run's optimizer steps without correction first, used when "
           "pc_start_step is 0 (a step count wins over a ratio, as warmup_steps over a ratio): a "
           "config that starts the correction late works at any run length.", methods=_PC),
    HParam(None, "pc_megabatch_factor", 10, INT1,
           "Mega-batch size in mini-batches (per-device batch x accumulation steps x processes).",
           methods=_PC),
    HParam(None, "pc_log_diagnostics", True, BOOL,
           "Log what the correction does at logging_steps: pc/grad_var_ratio and "
           "pc/hess_var_ratio (variance of the corrected estimate over the plain one; < 1 is a "
           "gain), pc/clipped_share and pc/h_out_negative_share.", methods=_IVON),
    HParam(None, "pc_max_skipped_steps", 10, INT1,
           "Consecutive optimizer steps (and refreshes) skipped for non-finite gradients after "
           "which training stops with an error naming the step and the pass: a step whose "
           "theta_in or theta_out gradient holds a NaN or inf is skipped (the state and the "
           "noise generator stay as they were), a refresh with a non-finite micro-batch keeps the "
           "previous outer statistics; both are counted in pc/skipped_steps and "
           "pc/skipped_refreshes.", methods=("ivon", "ivon_pcm", "alpha_svrg")),
    HParam(None, "eval_mc_samples", 0, INT0,
           "0: evaluate at the posterior mean; k > 0: the posterior predictive, output "
           "probabilities averaged over k draws.", methods=_IVON),
)

#: fields that PCTrainingArguments leaves unset (None) by default: resolved for the run
RESOLVED_FIELDS = ("ivon_ess", "ivon_beta2")

BY_KWARG: dict[str, HParam] = {h.kwarg: h for h in HPARAMS if h.kwarg}
BY_FIELD: dict[str, HParam] = {h.field: h for h in HPARAMS if h.field}

#: eta when learning_rate is unset, for the IVON methods
DEFAULT_IVON_LR = 1.0
#: the largest initial posterior std the default ess allows
DEFAULT_SIGMA0 = 1e-3


def beta2_for_horizon(num_steps: int) -> float:
    """beta2 under which h moves 1 - 1/e (63%) of the way from h0 in ``num_steps`` steps, as the
    paper's 0.99999 does in 100k steps (capped there)."""
    return min(BY_KWARG["beta2"].default, 1.0 - 1.0 / max(num_steps, 2))


def default(kwarg: str, ivon_opt: bool = False) -> Any:
    """The default of optimizer keyword ``kwarg`` (ivon-opt's where ``ivon_opt`` and it differs)."""
    h = BY_KWARG[kwarg]
    return h.ivon_opt if ivon_opt and h.ivon_opt is not None else h.default


def check(kwarg: str, value: Any, name: str | None = None) -> None:
    """Check an optimizer keyword's value against its range (the error names ``name``)."""
    BY_KWARG[kwarg].check(value, name or kwarg)


def optimizer_kwargs(args: Any, method: str) -> dict[str, Any]:
    """The optimizer keywords for ``method``: from the fields of ``args`` where a field sets
    them, the project's defaults for the rest (never ivon-opt's)."""
    out = {}
    for h in HPARAMS:
        if h.kwarg and method in h.methods:
            value = getattr(args, h.field) if h.field else h.default
            if value is not None:
                out[h.kwarg] = value
    return out


def markdown_table() -> str:
    """The README's table of every hyperparameter: one row per entry of ``HPARAMS``."""
    def show(v):
        if v is None:
            return "resolved per run"
        if isinstance(v, float) and math.isinf(v):
            return "inf"
        return f"{v:g}" if isinstance(v, float) else str(v)

    rows = ["| field (`PCTrainingArguments`) | keyword (`IVONPC`, `IVON`) | default | `IVON(...)` (ivon-opt) | accepted | what it is |",
            "|---|---|---|---|---|---|"]
    for h in HPARAMS:
        default = None if h.field in RESOLVED_FIELDS else h.default
        if h.kwarg == "beta2":
            default = f"1 - 1/T (T steps), <= {h.default:g}"
        ivon = show(h.ivon_opt) if h.ivon_opt is not None else ("same" if h.kwarg and h.kwarg != "ess" else "")
        rows.append(f"| {'`' + h.field + '`' if h.field else ''} | {'`' + h.kwarg + '`' if h.kwarg else ''} | "
                    f"{default if isinstance(default, str) else show(default)} | {ivon} | {h.range.text} | "
                    f"{h.summary} |")
    return "\n".join(rows)
