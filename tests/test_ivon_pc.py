"""IVON-PCM (Alg. 4): fast implementation against the line-by-line reference, and identities."""

import pytest
import torch

from hf_ivonpc.optim import IVON, IVONPC
from hf_ivonpc.optim import _random
from hf_ivonpc.optim import reference as ref

from _problems import drive, groups_of, loss_fn, make_data, make_params
from _ulp import assert_within_ulps

HP = dict(lr=0.1, ess=500.0, hess_init=0.2, beta1=0.9, beta2=0.99, weight_decay=1e-3,
          clip_radius=0.05, rescale_lr=False)
PC = dict(alpha=0.7, rho1=0.6, rho2=0.1, mean_term_weight=1.0, refresh_every=4, start_step=3)


def _pair(shared_noise=True, groups=True, fused=False, **over):
    kw = {**HP, **PC, "shared_noise": shared_noise, **over}
    pf, pr = make_params(), make_params()
    fast = IVONPC(groups_of(pf) if groups else pf, generator=torch.Generator().manual_seed(3),
                  fused=fused, **kw)
    slow = ref.IVONPC(groups_of(pr) if groups else pr, generator=torch.Generator().manual_seed(3), **kw)
    return fast, pf, slow, pr


def _close(a, b, rtol=1e-10):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        assert torch.allclose(x, y, rtol=rtol, atol=rtol * 1e-2), (x - y).abs().max()


@pytest.mark.parametrize("shared_noise,micro,fused,noise", [
    (True, 1, False, "kept"), (False, 1, False, "kept"), (True, 3, False, "kept"),
    (False, 3, False, "kept"), (True, 3, True, "kept"), (True, 1, True, "kept"),
    # the counter-based noise of large groups (drawn inside IVON's kernel) on this small problem,
    # kept from the draw to the step or drawn again where needed
    (True, 1, False, "counter"), (False, 3, False, "counter"),
    (True, 1, False, "regenerated"), (False, 3, False, "regenerated"),
])
def test_fast_equals_reference(shared_noise, micro, fused, noise, monkeypatch):
    if noise != "kept":
        monkeypatch.setattr(_random, "COUNTER_MIN", 0)
    x, y = make_data()
    fast, pf, slow, pr = _pair(shared_noise, fused=fused)
    fast.regenerate_noise = noise == "regenerated"
    lf = drive(fast, pf, 24, x, y, micro=micro)
    lr_ = drive(slow, pr, 24, x, y, micro=micro)
    assert fast.refreshes == slow.refreshes == 6  # steps 3, 7, ..., 23
    _close(pf, pr)
    _close(lf, lr_)
    _close([fast.state[p]["hess"] for p in pf], [slow.state[p]["h"] for p in pr])
    _close([fast.state[p]["h_out"] for p in pf], [slow.state[p]["h_out"] for p in pr])
    # clipping was exercised, so it is part of what is compared
    assert any((slow.state[p]["m"] != 0).any() for p in pr)


@pytest.mark.parametrize("noise", ["kept", "counter", "regenerated"])
def test_a_draw_between_the_out_pass_and_the_step_keeps_the_pairs(noise, monkeypatch):
    """A step's one in- and one out-sample wait unpaired for the update; a draw before it (an
    evaluation of the posterior predictive, whose noise replaces the kept one) pairs them first,
    so the step is the reference's."""
    if noise != "kept":
        monkeypatch.setattr(_random, "COUNTER_MIN", 0)
    x, y = make_data()
    fast, pf, slow, pr = _pair()
    fast.regenerate_noise = noise == "regenerated"
    for opt, params in ((fast, pf), (slow, pr)):
        drive(opt, params, 5, x, y)   # the correction is on from step 3
        assert opt.correction_active
        for at in ("in", "out"):
            with opt.sampled_params(train=True, at=at):
                loss_fn(params, x[:8], y[:8]).backward()
        with opt.sampled_params():   # a draw that collects nothing
            for p in params:
                p.grad = torch.zeros_like(p)   # (the reference reads one regardless)
        for p in params:
            p.grad = None
        opt.step()
    _close(pf, pr)
    _close([fast.state[p]["hess"] for p in pf], [slow.state[p]["h"] for p in pr])


@pytest.mark.parametrize("between", ["hparams", "generator_used", "other_generator"])
def test_noise_drawn_ahead_is_the_draw_it_stands_for(between, monkeypatch):
    """On CPU a step writes the next draw's counter-based noise ahead, in its update's loop.
    Whatever happens before that draw, it draws what the reference draws at that moment: with
    a changed ess and weight_decay (the noise's scale), after someone else drew from the
    optimizer's generator, and after a draw from another generator (as an evaluation of the
    posterior predictive makes, into the same buffer)."""
    monkeypatch.setattr(_random, "COUNTER_MIN", 0)
    x, y = make_data()
    fast, pf, slow, pr = _pair()
    drive(fast, pf, 6, x, y)
    drive(slow, pr, 6, x, y)
    if between == "hparams":
        for opt in (fast, slow):
            for group in opt.param_groups:
                group["ess"], group["weight_decay"] = 4 * group["ess"], 2 * group["weight_decay"]
    elif between == "generator_used":
        for opt in (fast, slow):
            torch.randint(0, 10, (3,), generator=opt.generator)
    else:
        drawn = []
        for opt, params in ((fast, pf), (slow, pr)):
            own = opt.generator
            opt.generator = torch.Generator().manual_seed(123)
            with opt.sampled_params():   # a draw that collects nothing
                drawn.append([p.detach().clone() for p in params])
                for p in params:
                    p.grad = torch.zeros_like(p)   # (the reference reads one regardless)
            opt.generator = own
            for p in params:
                p.grad = None
        _close(*drawn)
    drive(fast, pf, 6, x, y)
    drive(slow, pr, 6, x, y)
    _close(pf, pr)
    _close([fast.state[p]["hess"] for p in pf], [slow.state[p]["h"] for p in pr])


def test_noise_drawn_ahead_is_dropped_by_a_load(monkeypatch):
    """A state loaded over the optimizer (here its own, h doubled: the generator is where the
    step left it) draws with the loaded h, as a fresh optimizer loading it does."""
    monkeypatch.setattr(_random, "COUNTER_MIN", 0)
    x, y = make_data()
    pa, pb = make_params(), make_params()
    a = IVON(groups_of(pa), **HP, seed=5)
    drive(a, pa, 3, x, y)
    sd = a.state_dict()
    for st in sd["state"].values():
        st["hess"] = 2 * st["hess"]
    b = IVON(groups_of(pb), **HP, seed=6)
    with torch.no_grad():
        for p, q in zip(pa, pb):
            q.copy_(p)
    drawn = []
    for opt, params in ((a, pa), (b, pb)):
        opt.load_state_dict(sd)
        with opt.sampled_params():
            drawn.append([p.detach().clone() for p in params])
    for p, q in zip(*drawn):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls,state_dtype,micro,fused", [
    (IVON, "float32", 1, True), (IVON, "bfloat16", 1, False),   # noise drawn inside the update
    (IVONPC, "float32", 1, False), (IVONPC, "float32", 2, False),  # in noise x grad; temporaries
    (IVONPC, "bfloat16", 1, False), (IVONPC, "bfloat16", 2, False),   # theta_out in a temporary
])
def test_regenerated_noise_is_the_kept_noise(cls, state_dtype, micro, fused, monkeypatch):
    """Noise drawn again from its key is the kept noise, and the runs agree to within rounding.

    The two paths evaluate the same expressions from the same counters, but in different kernels
    (the draw inside the update or the collection instead of a buffer read): a CPU may vectorize
    them differently (a vectorized body against a scalar tail), so the bound is stated in ulps. An
    fp32 run: 4 ulps of each tensor's largest entry (a rounding difference in a draw, carried by
    the 12 steps; equal bit for bit on every CPU and vector width tried). With bf16 state, such a
    difference can flip a stochastic rounding of h or the momentum (the noise's low bits choose
    it), so every buffer is compared at bf16's resolution: 2 bf16 ulps. Dropping the noise from
    either path moves the mean by sigma (~0.06), thousands of times either bound."""
    monkeypatch.setattr(_random, "COUNTER_MIN", 0)
    x, y = make_data(dtype=torch.float32)
    runs = []
    for regenerate in (False, True):
        params = make_params(dtype=torch.float32)
        pc = PC if cls is IVONPC else {}
        opt = cls(groups_of(params), **HP, **pc, seed=4, regenerate_noise=regenerate,
                  state_dtype=state_dtype, fused=fused)
        drive(opt, params, 12, x, y, micro=micro)
        runs.append((opt, params))
    (kept, pk), (regen, pg) = runs
    assert "noise" in kept.flat_state(transient=True)[0]
    assert "noise" not in regen.flat_state(transient=True)[0]   # never allocated
    if cls is IVONPC:
        assert regen.refreshes == kept.refreshes > 0
    def agree(a, b, what):
        if state_dtype == "bfloat16":
            assert_within_ulps(a.bfloat16(), b.bfloat16(), 2, what)
        else:
            assert_within_ulps(a, b, 4, what)
    for i, (a, b) in enumerate(zip(pk, pg)):
        agree(a.detach(), b.detach(), f"parameter {i}")
    for fa, fb in zip(kept.flat_state(), regen.flat_state()):
        for name in fa:
            agree(fa[name], fb[name], name)


def test_a_non_contiguous_parameter_takes_theta_out_as_its_contiguous_twin():
    """theta_out from kept noise is written by the kernel into each parameter, through a
    temporary where the parameter is not contiguous.

    The two runs agree to 4 ulps of each parameter's largest entry, not bit for bit: the loss's
    matrix product with the transposed weight is another BLAS kernel, whose sums may round
    differently (MKL's code path on non-Intel CPUs does: 1 ulp after 8 steps); the optimizer's
    copy through the temporary adds no rounding. Dropping that copy leaves theta_in in place of
    theta_out, a difference of sigma_out (~0.06), far beyond the bound."""
    x, y = make_data(dtype=torch.float32)
    runs = []
    for contiguous in (True, False):
        params = make_params(dtype=torch.float32)
        if not contiguous:   # the same values, laid out transposed
            params[0] = torch.nn.Parameter(params[0].detach().t().contiguous().t())
            assert not params[0].is_contiguous()
        opt = IVONPC(params, **HP, **PC, seed=4)
        drive(opt, params, 8, x, y)
        assert opt.refreshes > 0
        runs.append(params)
    for i, (a, b) in enumerate(zip(*runs)):
        assert_within_ulps(a.detach(), b.detach(), 4, f"parameter {i}")


def test_regenerate_noise_default_and_check():
    params = make_params(dtype=torch.float32)
    opt = IVONPC(params, **HP)
    assert opt.regenerate_noise is None   # None: kept on CPU, regenerated on accelerators
    with pytest.raises(ValueError, match="regenerate_noise.*'yes'.*None, True or False"):
        IVONPC(params, **HP, regenerate_noise="yes")


def test_alpha_zero_is_ivon_bit_for_bit():
    x, y = make_data()
    pa, pb = make_params(), make_params()
    a = IVONPC(groups_of(pa), **{**HP, **PC, "alpha": 0.0}, seed=11)
    b = IVON(groups_of(pb), **HP, seed=11)
    assert not a.needs_refresh and not a.correction_active
    drive(a, pa, 20, x, y, micro=2)
    drive(b, pb, 20, x, y, micro=2)
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
    for fa, fb in zip(a.flat_state(), b.flat_state()):
        for name in IVON.persistent_buffers:
            assert torch.equal(fa[name], fb[name]), name


def test_before_start_step_it_is_ivon_and_costs_one_pass():
    x, y = make_data()
    pa, pb = make_params(), make_params()
    a = IVONPC(pa, **{**HP, **PC, "start_step": 5}, seed=2)
    b = IVON(pb, **HP, seed=2)
    calls = {"a": 0}
    for t in range(5):
        assert not a.needs_refresh and not a.correction_active
        for opt, params, key in ((a, pa, "a"), (b, pb, "b")):
            with opt.sampled_params(train=True):
                loss_fn(params, x[:8], y[:8]).backward()
            calls[key] = calls.get(key, 0) + 1
            opt.step()
    assert calls["a"] == calls["b"] == 5   # one forward/backward per step, no mega-batch
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
    assert a.needs_refresh  # step 5 starts the correction


def test_first_refresh_taken_as_is_then_blended():
    x, y = make_data()
    p = make_params()
    opt = IVONPC(p, **{**HP, "alpha": 1.0, "rho1": 0.5, "rho2": 0.5, "start_step": 0}, seed=0)
    with opt.refreshing():
        with opt.sampled_params(train=True, at="mega"):
            loss_fn(p, x, y).backward()
    g1 = opt.flat_state()[0]["g_out"].clone()
    assert g1.abs().sum() > 0
    # the first refresh is the mega-batch gradient itself (at the same draw), not (1 - rho1) times it
    opt2 = IVONPC(make_params(), **{**HP, "alpha": 1.0, "rho1": 0.0, "start_step": 0}, seed=0)
    p2 = opt2.param_groups[0]["params"]
    with opt2.refreshing():
        with opt2.sampled_params(train=True, at="mega"):
            loss_fn(p2, x, y).backward()
    assert torch.equal(opt2.flat_state()[0]["g_out"], g1)


def test_protocol_misuse_is_reported():
    x, y = make_data()
    p = make_params()
    opt = IVONPC(p, **{**HP, **PC, "start_step": 0})
    with pytest.raises(RuntimeError, match="before any refresh"):
        with opt.sampled_params(train=True, at="out"):
            pass
    with pytest.raises(RuntimeError, match="only valid inside refreshing"):
        with opt.sampled_params(at="mega"):
            pass
    with pytest.raises(ValueError, match="collected no gradients"):
        with opt.refreshing():
            pass
    with opt.refreshing():
        with opt.sampled_params(train=True, at="mega"):
            loss_fn(p, x, y).backward()
    with opt.sampled_params(train=True):
        loss_fn(p, x[:8], y[:8]).backward()
    with pytest.raises(ValueError, match="theta_out"):
        opt.step()
    with pytest.raises(ValueError, match="at="):
        with opt.sampled_params(at="middle"):
            pass


def test_correction_reduces_gradient_variance_at_the_snapshot():
    """Right after a refresh with the full batch, m_in = m_out and the corrected gradient of any
    mini-batch equals g_out up to the noise difference: with shared noise it is exact."""
    x, y = make_data()
    p = make_params()
    opt = IVONPC(p, **{**HP, "alpha": 1.0, "start_step": 0, "hess_init": 1e3}, seed=0)
    with opt.refreshing():
        for part in torch.arange(64).chunk(4):
            with opt.sampled_params(train=True, at="mega"):
                loss_fn(p, x[part], y[part]).backward()
    with opt.sampled_params(train=True):
        loss_fn(p, x[:5], y[:5]).backward()
    with opt.sampled_params(train=True, at="out"):
        loss_fn(p, x[:5], y[:5]).backward()
    # before the step, the one in- and out-sample are in acc_g and acc_out, unpaired
    state = opt.flat_state(transient=True)[0]
    g_hat = state["acc_g"] - state["acc_out"] + state["g_out"]
    assert torch.allclose(g_hat, state["g_out"], atol=1e-12)
    opt.step()


def test_sum_reduction_of_scaled_parts_matches_one_big_batch():
    """Gradient accumulation as Trainer does it: K parts of a window, each loss scaled by 1/K and
    summed ("sum"), give the window's gradient; with negligible noise the step equals one batch of
    K times the size. With "mean" the same parts would give a K times smaller gradient."""
    x, y = make_data()
    kw = {**HP, "ess": 1e28}   # sigma ~ 1e-14: the draws do not move the gradients
    runs = {}
    for mode in ("one", "sum", "mean"):
        p = make_params()
        opt = IVON(p, **kw, seed=0)
        if mode == "one":
            with opt.sampled_params(train=True):
                loss_fn(p, x[:16], y[:16]).backward()
        else:
            opt.grad_reduction = mode
            for part in torch.arange(16).chunk(4):
                with opt.sampled_params(train=True):
                    (loss_fn(p, x[part], y[part]) / 4).backward()
            assert opt.collected == 4
        opt.step()
        runs[mode] = opt.flat_state()[0]["momentum"].clone()
    assert torch.allclose(runs["sum"], runs["one"], rtol=1e-10, atol=1e-14)
    assert torch.allclose(runs["mean"] * 4, runs["one"], rtol=1e-10, atol=1e-14)
    p = make_params()
    opt = IVON(p, **kw)
    opt.grad_reduction = "avg"
    with opt.sampled_params(train=True):
        loss_fn(p, x[:4], y[:4]).backward()
    with pytest.raises(ValueError, match="grad_reduction='avg' is invalid"):
        opt.step()
