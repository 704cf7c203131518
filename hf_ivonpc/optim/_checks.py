"""Argument checks shared by the optimizers.

Every check raises a ValueError naming the argument, its value and the accepted range
(``lr=0.0 is invalid: accepted range is a finite number > 0``), before anything is changed. The
ranges of the hyperparameters are defined once in :mod:`hparams`; the checks of the parameters
themselves (none, twice, mixed devices or dtypes) are here.
"""

from __future__ import annotations

from typing import Any

import torch

from . import hparams


def check_arg(name: str, value: Any, ok: bool, accepted: str) -> None:
    """Raise a ValueError naming the argument and its accepted range."""
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: accepted range is {accepted}")


def check_flag(name: str, value: Any, allow_none: bool = False) -> None:
    """``value`` is True or False (or None where ``allow_none``): 1, "yes" and the like are not."""
    ok = isinstance(value, bool) or (allow_none and value is None)
    check_arg(name, value, ok, "None, True or False" if allow_none else "True or False")


check_positive = hparams.POSITIVE.check
check_nonneg = hparams.NONNEG.check
check_beta = hparams.BETA.check
check_unit = hparams.UNIT.check
check_radius = hparams.RADIUS.check
check_int_min = hparams.check_int_min


def check_param_list(params: list) -> None:
    """``params`` (tensors or parameter groups) is not empty and holds each tensor once."""
    if len(params) == 0:
        raise ValueError("params is empty: the optimizer got no parameters")
    flat_list = [q for g in params for q in g["params"]] if isinstance(params[0], dict) else params
    if len(set(map(id, flat_list))) != len(flat_list):
        raise ValueError("params contains the same tensor twice: accepted is each parameter once")


def check_one_device_and_dtype(params: list[torch.Tensor]) -> tuple[torch.device, torch.dtype]:
    """The one device and the one floating dtype of all ``params``."""
    devices = {p.device for p in params}
    dtypes = {p.dtype for p in params}
    if len(devices) > 1:
        raise ValueError(f"params are on mixed devices {sorted(map(str, devices))}: "
                         "accepted is one device for all parameters")
    if len(dtypes) > 1:
        raise ValueError(f"params have mixed dtypes {sorted(map(str, dtypes))}: "
                         "accepted is one floating dtype for all parameters")
    pdtype = next(iter(dtypes))
    if not pdtype.is_floating_point:
        raise ValueError(f"params have dtype {pdtype}: accepted are floating dtypes")
    return next(iter(devices)), pdtype


#: the accepted values of ``state_dtype`` (names as in ``torch``)
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_state_dtype(value: Any, state: torch.dtype, cls: type) -> tuple[str, torch.dtype]:
    """The name of ``state_dtype`` ("float32" or "bfloat16") and the dtype of an optimizer's
    low-precision buffers: ``state`` (fp32, or fp64 with fp64 parameters) for None or "float32",
    bf16 for "bfloat16" / ``torch.bfloat16`` where the class has such buffers."""
    name = value if isinstance(value, str) or value is None else str(value).removeprefix("torch.")
    if name is not None and name not in STATE_DTYPES:
        raise ValueError(f"state_dtype={value!r} is invalid: accepted are None, "
                         f"{', '.join(repr(k) for k in STATE_DTYPES)} or the torch dtypes")
    if name in (None, "float32"):
        return "float32", state
    if not cls.low_precision_buffers:
        raise ValueError(f"state_dtype={value!r} is invalid for {cls.__name__}: accepted is "
                         "'float32' (it has no low-precision state)")
    return name, STATE_DTYPES[name]
