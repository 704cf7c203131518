"""``state_dtype="bfloat16"``: momentum, h, the step's accumulators (and IVONPC's g_out, h_out,
sigma_out) in bf16, the persistent ones written with stochastic rounding. The rounding is unbiased, h keeps moving where round-to-nearest would freeze it, a
resumed run is bit-exact, and the state takes the bytes it should."""

import io

import pytest
import torch

from hf_ivonpc.optim import IVON, IVONPC, _random
from hf_ivonpc.optim._kernels import store

from _problems import drive, inner_step, loss_fn, make_data, make_params


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above |x| in magnitude (x not representable), signed as x."""
    down = (x.view(torch.int32) & -65536).view(torch.float32)      # truncated toward zero
    up = ((x.view(torch.int32) & -65536) + 65536).view(torch.float32)
    return down, up


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=g) * torch.logspace(-6, 3, 64)
    draws = 4096
    dst = torch.empty(draws, 64, dtype=torch.bfloat16)
    bits = torch.randn(draws, 64, generator=g)          # the source of the random bits
    for salt in range(4):
        store(dst, x.expand(draws, 64), bits, salt)
        down, up = _neighbours(x)
        out = dst.float()
        assert torch.all((out == down) | (out == up))
        # P(up) = (x - down) / (up - down): the mean of the draws is x (binomial error < 5 sd)
        p = (x - down) / (up - down)
        share_up = (out == up).double().mean(0)
        sd = (p * (1 - p) / draws).sqrt().double()
        assert torch.all((share_up - p.double()).abs() <= 5 * sd + 1e-12)
    # round to nearest is biased here: these values would all round down
    assert (x.to(torch.bfloat16).float() == _neighbours(x)[0]).float().mean() > 0.3


def test_fp32_destination_is_a_plain_copy():
    dst = torch.empty(5)
    store(dst, torch.arange(5.0) / 3, torch.randn(5), 1)
    assert torch.equal(dst, torch.arange(5.0) / 3)


def _drive(opt, params, steps, x, y):
    """The correction protocol with a data order fixed by the step count (so that a resumed
    optimizer sees what an uninterrupted one sees)."""
    for _ in range(steps):
        t = opt.global_step
        if opt.needs_refresh:
            with opt.refreshing():
                for part in torch.arange(32).chunk(2):
                    with opt.sampled_params(train=True, at="mega"):
                        loss_fn(params, x[part], y[part]).backward()
        inner_step(opt, params, x, y, torch.arange(8) + (t % 8) * 8)


def _run(state_dtype, steps, cls=IVON, params=None, **kw):
    x, y = make_data(dtype=torch.float32)
    params = params or make_params(dtype=torch.float32)
    opt = cls(params, lr=0.05, ess=500.0, seed=3, state_dtype=state_dtype, **kw)
    _drive(opt, params, steps, x, y)
    return opt, params


def test_h_moves_in_bf16_as_in_fp32():
    # beta2 = 0.999: each update moves h by ~1e-3 of itself, under half a bf16 step (2^-9), so
    # round-to-nearest would leave h at h0 for ever; stochastic rounding tracks the fp32 path
    kw = dict(beta2=0.999, hess_init=1.0, weight_decay=1e-3, clip_radius=float("inf"))
    h32 = _run(None, 120, **kw)[0].flat_state()[0]["hess"]
    h16 = _run("bfloat16", 120, **kw)[0].flat_state()[0]["hess"]
    assert h16.dtype == torch.bfloat16
    moved = (h32 - 1.0).abs()
    assert moved.median() > 0.05                       # h moved in fp32 ...
    error = (h16.float() - h32).abs()
    assert error.median() < 0.2 * moved.median()       # ... and bf16 followed it


@pytest.mark.parametrize("fused,counter,regenerate", [
    (False, False, False), (True, False, False), (True, True, False), (False, True, True)])
def test_bf16_state_resumes_bit_exact(fused, counter, regenerate, monkeypatch):
    if counter:   # the counter-based noise of large groups, on this small problem
        monkeypatch.setattr(_random, "COUNTER_MIN", 0)
    kw = dict(refresh_every=3, beta2=0.99, fused=fused, regenerate_noise=regenerate)
    full, p_full = _run("bfloat16", 8, IVONPC, **kw)
    half, p_half = _run("bfloat16", 4, IVONPC, **kw)
    buf = io.BytesIO()
    torch.save(half.state_dict(), buf)
    buf.seek(0)
    params = [torch.nn.Parameter(p.detach().clone()) for p in p_half]
    resumed = IVONPC(params, lr=0.05, ess=500.0, seed=99, state_dtype="bfloat16", **kw)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.flat_state()[0]["momentum"].dtype == torch.bfloat16
    _drive(resumed, params, 4, *make_data(dtype=torch.float32))
    assert full.refreshes == resumed.refreshes == 3
    for a, b in zip(full.flat_state(), resumed.flat_state()):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    for a, b in zip(p_full, params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("regenerate", [False, True])
def test_bf16_theta_out_is_the_snapshot_moved_by_the_shared_normals(regenerate, monkeypatch):
    """With bf16 state acc_out (which receives the out-sample's gradient) is bf16: theta_out =
    m_out + eps sigma_out, with theta_in's eps, is written into the parameters tensor by tensor
    from the kept noise, or formed in a temporary from the noise drawn again."""
    if regenerate:
        monkeypatch.setattr(_random, "COUNTER_MIN", 0)
    x, y = make_data(dtype=torch.float32)
    opt, params = _run("bfloat16", 4, IVONPC, refresh_every=3, regenerate_noise=regenerate)
    assert opt.correction_active
    flat, group = opt.flat_state()[0], opt.param_groups[0]
    mean = flat["mean"].clone()

    def theta():
        return torch.cat([p.detach().flatten() for p in params])
    with opt.sampled_params(train=True):
        theta_in = theta()
        loss_fn(params, x[:8], y[:8]).backward()
    with opt.sampled_params(train=True, at="out"):
        theta_out = theta()
        loss_fn(params, x[:8], y[:8]).backward()
    # theta_in - m = eps sigma: eps sigma_out = (theta_in - m) sqrt(ess (h + wd)) sigma_out
    root = ((flat["hess"].float() + group["weight_decay"]) * group["ess"]).sqrt()
    expected = (theta_in - mean) * root * flat["sigma_out"].float()
    assert expected.abs().min() > 0
    torch.testing.assert_close(theta_out - flat["m_out"], expected, rtol=1e-4, atol=1e-7)
    opt.step()
    assert opt.flat_state(transient=True)[0]["acc_out"].dtype == torch.bfloat16


@pytest.mark.parametrize("cls, micro, regenerate, fp32, bf16", [
    (IVON, 1, False, 20, 14),     # one in-sample per step: noise x grad formed inside the update
    (IVON, 2, False, 24, 16),     # several: their noise x grad pairs are accumulated (acc_nxg)
    # correction on: g_out, h_out, m_out, sigma_out, and the out-sample's gradient (acc_out)
    # paired with the noise inside the update ...
    (IVONPC, 1, False, 40, 26),
    (IVONPC, 2, False, 44, 28),   # ... or in acc_nxg and acc_out, with several samples
    # no noise buffer: the noise is drawn again from its key where the step needs it
    (IVON, 1, True, 16, 10),
    (IVON, 2, True, 20, 12),
    (IVONPC, 1, True, 36, 22),
    (IVONPC, 2, True, 40, 24),
])
def test_state_bytes_per_parameter(cls, micro, regenerate, fp32, bf16, monkeypatch):
    if regenerate:   # a group large enough for the counter-based noise
        monkeypatch.setattr(_random, "COUNTER_MIN", 0)
    x, y = make_data(dtype=torch.float32)
    for state_dtype, expected in (("float32", fp32), ("bfloat16", bf16)):
        params = make_params(dtype=torch.float32)
        n = sum(p.numel() for p in params)
        opt = cls(params, lr=0.1, ess=10.0, state_dtype=state_dtype, regenerate_noise=regenerate)
        drive(opt, params, 3, x, y, micro=micro)
        assert opt.state_nbytes() == expected * n, state_dtype
        flat = opt.flat_state(transient=True)[0]
        low = {k for k, v in flat.items() if v.dtype == torch.bfloat16}
        assert low == (set(cls.low_precision_buffers) & set(flat) if state_dtype == "bfloat16" else set())
        # sigma is computed in fp32 from a bf16 h
        assert all(s.dtype == torch.float32 for s in opt.posterior_std())


def test_a_lazy_buffer_exists_once_needed():
    x, y = make_data(dtype=torch.float32)
    params = make_params(dtype=torch.float32)
    opt = IVON(params, lr=0.1, ess=10.0)
    assert "acc_nxg" not in opt.flat_state(transient=True)[0]
    drive(opt, params, 1, x, y, micro=2)
    assert "acc_nxg" in opt.flat_state(transient=True)[0]


def test_more_kernel_specializations_than_torchs_default_limit_compile():
    """More combinations of flags, optional buffers and dtypes of one kernel in one process than
    torch's recompile limit allows (the limit lowered from its default 8 to 2, so that three
    compilations show it instead of nine): our kernels raise it for themselves."""
    import itertools

    from hf_ivonpc.optim import _kernels as K
    n = 256
    sc = torch.tensor([1.0, 0.9, 0.1, 0.99, 0.01, 5e-5, 0.0, 1.0, 1.0, 0.1, 1.0, 0.0, 0.0])
    with torch._dynamo.config.patch(recompile_limit=2):
        for dtype, price, lazy in itertools.islice(itertools.product(
                (torch.float32, torch.bfloat16), (True, False), (True, False)), 3):
            t = dict(mean=torch.zeros(n), momentum=torch.zeros(n, dtype=dtype),
                     hess=torch.ones(n, dtype=dtype), acc_g=torch.randn(n), bits=torch.randn(n))
            t["noise" if lazy else "acc_nxg"] = torch.randn(n)
            K.run_kernel(K.ivon_update, t, sc, fused=True, chunk=n, ranges=[slice(0, n)],
                         price=price, clip=True)
            assert torch.isfinite(t["mean"]).all()


@pytest.mark.parametrize("value", ["float16", "bf16", torch.float16, 3])
def test_bad_state_dtype_is_refused_by_name(value):
    with pytest.raises(ValueError, match="state_dtype"):
        IVON(make_params(dtype=torch.float32), lr=0.1, ess=10.0, state_dtype=value)


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_h_keeps_the_posterior_precision_positive(fused):
    # line 12 at most halves h + wd, so a run of strongly negative Hessian estimates (as the
    # correction produces) drives h toward -wd; in bf16 a rounding there could reach h + wd <= 0
    from hf_ivonpc.optim import _kernels as K
    n, wd = 1 << 16, 1e-6
    h = torch.full((n,), 5e-7, dtype=torch.bfloat16)
    mom = torch.zeros(n, dtype=torch.bfloat16)
    mean = torch.zeros(n)
    g = torch.zeros(n)
    noise = torch.randn(n, generator=torch.Generator().manual_seed(0))
    b2 = 0.5
    # sc = [1/k, b1, 1-b1, b2, 1-b2, (1-b2)^2/2, wd, ess/k, debias, lr, r, alpha, alpha w]
    sc = torch.tensor([1.0, 0.9, 0.1, b2, 1 - b2, (1 - b2) ** 2 / 2, wd, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    for _ in range(60):
        # h_hat = h - 2 (h + wd), where line 12 halves h + wd (its fastest way down)
        x = h.float() + wd
        nxg = (h.float() - 2 * x) / x
        K.run_kernel(K.ivon_update, dict(mean=mean, momentum=mom, hess=h, acc_g=g, acc_nxg=nxg,
                                         bits=noise), sc, fused=fused, chunk=n, ranges=[slice(0, n)])
        noise = torch.randn(n, generator=torch.Generator().manual_seed(_ + 1))
    assert (h.float() + wd > 0).all()
    assert (h.float() < -wd * 0.99).all()    # it did go where the rounding would cross


@pytest.mark.parametrize("cls, micro", [(IVON, 3)])
def test_bf16_accumulators_hold_the_rounded_fp32_sums(cls, micro):
    """Several in-samples summed into a bf16 acc_g: each addition rounds once, so it stays within
    a bf16 rounding per addition of the largest partial sum of the fp32 optimizer (same seed and,
    with h0 a power of two, the same draws)."""
    x, y = make_data(dtype=torch.float32)
    # (acc_nxg is formed from the rounded acc_g at the next draw, not summed pair by pair)
    names = ["acc_g"]
    flats, peak = {}, {}
    for state_dtype in ("float32", "bfloat16"):
        params = make_params(dtype=torch.float32)
        opt = cls(params, lr=0.1, ess=50.0, hess_init=2.0 ** -4, seed=4, state_dtype=state_dtype)
        if opt.needs_refresh:
            with opt.refreshing():
                with opt.sampled_params(train=True, at="mega"):
                    loss_fn(params, x, y).backward()
        passes = ["in", "out"] if getattr(opt, "correction_active", False) else ["in"]
        for part in torch.arange(8 * micro).chunk(micro):
            for at in passes:
                with opt.sampled_params(train=True, at=at):
                    loss_fn(params, x[part], y[part]).backward()
                flat = opt.flat_state(transient=True)[0]
                for name in names:
                    if name in flat and state_dtype == "float32":
                        peak[name] = torch.maximum(peak.get(name, flat[name].abs()), flat[name].abs())
        flats[state_dtype] = opt.flat_state(transient=True)[0]
    additions = micro * len(passes)
    for name in names:
        a, b = flats["float32"][name], flats["bfloat16"][name]
        assert b.dtype == torch.bfloat16
        assert torch.all((b.float() - a).abs() <= additions * 2.0 ** -8 * peak[name] + 1e-12), name
        assert (b.float() != a).any()   # they were rounded
