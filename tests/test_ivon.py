"""IVON: equality with ivon-opt 0.1.3, and the defects of ivon-opt that must not be copied (those
every optimizer must avoid, e.g. state lost by state_dict, parameters without grad, sampling that
is not exception-safe, are in test_optim_contract.py)."""

import pytest
import torch

from hf_ivonpc.optim import IVON

from _problems import drive, groups_of, loss_fn, make_data, make_params
from _ulp import assert_within_ulps

ivon_opt = pytest.importorskip("ivon")


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("samples", [1, 2])
@pytest.mark.parametrize("kw", [
    dict(lr=0.1, ess=200.0, hess_init=0.5, beta2=0.999, weight_decay=1e-3, clip_radius=0.05),
    dict(lr=300.0, ess=1e4, hess_init=1e-3, beta2=0.99999, weight_decay=1e-6, clip_radius=1e-3),
])
def test_equals_ivon_opt_on_the_same_noise(kw, samples, monkeypatch):
    x, y = make_data(dtype=torch.float32)
    a, b = _model(), _model()
    theirs = ivon_opt.IVON(a.parameters(), **kw)
    ours = IVON(b.parameters(), **kw, seed=5)
    gen = torch.Generator().manual_seed(5)  # ivon-opt draws with torch.randn: feed it our stream
    monkeypatch.setattr(ivon_opt._ivon.torch, "randn",
                        lambda *size, device=None, dtype=None: torch.empty(*size, dtype=dtype).normal_(generator=gen))
    for step in range(40):
        xb, yb = x[step % 8 * 8:(step % 8 + 1) * 8], y[step % 8 * 8:(step % 8 + 1) * 8]
        for model, opt in ((a, theirs), (b, ours)):
            for _ in range(samples):  # MC samples per step
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert _rel(pb, pa) < 1e-6
    h_theirs = torch.cat([g["hess"] for g in theirs.param_groups])
    state = ours.flat_state()[0]
    assert _rel(state["hess"], h_theirs) < 1e-6
    assert _rel(state["momentum"], torch.cat([g["momentum"] for g in theirs.param_groups])) < 1e-6
    assert not torch.equal(state["hess"], torch.full_like(h_theirs, kw["hess_init"]))


def test_state_dict_holds_each_groups_step_and_the_generator():
    """What the round trip of tests/test_optim_contract.py relies on, where torch.optim keeps it:
    the step (debiasing) per group, the generator state beside the counters."""
    x, y = make_data()
    pa = make_params()
    a = IVON(groups_of(pa), lr=0.1, ess=100.0, hess_init=0.3, beta2=0.99, seed=1)
    drive(a, pa, 5, x, y)
    sd = a.state_dict()
    assert [g["step"] for g in sd["param_groups"]] == [5, 5]
    assert sd["hf_ivonpc"]["pc"] == a.counters == {"step": 5, "refreshes": 0, "last_refresh": -1,
                                                   "skipped_steps": 0, "skipped_refreshes": 0,
                                                   "consecutive_skips": 0}
    assert torch.equal(sd["hf_ivonpc"]["generator"], a.generator.get_state())


def test_load_state_dict_checks_before_changing_anything():
    pa = make_params()
    a = IVON(pa, lr=0.1, ess=100.0)
    sd = a.state_dict()
    sd["state"][2]["hess"] = torch.zeros(7)
    b = IVON(make_params(), lr=0.1, ess=100.0, hess_init=0.5)
    before = b.flat_state()[0]["hess"].clone()
    with pytest.raises(ValueError, match="shape"):
        b.load_state_dict(sd)
    assert torch.equal(b.flat_state()[0]["hess"], before)


def test_generator_is_seedable_and_per_opt():
    x, y = make_data()
    runs = []
    for seed in (3, 3, 4):
        p = make_params()
        opt = IVON(p, lr=0.1, ess=100.0, seed=seed)
        torch.manual_seed(123)   # the global RNG plays no part
        runs.append(drive(opt, p, 3, x, y))
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_bf16_parameters_keep_fp32_state_and_learn_h():
    x, y = make_data(dtype=torch.float32)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3).to(torch.bfloat16)
    opt = IVON(model.parameters(), lr=0.05, ess=1e3, hess_init=0.01, beta2=0.99999, seed=0,
               rescale_lr=False)
    assert all(v.dtype == torch.float32 for st in opt.state.values() for v in st.values())
    for _ in range(20):
        with opt.sampled_params(train=True):
            torch.nn.functional.cross_entropy(model(x.bfloat16()).float(), y).backward()
        opt.step()
    h = opt.flat_state()[0]["hess"]
    # with beta2 = 0.99999 a bf16 h could not move from 0.01 at all (below its resolution)
    assert (h != 0.01).float().mean() > 0.9
    assert torch.equal(opt.flat_state()[0]["mean"].bfloat16(), torch.cat([q.detach().flatten() for q in model.parameters()]))


def test_sampling_restores_exactly():
    """(On an exception too: tests/test_optim_contract.py.)"""
    p = make_params()
    opt = IVON(p, lr=0.1, ess=10.0, seed=0)
    before = [q.detach().clone() for q in p]
    with opt.sampled_params():
        assert not torch.equal(p[0], before[0])
    for a, b in zip(p, before):
        assert torch.equal(a, b)


def test_noise_has_the_posterior_scale():
    p = [torch.nn.Parameter(torch.zeros(200_000))]
    opt = IVON(p, lr=0.1, ess=50.0, hess_init=0.3, weight_decay=0.1, seed=0)
    with opt.sampled_params():
        std = p[0].detach().std().item()
    expected = (50.0 * (0.3 + 0.1)) ** -0.5
    assert abs(std / expected - 1) < 0.01
    assert abs(opt.posterior_std()[0][0].item() / expected - 1) < 1e-6


def test_step_with_closure_like_ivon_opt():
    x, y = make_data()
    p = make_params()
    opt = IVON(p, lr=0.1, ess=100.0, mc_samples=3, seed=0)

    def closure():
        with opt.sampled_params(train=True):
            loss = loss_fn(p, x, y)
            loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and opt.global_step == 1


def _counter_draw(n, seed=0, **kw):
    from hf_ivonpc.optim._random import standard_normal_
    return standard_normal_(torch.empty(n), torch.Generator().manual_seed(seed), **kw)


def test_counter_noise_is_standard_normal_and_independent():
    n = 1 << 21   # the counter-based generator's range
    a = _counter_draw(n)
    assert torch.equal(a, _counter_draw(n))
    assert abs(a.mean().item()) < 4 * n ** -0.5 and abs(a.var().item() - 1) < 4 * (2 / n) ** 0.5
    assert abs((a ** 3).mean().item()) < 4 * (15 / n) ** 0.5
    assert abs((a ** 4).mean().item() - 3) < 4 * (96 / n) ** 0.5
    # the empirical CDF against Phi (Kolmogorov-Smirnov at the 0.1% level)
    s = a.double().sort().values
    cdf = torch.special.ndtr(s)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    assert max((i / n - cdf).max().item(), (cdf - (i - 1) / n).max().item()) < 1.95 * n ** -0.5
    # no correlation between the two Box-Muller outputs (the halves), neighbours, or seeds
    m = n // 2
    b = _counter_draw(n, seed=1)
    for x, y in ((a[:m], a[m:]), (a[:-1], a[1:]), (a, b)):
        assert abs((x * y).mean().item()) < 4 * x.numel() ** -0.5


def test_counters_past_two_to_the_32_do_not_wrap_around():
    from hf_ivonpc.optim import _kernels as K
    key = torch.tensor([11, 22, 33, 44, 0])
    like = (torch.empty(8), torch.empty(8))
    draws = [torch.cat(K.standard_normal_pairs(K._offset(key, c), like, torch.float64))
             for c in (5, 2**32 + 5, 2 * 2**32 + 5)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert torch.equal(draws[0], torch.cat(K.standard_normal_pairs(K._offset(key, 5), like,
                                                                    torch.float64)))


def test_counter_noise_does_not_depend_on_threads_chunks_or_length():
    """Element j's draw is a function of the key and j alone. Another thread count, chunk size or
    buffer length computes it with the same expressions, but may move it between a vectorized
    loop's body and its scalar tail, whose log, cos and sin may round differently (by at most an
    ulp or so of the draw itself): agreement is asserted within 2 ulps of the largest draw, where
    a shifted counter or a wrong half gives differences of order 1 (~10^6 such ulps)."""
    n = (1 << 20) + 1   # odd, and large enough for the counter-based generator
    a = _counter_draw(n)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert_within_ulps(a, _counter_draw(n), 2, "one thread")
    finally:
        torch.set_num_threads(threads)
    eager = _counter_draw(n, fused=False)
    assert_within_ulps(eager, _counter_draw(n, fused=False, chunk=1 << 14), 2, "other chunks")
    assert (eager - a).abs().max() < 1e-5          # compiled and eager: the same up to rounding
    # element j and m + j are the two outputs of counter j, an odd last one counter m's first:
    # a buffer one longer has the same first m + 1 draws
    m = n // 2
    longer = _counter_draw(n + 1, fused=False)
    assert_within_ulps(longer[:m + 1], torch.cat([eager[:m], eager[-1:]]), 2, "one longer")


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    from hf_ivonpc.optim import _kernels

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(_kernels, "_compiled", {})
    monkeypatch.setattr(_kernels, "_compile_failed", set())
    monkeypatch.setattr(_kernels.torch, "compile", broken)
    x, y = make_data()
    pa, pb = make_params(), make_params()
    a = IVON(pa, lr=0.1, ess=100.0, seed=0, fused=None, chunk_size=7)
    b = IVON(pb, lr=0.1, ess=100.0, seed=0, fused=False)
    monkeypatch.setattr(_kernels, "FUSE_MIN_NUMEL", 0)   # make the tiny problem try to compile
    with pytest.warns(RuntimeWarning, match="torch.compile of ivon_.* failed"):
        drive(a, pa, 3, x, y)
    drive(b, pb, 3, x, y)
    for p, q in zip(pa, pb):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match="no compiler"):   # fused=True does not hide it
        c_params = make_params()
        c = IVON(c_params, lr=0.1, ess=100.0, fused=True)
        drive(c, c_params, 1, x, y)


def test_a_kernel_first_compiled_for_a_small_buffer_is_a_parallel_loop():
    """Compiled dynamic, a kernel serves every later size; inductor would make the loop of one
    first compiled for a few elements serial (and cache it so for later processes)."""
    from torch._inductor.utils import run_and_get_code

    from hf_ivonpc.optim import _kernels

    def axpy(out, x, sc):   # a kernel of its own: compiled afresh here, whatever ran before
        out.copy_(out + sc[0] * x)
    out, x = torch.zeros(60), torch.ones(60)
    with torch._inductor.config.patch(fx_graph_cache=False):   # generated here, not loaded
        _, code = run_and_get_code(_kernels.run_kernel, axpy, {"out": out, "x": x},
                                   torch.tensor([2.0]), fused=True, chunk=60,
                                   ranges=[slice(0, 60)])
    assert torch.equal(out, torch.full((60,), 2.0))
    assert any("#pragma omp parallel" in c for c in code), code


def test_max_grad_norm_clips_each_collected_gradient():
    x, y = make_data()
    runs = {}
    for clip in (None, 1e-3):
        p = make_params()
        opt = IVON(p, lr=0.1, ess=1e28, beta1=0.0, seed=0)   # beta1 = 0: momentum is the gradient
        opt.max_grad_norm = clip
        with opt.sampled_params(train=True):
            loss_fn(p, x, y).backward()
        opt.step()
        runs[clip] = (opt.flat_state()[0]["momentum"].clone(), opt.last_grad_norm)
    full, clipped = runs[None][0], runs[1e-3][0]
    assert runs[None][1] is None and runs[1e-3][1] > 1e-2
    norm = runs[1e-3][1].item()   # torch.nn.utils.clip_grad_norm_'s convention: max / (norm + 1e-6)
    assert abs(clipped.norm().item() - 1e-3 * norm / (norm + 1e-6)) < 1e-12
    assert torch.allclose(clipped / clipped.norm(), full / full.norm(), atol=1e-12)
