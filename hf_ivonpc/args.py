"""PCTrainingArguments: TrainingArguments plus the variational and correction settings.

Every field has a help string, so ``HfArgumentParser`` turns them into CLI flags and YAML keys.
The defaults, ranges and help of the IVON and correction fields come from
:mod:`hf_ivonpc.optim.hparams`, the same table the optimizers read; ``learning_rate`` is the step
size eta of Alg. 4 for the IVON methods (0.3 in the paper's GPT-2 runs).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .optim.hparams import (BY_FIELD, DEFAULT_IVON_LR, DEFAULT_SIGMA0, LEARNING_RATE, POSITIVE,
                            RESOLVED_FIELDS)

PC_METHODS = ("ivon", "ivon_pcm", "alpha_svrg", "none")
__all__ = ["PCTrainingArguments", "PC_METHODS", "DEFAULT_IVON_LR", "DEFAULT_SIGMA0"]


def _bad(name: str, value, accepted: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid: accepted range is {accepted}")


def _cpu_only_launch() -> bool:
    """Several processes launched (WORLD_SIZE > 1) on a machine without an accelerator."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or (xpu is not None and xpu.is_available())
                or torch.backends.mps.is_available())


def _hp(name: str):
    """The dataclass field of hyperparameter ``name``: default and help from ``optim.hparams``."""
    h = BY_FIELD[name]
    value = None if name in RESOLVED_FIELDS else h.default
    return field(default=value, metadata={"help": f"{h.help} Accepted: {h.range.text}."})


@dataclass
class PCTrainingArguments(TrainingArguments):
    learning_rate: float | None = field(default=None, metadata={
        "help": f"Step size. Unset: {DEFAULT_IVON_LR} for 'ivon' and 'ivon_pcm' (eta of Alg. 4; with "
                "the default clip radius 1e-3 a step moves a weight by at most 1e-3), Trainer's 5e-5 "
                "otherwise."})
    pc_method: str = field(default="ivon_pcm", metadata={
        "help": "Optimizer: 'ivon', 'ivon_pcm' (IVON with posterior correction and outer momentum), "
                "'alpha_svrg' (the correction over Trainer's own optim, AdamW or SGD) or 'none' "
                "(plain Trainer)."})
    ivon_ess: float | None = _hp("ivon_ess")
    ivon_hess_init: float = _hp("ivon_hess_init")
    ivon_beta1: float = _hp("ivon_beta1")
    ivon_beta2: float | None = _hp("ivon_beta2")
    ivon_clip_radius: float = _hp("ivon_clip_radius")
    pc_alpha: float = _hp("pc_alpha")
    pc_rho1: float = _hp("pc_rho1")
    pc_rho2: float = _hp("pc_rho2")
    pc_megabatch_factor: int = _hp("pc_megabatch_factor")
    pc_refresh_steps: int = _hp("pc_refresh_steps")
    pc_start_step: int = _hp("pc_start_step")
    pc_start_ratio: float = _hp("pc_start_ratio")
    pc_mean_term_weight: float = _hp("pc_mean_term_weight")
    pc_shared_noise: bool = _hp("pc_shared_noise")
    pc_state_dtype: str = _hp("pc_state_dtype")
    pc_log_diagnostics: bool = _hp("pc_log_diagnostics")
    pc_max_skipped_steps: int = _hp("pc_max_skipped_steps")
    eval_mc_samples: int = _hp("eval_mc_samples")

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
        (LEARNING_RATE if variational else POSITIVE).check("learning_rate", self.learning_rate)
        if variational and self.fp16:
            raise ValueError("fp16=True is invalid with pc_method="
                             f"{self.pc_method!r}: IVON reads gradients before any unscaling; use "
                             "bf16=True (fp32 parameters under bf16 autocast)")
        for name, h in BY_FIELD.items():
            value = getattr(self, name)
            if not (name in RESOLVED_FIELDS and value is None):
                h.check(value)
        if self.eval_mc_samples and not variational:
            raise _bad("eval_mc_samples", self.eval_mc_samples,
                       f"0 with pc_method={self.pc_method!r} (only IVON methods have a posterior)")
        if not self.use_cpu and _cpu_only_launch():
            # without it every rank reports world size 1, trains alone and writes to output_dir
            warnings.warn(f"{os.environ['WORLD_SIZE']} processes launched on a machine without an "
                          "accelerator: setting use_cpu=True so that they train together (gloo)",
                          UserWarning, stacklevel=3)
            self.use_cpu = True
        if (self.pc_method in ("ivon_pcm", "alpha_svrg") and self.max_steps > 0
                and self.pc_start_step >= self.max_steps):
            raise _bad("pc_start_step", self.pc_start_step,
                       f"an integer < max_steps={self.max_steps} (the correction would never start; "
                       "pc_start_ratio scales with the run length)")
        super().__post_init__()
        self._check_optim()
        self._check_report_to()

    def _check_report_to(self) -> None:
        """An integration named in report_to must be installed: say so now, not at Trainer's start."""
        from transformers.integrations import get_available_reporting_integrations
        available = get_available_reporting_integrations()
        for name in self.report_to or []:
            if name not in available:
                extra = ' (or pip install "hf_ivonpc[tensorboard]")' if name == "tensorboard" else ""
                raise _bad("report_to", name, f"an installed integration {sorted(available)} or 'none': "
                           f"install it with pip install {name}{extra}")

    def _check_optim(self) -> None:
        """IVON methods ignore Trainer's optim and adam_* settings; alpha-SVRG runs over AdamW or SGD."""
        optim = str(getattr(self.optim, "value", self.optim))
        if self.pc_method == "alpha_svrg" and not (optim.startswith("adamw") or optim.startswith("sgd")):
            raise _bad("optim", optim, "an AdamW or SGD variant with pc_method='alpha_svrg' (the "
                       "base optimizer under the correction)")
        if self.pc_method in ("ivon", "ivon_pcm"):
            ref = TrainingArguments.__dataclass_fields__
            changed = [n for n in ("optim", "adam_beta1", "adam_beta2", "adam_epsilon")
                       if str(getattr(getattr(self, n), "value", getattr(self, n)))
                       != str(getattr(ref[n].default, "value", ref[n].default))]
            if changed:
                warnings.warn(f"{', '.join(changed)} set but ignored with pc_method={self.pc_method!r}: "
                              "the optimizer is IVON (ivon_* and pc_* fields set it)", UserWarning,
                              stacklevel=3)

    def start_step(self, num_training_steps: int) -> int:
        """Optimizer steps before the correction starts, in a run of ``num_training_steps``."""
        if self.pc_start_step or not self.pc_start_ratio:   # a step count wins over a ratio
            return self.pc_start_step
        return math.ceil(self.pc_start_ratio * num_training_steps)

    @property
    def corrects(self) -> bool:
        return self.pc_method in ("ivon_pcm", "alpha_svrg") and self.pc_alpha > 0
