"""PCArgsMixin: the variational and correction settings, to mix into any ``TrainingArguments``.

``PCArgsMixin`` holds only the ``ivon_*``, ``pc_*`` and ``eval_*`` fields (and leaves
``learning_rate`` unset, so that it resolves per method), with their validation; a named
combination puts it first, over the configuration class that owns every other default:
``PCTrainingArguments(PCArgsMixin, TrainingArguments)`` here, ``PCSFTConfig(PCArgsMixin,
SFTConfig)`` and ``PCDPOConfig(PCArgsMixin, DPOConfig)`` in :mod:`hf_ivonpc.trl`. Inheriting two
full configuration classes instead would silently replace one side's defaults.

Every field has a help string, so ``HfArgumentParser`` turns them into CLI flags and YAML keys.
The fields are made from :mod:`hf_ivonpc.optim.hparams`, the same table the optimizers read (its
default, range and help; a new entry there is a new field here); ``learning_rate`` is the step
size eta of Alg. 4 for the IVON methods (0.3 in the paper's GPT-2 runs).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .optim.hparams import (BY_FIELD, DEFAULT_IVON_LR, DEFAULT_SIGMA0, LEARNING_RATE, POSITIVE,
                            RESOLVED_FIELDS)

PC_METHODS = ("ivon", "ivon_pcm", "alpha_svrg", "none")
__all__ = ["PCArgsMixin", "PCTrainingArguments", "PC_METHODS", "DEFAULT_IVON_LR", "DEFAULT_SIGMA0"]


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
    # argparse %-formats help texts: a bare "2%" would break --help
    text = f"{h.help} Accepted: {h.range.text}.".replace("%", "%%")
    return field(default=value, metadata={"help": text})


def _annotation(name: str):
    """The field's type, from its default (``X | None`` where it is resolved per run), so that
    ``HfArgumentParser`` parses the flag."""
    default = BY_FIELD[name].default
    kind = float if default is None else type(default)
    return (kind | None) if name in RESOLVED_FIELDS else kind


def _table_fields(cls):
    """Add a field per entry of the table that ``TrainingArguments`` does not already own
    (``weight_decay`` is Trainer's: the table only checks it)."""
    own = TrainingArguments.__dataclass_fields__
    for name in BY_FIELD:
        if name not in own:
            cls.__annotations__[name] = _annotation(name)
            setattr(cls, name, _hp(name))
    return cls


@dataclass
@_table_fields
class PCArgsMixin:
    """The ``ivon_*``, ``pc_*`` and ``eval_*`` fields and their checks, mixed in first:
    ``class MyConfig(PCArgsMixin, SomeTrainingArguments)``."""

    learning_rate: float | None = field(default=None, metadata={
        "help": f"Step size. Unset: {DEFAULT_IVON_LR} for 'ivon' and 'ivon_pcm' (eta of Alg. 4; with "
                "the default clip radius 1e-3 a step moves a weight by at most 1e-3), the default of "
                "the configuration it is mixed into otherwise (Trainer's 5e-5, TRL's per trainer)."})
    pc_method: str = field(default="ivon_pcm", metadata={
        "help": "Optimizer: 'ivon', 'ivon_pcm' (IVON with posterior correction and outer momentum), "
                "'alpha_svrg' (the correction over Trainer's own optim, AdamW or SGD) or 'none' "
                "(plain Trainer)."})

    eval_answer_tokens: list[str] | None = field(default=None, metadata={
        "help": "Answer tokens of a multiple-choice evaluation (e.g. ' A' ' B' ' C' ' D', each one "
                "token of the tokenizer): evaluation then scores the softmax over these tokens' "
                "logits at the last position of every left-padded eval row, whose 'labels' is the "
                "index of the gold answer, and logs eval_mean_* (accuracy, NLL, Brier, ECE, "
                "selective prediction) and, with eval_mc_samples = k > 0, eval_pred_* (the "
                "predictive over k draws, its uncertainty split) and the k-curve eval_pred_k*; "
                "eval_loss is the NLL of the predictive (of the mean when k = 0)."})

    def __getstate__(self) -> dict:
        """Pickled without ``hub_token``: Trainer saves the arguments as ``training_args.bin`` in
        every checkpoint and in ``output_dir``, and ``push_to_hub`` uploads that file."""
        state = self.__dict__.copy()
        if state.get("hub_token") is not None:
            state["hub_token"] = None
        return state

    @classmethod
    def base_default(cls, name: str):
        """The default of field ``name`` in the configuration class this mixin is mixed into (the
        first dataclass after it in the method resolution order that has the field)."""
        mro = cls.__mro__
        for klass in mro[mro.index(PCArgsMixin) + 1:]:
            f = getattr(klass, "__dataclass_fields__", {}).get(name)
            if f is not None:
                return f.default_factory() if f.default is dataclasses.MISSING else f.default
        raise AttributeError(f"{cls.__name__} has no base configuration with a field {name!r}")

    def __post_init__(self):
        if self.pc_method not in PC_METHODS:
            raise _bad("pc_method", self.pc_method, f"one of {PC_METHODS}")
        variational = self.pc_method in ("ivon", "ivon_pcm")
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_IVON_LR if variational else self.base_default("learning_rate")
        (LEARNING_RATE if variational else POSITIVE).check("learning_rate", self.learning_rate)
        if variational and self.fp16:
            raise ValueError("fp16=True is invalid with pc_method="
                             f"{self.pc_method!r}: IVON reads gradients before any unscaling; use "
                             "bf16=True (fp32 parameters under bf16 autocast)")
        for name, h in BY_FIELD.items():
            value = getattr(self, name)
            if not (name in RESOLVED_FIELDS and value is None):
                h.check(value)
        tokens = self.eval_answer_tokens
        if tokens is not None and not (isinstance(tokens, (list, tuple)) and len(tokens) >= 2
                                       and all(isinstance(t, str) and t for t in tokens)
                                       and len(set(tokens)) == len(tokens)):
            raise _bad("eval_answer_tokens", tokens, "None or a list of at least 2 distinct non-empty "
                       "strings (one token each)")
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
            changed = [n for n in ("optim", "adam_beta1", "adam_beta2", "adam_epsilon")
                       if str(getattr(getattr(self, n), "value", getattr(self, n)))
                       != str(getattr(self.base_default(n), "value", self.base_default(n)))]
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


@dataclass
class PCTrainingArguments(PCArgsMixin, TrainingArguments):
    """``TrainingArguments`` plus the variational and correction settings (for ``PCTrainer``)."""
