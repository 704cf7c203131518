"""SVRG, alpha-SVRG and VSGD-PC: Theorem 2, reference twins, and the base optimizers."""

import pytest
import torch

from hf_ivonpc.optim import SVRG, VSGDPC, AlphaSVRG
from hf_ivonpc.optim import reference as ref

from _problems import drive, groups_of, loss_fn, make_data, make_params


def _logreg(n=40, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < 0.5).double()

    def grad_i(i, theta):  # gradient of log(1 + exp(-s x.theta)) + 0.005 |theta|^2, by hand
        p = torch.sigmoid(X[i] @ theta)
        return (p - y[i]) * X[i] + 0.01 * theta
    return X, y, grad_i


def test_theorem2_vsgd_pc_with_zero_noise_is_svrg_exactly():
    X, y, grad_i = _logreg()
    n, d = X.shape
    picks_a = iter(torch.randint(0, n, (200,), generator=torch.Generator().manual_seed(1)).tolist())
    picks_b = iter(torch.randint(0, n, (200,), generator=torch.Generator().manual_seed(1)).tolist())
    theta0 = torch.zeros(d, dtype=torch.float64)
    a = ref.svrg(grad_i, theta0, n, m=20, eta=0.3, outer_iters=5, pick=lambda: next(picks_a))
    b = ref.vsgd_pc(grad_i, theta0, n, m=20, eta=0.3, outer_iters=5, pick=lambda: next(picks_b),
                    noise=lambda: torch.zeros(d, dtype=torch.float64))
    assert len(a) == len(b) == 100
    for s, t in zip(a, b):
        assert torch.equal(s, t)
    # and with noise it is a different algorithm
    picks_c = iter(torch.randint(0, n, (200,), generator=torch.Generator().manual_seed(1)).tolist())
    c = ref.vsgd_pc(grad_i, theta0, n, m=20, eta=0.3, outer_iters=5, pick=lambda: next(picks_c),
                    noise=lambda: 0.1 * torch.randn(d, dtype=torch.float64))
    assert not torch.equal(c[-1], a[-1])


@pytest.mark.parametrize("cls", [SVRG, lambda p, **k: VSGDPC(p, noise_std=0.0, **k)])
def test_fast_svrg_follows_algorithm_1(cls):
    X, y, grad_i = _logreg()
    n, d = X.shape
    picks = torch.randint(0, n, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    it = iter(picks)
    expected = ref.svrg(grad_i, torch.zeros(d, dtype=torch.float64), n, m=20, eta=0.3,
                        outer_iters=5, pick=lambda: next(it))
    w = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
    opt = cls([w], lr=0.3, refresh_every=20)

    def loss(idx):
        z = X[idx] @ w
        return (torch.nn.functional.binary_cross_entropy_with_logits(z, y[idx]) + 0.005 * w.square().sum())
    for t, i in enumerate(picks):
        if opt.needs_refresh:
            with opt.refreshing():
                with opt.sampled_params(train=True, at="mega"):
                    loss(torch.arange(n)).backward()
        with opt.sampled_params(train=True):
            loss(torch.tensor([i])).backward()
        with opt.sampled_params(train=True, at="out"):
            loss(torch.tensor([i])).backward()
        opt.step()
        assert torch.allclose(w, expected[t], rtol=1e-12, atol=1e-13)


CONFIGS = [
    dict(base="sgd", momentum=0.0, weight_decay=0.0, noise_std=0.0),
    dict(base="sgd", momentum=0.9, weight_decay=1e-2, noise_std=0.05, rho1=0.5),
    dict(base="adamw", weight_decay=1e-2, noise_std=0.0, rho1=0.3),
    dict(base="adamw", weight_decay=0.0, noise_std=0.05),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("shared_noise,fused", [(True, False), (False, False), (True, True)])
def test_fast_equals_reference(cfg, shared_noise, fused):
    x, y = make_data()
    kw = dict(lr=0.05, alpha=0.6, refresh_every=4, start_step=2, shared_noise=shared_noise, **cfg)
    pf, pr = make_params(), make_params()
    fast = AlphaSVRG(groups_of(pf), generator=torch.Generator().manual_seed(4), fused=fused, **kw)
    slow = ref.AlphaSVRG(groups_of(pr), generator=torch.Generator().manual_seed(4), **kw)
    lf = drive(fast, pf, 22, x, y, micro=2)
    ls = drive(slow, pr, 22, x, y, micro=2)
    assert fast.refreshes == slow.refreshes == 5
    for a, b in zip(pf, pr):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert torch.allclose(torch.tensor(lf), torch.tensor(ls), rtol=1e-10)


@pytest.mark.parametrize("base,torch_cls,kw", [
    ("adamw", torch.optim.AdamW, dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)),
    ("sgd", torch.optim.SGD, dict(momentum=0.9, weight_decay=1e-3)),
])
def test_alpha_zero_is_the_torch_base_optimizer(base, torch_cls, kw):
    x, y = make_data()
    pa, pb = make_params(), make_params()
    ours = AlphaSVRG(pa, lr=0.01, alpha=0.0, base=base, **kw)
    theirs = torch_cls(pb, lr=0.01, **kw)
    assert not ours.needs_refresh
    for t in range(15):
        idx = slice(t % 8 * 8, (t % 8 + 1) * 8)
        with ours.sampled_params(train=True):
            loss_fn(pa, x[idx], y[idx]).backward()
        ours.step()
        theirs.zero_grad()
        loss_fn(pb, x[idx], y[idx]).backward()
        theirs.step()
    for a, b in zip(pa, pb):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
