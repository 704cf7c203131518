"""Bad parameters and calls raise a ValueError naming what is wrong, changing nothing.

(Each optimizer's bad constructor arguments, named with their value and accepted range, are
checked in test_optim_contract.py.)"""

import pytest
import torch

from hf_ivonpc.optim import IVON, IVONPC, AlphaSVRG, MegaBatchSampler

from _problems import make_params

IVON_KW = dict(lr=0.1, ess=100.0)


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
    state = {k: v.clone() for k, v in opt.flat_state(transient=True)[0].items()}
    with pytest.raises(ValueError, match="no collected gradients"):
        opt.step()
    assert opt.global_step == 0
    for a, b in zip(p, before):
        assert torch.equal(a, b)
    for k, v in opt.flat_state(transient=True)[0].items():
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
