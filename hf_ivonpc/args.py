"""PCTrainingArguments: TrainingArguments plus the variational and correction settings.

Every field has a help string, so ``HfArgumentParser`` turns them into CLI flags and YAML keys.
Defaults follow the paper's GPT-2 recipe (App. D.2) where it has one; ``learning_rate`` is the
step size eta of Alg. 4 for the IVON methods (0.3 in the paper's GPT-2 runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

PC_METHODS = ("ivon", "ivon_pcm", "alpha_svrg", "none")
#: eta when learning_rate is unset (measured on a small BERT classifier and a small GPT-2: see README)
DEFAULT_IVON_LR = 1.0
#: the initial posterior std that the default ess guarantees at most
DEFAULT_SIGMA0 = 1e-3


def _bad(name: str, value, accepted: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid: accepted range is {accepted}")


@dataclass
class PCTrainingArguments(TrainingArguments):
    learning_rate: float | None = field(default=None, metadata={
        "help": "Step size. Unset: 1.0 for 'ivon' and 'ivon_pcm' (eta of Alg. 4; with the default "
                "clip radius 1e-3 a step moves a weight by at most 1e-3), Trainer's 5e-5 otherwise."})
    pc_method: str = field(default="ivon_pcm", metadata={
        "help": "Optimizer: 'ivon', 'ivon_pcm' (IVON with posterior correction and outer momentum), "
                "'alpha_svrg' (the correction over Trainer's own optim, AdamW or SGD) or 'none' "
                "(plain Trainer)."})
    ivon_ess: float | None = field(default=None, metadata={
        "help": "IVON's effective sample size kappa. Default: the number of likelihood terms in the "
                "training set (predicted tokens for language models, examples otherwise), and at "
                "least 1 / (ivon_hess_init * 1e-6), so that the initial posterior std is <= 1e-3."})
    ivon_hess_init: float = field(default=1e-3, metadata={"help": "Initial Hessian h0 (> 0)."})
    ivon_beta1: float = field(default=0.9, metadata={"help": "Momentum of the gradient, in [0, 1)."})
    ivon_beta2: float = field(default=0.99999, metadata={"help": "Momentum of the Hessian, in [0, 1)."})
    ivon_clip_radius: float = field(default=1e-3, metadata={
        "help": "Element-wise clipping of the preconditioned step (inf disables it)."})
    pc_alpha: float = field(default=1.0, metadata={"help": "Weight of the correction (>= 0; 0 is IVON)."})
    pc_rho1: float = field(default=0.6, metadata={
        "help": "Outer momentum of g_out: weight of the old estimate, in [0, 1]."})
    pc_rho2: float = field(default=0.1, metadata={
        "help": "Outer momentum of h_out: weight of the old estimate, in [0, 1]."})
    pc_megabatch_factor: int = field(default=10, metadata={
        "help": "Mega-batch size in mini-batches (per device batch x accumulation steps)."})
    pc_refresh_steps: int = field(default=10, metadata={
        "help": "Optimizer steps between two refreshes of the outer statistics."})
    pc_start_step: int = field(default=0, metadata={
        "help": "Optimizer steps without correction first (50,000 in the paper's GPT-2 run)."})
    pc_mean_term_weight: float = field(default=1.0, metadata={
        "help": "Weight of Alg. 4 line 14's extra mean term (1.0 with clipping for transformers, "
                "0.01 for CNNs and logistic regression)."})
    pc_shared_noise: bool = field(default=True, metadata={
        "help": "theta_out reuses theta_in's standard-normal draw (common random numbers)."})
    eval_mc_samples: int = field(default=0, metadata={
        "help": "0: evaluate at the posterior mean; k > 0: the posterior predictive, output "
                "probabilities averaged over k draws (ivon and ivon_pcm)."})

    def __getstate__(self) -> dict:
        """Pickled without ``hub_token``: Trainer saves the arguments as ``training_args.bin`` in
        every checkpoint and in ``output_dir``, and ``push_to_hub`` uploads that file."""
        state = self.__dict__.copy()
        if state.get("hub_token") is not None:
            state["hub_token"] = None
        return state

    def __post_init__(self):
        if self.pc_method not in PC_METHODS:
            raise _bad("pc_method", self.pc_method, f"one of {PC_METHODS}")
        variational = self.pc_method in ("ivon", "ivon_pcm")
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_IVON_LR if variational else 5e-5
        if variational and self.fp16:
            raise ValueError("fp16=True is invalid with pc_method="
                             f"{self.pc_method!r}: IVON reads gradients before any unscaling; use "
                             "bf16=True (fp32 parameters under bf16 autocast)")
        if self.ivon_ess is not None and not self.ivon_ess > 0:
            raise _bad("ivon_ess", self.ivon_ess, "a number > 0 (or unset)")
        if not self.ivon_hess_init > 0:
            raise _bad("ivon_hess_init", self.ivon_hess_init, "a number > 0")
        for name in ("ivon_beta1", "ivon_beta2"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise _bad(name, v, "[0, 1)")
        if not self.ivon_clip_radius > 0:
            raise _bad("ivon_clip_radius", self.ivon_clip_radius, "a number > 0 (inf disables clipping)")
        if not self.pc_alpha >= 0:
            raise _bad("pc_alpha", self.pc_alpha, "a number >= 0")
        for name in ("pc_rho1", "pc_rho2"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise _bad(name, v, "[0, 1]")
        for name in ("pc_megabatch_factor", "pc_refresh_steps"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise _bad(name, v, "an integer >= 1")
        if not (isinstance(self.pc_start_step, int) and self.pc_start_step >= 0):
            raise _bad("pc_start_step", self.pc_start_step, "an integer >= 0")
        if not (isinstance(self.eval_mc_samples, int) and self.eval_mc_samples >= 0):
            raise _bad("eval_mc_samples", self.eval_mc_samples, "an integer >= 0")
        if self.eval_mc_samples and not variational:
            raise _bad("eval_mc_samples", self.eval_mc_samples,
                       f"0 with pc_method={self.pc_method!r} (only IVON methods have a posterior)")
        if not self.pc_mean_term_weight >= 0:
            raise _bad("pc_mean_term_weight", self.pc_mean_term_weight, "a number >= 0")
        if (self.pc_method in ("ivon_pcm", "alpha_svrg") and self.max_steps > 0
                and self.pc_start_step >= self.max_steps):
            raise _bad("pc_start_step", self.pc_start_step,
                       f"an integer < max_steps={self.max_steps} (the correction would never start)")
        super().__post_init__()

    @property
    def corrects(self) -> bool:
        return self.pc_method in ("ivon_pcm", "alpha_svrg") and self.pc_alpha > 0
