"""Bad arguments raise a ValueError naming the argument and its accepted range, changing nothing."""

import pytest
import torch

from hf_ivonpc.optim import IVON, IVONPC, SVRG, VSGDPC, AlphaSVRG, MegaBatchSampler

from _problems import make_params

IVON_KW = dict(lr=0.1, ess=100.0)
BAD_IVON = [
    ("lr", 0.0), ("lr", -1.0), ("lr", float("nan")), ("ess", 0.0), ("ess", -5.0),
    ("hess_init", 0.0), ("hess_init", -1e-3), ("beta1", 1.0), ("beta1", -0.1), ("beta2", 1.0),
    ("beta2", 1.5), ("weight_decay", -1e-4), ("clip_radius", 0.0), ("mc_samples", 0),
    ("hess_approx", "exact"),
]
BAD_PC = [("alpha", -0.1), ("rho1", 1.1), ("rho1", -0.1), ("rho2", 2.0), ("mean_term_weight", -1.0),
          ("refresh_every", 0), ("start_step", -1), ("refresh_every", 2.5)]
BAD_SVRG = [("lr", 0.0), ("alpha", -1.0), ("base", "adam"), ("momentum", 1.0), ("weight_decay", -1.0),
            ("noise_std", -0.1), ("rho1", 1.5), ("refresh_every", 0), ("eps", 0.0)]


def _check(make, name, value):
    with pytest.raises(ValueError) as err:
        make(**{name: value})
    msg = str(err.value)
    assert name in msg and ("accepted" in msg), msg


@pytest.mark.parametrize("name,value", BAD_IVON)
def test_ivon(name, value):
    _check(lambda **k: IVON(make_params(), **{**IVON_KW, **k}), name, value)


@pytest.mark.parametrize("name,value", BAD_IVON[:-1] + BAD_PC)
def test_ivon_pc(name, value):
    _check(lambda **k: IVONPC(make_params(), **{**IVON_KW, **k}), name, value)


@pytest.mark.parametrize("name,value", BAD_SVRG)
def test_alpha_svrg(name, value):
    _check(lambda **k: AlphaSVRG(make_params(), **{"lr": 0.1, **k}), name, value)


def test_svrg_and_vsgd_pc():
    _check(lambda **k: SVRG(make_params(), **{"lr": 0.1, **k}), "lr", -1.0)
    _check(lambda **k: VSGDPC(make_params(), **{"lr": 0.1, **k}), "noise_std", -1.0)


def test_group_override_is_checked_and_named():
    p = make_params()
    with pytest.raises(ValueError, match=r"param_groups\[1\]\.lr"):
        IVON([{"params": p[:2]}, {"params": p[2:], "lr": -1.0}], **IVON_KW)


def test_beta_message_names_range():
    with pytest.raises(ValueError, match=r"beta2=1\.0 is invalid: accepted range is \[0, 1\)"):
        IVON(make_params(), lr=0.1, ess=1.0, beta2=1.0)
    with pytest.raises(ValueError, match=r"rho1=1\.5 is invalid: accepted range is \[0, 1\]"):
        IVONPC(make_params(), lr=0.1, ess=1.0, rho1=1.5)


def test_mixed_dtypes_and_devices_and_empty():
    a = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="params have mixed dtypes"):
        IVON([a, torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))], **IVON_KW)
    with pytest.raises(ValueError, match="params are on mixed devices"):
        IVON([a, torch.nn.Parameter(torch.zeros(3, device="meta"))], **IVON_KW)
    with pytest.raises(ValueError, match="params is empty"):
        IVONPC([], **IVON_KW)
    with pytest.raises(ValueError, match="same tensor twice"):
        AlphaSVRG([a, a], lr=0.1)


@pytest.mark.parametrize("make", [lambda p: IVON(p, **IVON_KW), lambda p: IVONPC(p, **IVON_KW),
                                  lambda p: AlphaSVRG(p, lr=0.1, base="adamw")])
def test_step_without_gradients_changes_nothing(make):
    p = make_params()
    opt = make(p)
    before = [q.detach().clone() for q in p]
    state = {k: v.clone() for k, v in opt._flat[0].items()}
    with pytest.raises(ValueError, match="no collected gradients"):
        opt.step()
    assert opt.global_step == 0
    for a, b in zip(p, before):
        assert torch.equal(a, b)
    for k, v in opt._flat[0].items():
        assert torch.equal(v, state[k]), k


def test_megabatch_sampler_arguments_and_resume():
    with pytest.raises(ValueError, match="megabatch_factor=0 is invalid"):
        MegaBatchSampler(100, 8, 0)
    with pytest.raises(ValueError, match=r"megabatch_factor=20 is invalid: accepted range is an integer in \[1, 12\]"):
        MegaBatchSampler(100, 8, 20)
    a = MegaBatchSampler(100, 8, 5, seed=3)
    a.sample()
    b = MegaBatchSampler(100, 8, 5, seed=9)
    b.load_state_dict(a.state_dict())
    for x, y in zip(a.sample(), b.sample()):
        assert torch.equal(x, y)
    mb = a.sample()
    flat = torch.cat(mb)
    assert len(mb) == 5 and flat.unique().numel() == 40   # without replacement
