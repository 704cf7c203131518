"""What the correction does, measured in every run: the variance ratios against a brute-force
estimate, their exactness at alpha = 0, the shared clip factor of a mini-batch's two passes, and
the diagnostics in PCTrainer's logs."""

import pytest
import torch
from sklearn.datasets import load_digits

from hf_ivonpc import PCTrainer, PCTrainingArguments
from hf_ivonpc.optim import IVON, IVONPC
from hf_ivonpc.optim import _kernels as K

from _tiny_lm import CharWindows, tiny_gpt2


def _digits():
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float64) / 16.0
    return x - x.mean(0), torch.tensor(d.target)


def _mlp_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (32,), (32, 10), (10,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64) * (0.2 if len(s) > 1 else 0.0))
            for s in shapes]


def _mlp_loss(params, x, y):
    w1, b1, w2, b2 = params
    return torch.nn.functional.cross_entropy(torch.tanh(x @ w1 + b1) @ w2 + b2, y)


def _grad(params, values, x, y):
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    grads = torch.autograd.grad(_mlp_loss(params, x, y), params)
    return torch.cat([g.reshape(-1) for g in grads])


def _corrected_step(opt, params, x, y, idx):
    with opt.sampled_params(train=True):
        _mlp_loss(params, x[idx], y[idx]).backward()
    with opt.sampled_params(train=True, at="out"):
        _mlp_loss(params, x[idx], y[idx]).backward()
    opt.step()


def test_variance_ratios_match_a_brute_force_estimate():
    """At a fixed posterior whose mean has moved away from the snapshot, the ratios the optimizer
    reports (one micro-batch per step, no extra evaluation) agree within 20% with the variances
    of many independent mini-batch estimates."""
    torch.manual_seed(0)
    x, y = _digits()
    n, batch, alpha = x.shape[0], 32, 0.5
    params = _mlp_params()
    opt = IVONPC(params, lr=0.05, ess=float(n), hess_init=1.0, beta2=0.99999, clip_radius=float("inf"),
                 alpha=alpha, rho1=0.0, rho2=0.0, mean_term_weight=0.0, refresh_every=10**9, seed=0)
    order = torch.Generator().manual_seed(1)
    with opt.refreshing():
        for part in torch.randperm(n, generator=order)[:20 * batch].split(batch):
            with opt.sampled_params(train=True, at="mega"):
                _mlp_loss(params, x[part], y[part]).backward()
    for _ in range(30):   # the mean moves away from m_out
        _corrected_step(opt, params, x, y, torch.randint(0, n, (batch,), generator=order))
    for g in opt.param_groups:   # then the posterior stays where it is
        g["lr"] = 1e-12
    for _ in range(30):   # the momentum, the reference of the gradient's mean, settles there
        _corrected_step(opt, params, x, y, torch.randint(0, n, (batch,), generator=order))
    opt.track_diagnostics = True
    opt.diagnostics()
    for _ in range(400):
        _corrected_step(opt, params, x, y, torch.randint(0, n, (batch,), generator=order))
    got = opt.diagnostics()
    assert got["var_steps"] == 400

    st = [opt.state[p] for p in params]
    m = [s["mean"].clone() for s in st]
    m_out = [s["m_out"].clone() for s in st]
    sigma = [s.clone() for s in opt.posterior_std()]
    sigma_out = [s["sigma_out"].clone() for s in st]
    g_out = torch.cat([s["g_out"].reshape(-1) for s in st])
    h_out = torch.cat([s["h_out"].reshape(-1) for s in st])
    flat_sigma = torch.cat([s.reshape(-1) for s in sigma])
    flat_sigma_out = torch.cat([s.reshape(-1) for s in sigma_out])
    gen = torch.Generator().manual_seed(2)
    gx, gy, hx, hy = [], [], [], []
    for _ in range(3000):
        idx = torch.randint(0, n, (batch,), generator=gen)
        eps = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        xin = _grad(params, [mi + si * e for mi, si, e in zip(m, sigma, eps)], x[idx], y[idx])
        xout = _grad(params, [mo + so * e for mo, so, e in zip(m_out, sigma_out, eps)], x[idx], y[idx])
        e = torch.cat([t.reshape(-1) for t in eps])
        h_in, h_o = xin * e / flat_sigma, xout * e / flat_sigma_out
        gx.append(xin)
        gy.append(xin - alpha * (xout - g_out))
        hx.append(h_in)
        hy.append(h_in - alpha * (h_o - h_out))

    def var(samples):
        s = torch.stack(samples)
        return (s - s.mean(0)).square().sum(1).mean().item()

    want_g, want_h = var(gy) / var(gx), var(hy) / var(hx)
    assert want_g < 0.9 and want_h < 0.9, (want_g, want_h)   # the correction does remove noise here
    assert got["grad_var_ratio"] == pytest.approx(want_g, rel=0.2), (got, want_g)
    assert got["hess_var_ratio"] == pytest.approx(want_h, rel=0.2), (got, want_h)


def test_alpha_zero_gives_a_ratio_of_exactly_one():
    """The estimator treats the plain and the corrected estimate alike: with alpha = 0 they are
    the same numbers, and so are their variances."""
    g = torch.Generator().manual_seed(0)
    n = 1000
    acc_g, acc_nxg, acc_nxg_out, momentum, g_out, h_out = (torch.randn(n, generator=g) for _ in range(6))
    hess, sigma_out = torch.rand(n, generator=g) + 0.1, torch.rand(n, generator=g) + 0.1
    for c in (1.0, 4.0):
        raw = torch.zeros(14, dtype=torch.float64)
        K.pc_stats_plain(acc_g, hess, momentum, h_out, torch.tensor([1e-3, 50.0, 1.5]), raw[:4],
                         acc_nxg=acc_nxg)
        K.pc_stats_corrected(acc_g, hess, sigma_out, momentum, g_out, h_out,
                             torch.tensor([1e-3, 50.0, 1.5, 0.0]), raw[4:], acc_nxg=acc_nxg,
                             acc_nxg_out=acc_nxg_out)
        vx, vy, hx, hy = K.variances_from_stats(raw, c).tolist()
        assert vy == vx and hy == hx and vx != 0 and hx != 0


def _quadratic_opt(**kw):
    p = torch.nn.Parameter(torch.zeros(20, dtype=torch.float64))
    opt = IVONPC([p], lr=0.1, ess=1e6, hess_init=1.0, alpha=1.0, start_step=0, seed=0, **kw)
    opt.max_grad_norm = 0.5
    return p, opt


def _pass(opt, p, target, at):
    """One pass at ``at``; returns the parameters it was evaluated at."""
    with opt.sampled_params(train=True, at=at):
        (0.5 * (p - target).square().sum()).backward()
        return p.detach().clone()


@pytest.mark.parametrize("shared_noise", [True, False])
def test_the_two_passes_of_a_mini_batch_share_one_clip_factor(shared_noise):
    """With theta_out far from theta_in the two gradients have different norms; clipped alike,
    the accumulated corrected gradient is c (g_in - alpha g_o) with c the theta_in pass's factor."""
    p, opt = _quadratic_opt(shared_noise=shared_noise)
    target = torch.linspace(-3, 3, 20, dtype=torch.float64)
    with opt.refreshing():
        _pass(opt, p, target, "mega")
    with torch.no_grad():   # move the mean far from m_out (the snapshot)
        p.add_(5.0)
    theta_in = _pass(opt, p, target, "in")
    theta_out = _pass(opt, p, target, "out")
    scratch = opt.flat_state(transient=True)[0]
    g_in, g_o = theta_in - target, theta_out - target
    c = min(1.0, 0.5 / (g_in.norm().item() + 1e-6))
    assert g_o.norm() < g_in.norm() / 2   # a per-pass factor would differ by more than 2x
    # with shared noise the two samples are kept apart until the step; else accumulated together
    acc = scratch["acc_g"] - scratch["acc_out"] if shared_noise else scratch["acc_g"]
    torch.testing.assert_close(acc, c * (g_in - g_o), rtol=1e-9, atol=1e-12)


def test_with_theta_out_equal_to_theta_in_the_correction_cancels_under_clipping():
    """Right after a refresh (m = m_out, sigma = sigma_out, shared noise) the two clipped
    gradients are equal (to rounding: sigma_out is recomputed from h), so the accumulated
    corrected part is (1 - alpha) g_in."""
    p, opt = _quadratic_opt(shared_noise=True)
    opt.param_groups[0]["alpha"] = 0.7
    target = torch.linspace(-3, 3, 20, dtype=torch.float64)
    with opt.refreshing():
        _pass(opt, p, target, "mega")
    _pass(opt, p, target, "in")
    acc_g = opt.flat_state(transient=True)[0]["acc_g"]
    g_in = acc_g.clone()
    assert g_in.norm() == pytest.approx(0.5, rel=1e-5)   # clipping is active
    _pass(opt, p, target, "out")
    acc = opt.flat_state(transient=True)[0]
    # the two samples stay apart until the step (shared noise)
    torch.testing.assert_close(acc["acc_g"] - 0.7 * acc["acc_out"], g_in - 0.7 * g_in,
                               rtol=1e-12, atol=1e-15)


def test_ivon_reports_the_clipped_share():
    p, opt = _quadratic_opt()
    ivon = IVON([p], lr=0.1, ess=1e6, hess_init=1.0, clip_radius=0.05, seed=0)
    ivon.track_diagnostics = True
    target = torch.cat([torch.zeros(10), torch.full((10,), 10.0)]).double()
    _pass(ivon, p, target, "in")
    ivon.step()
    # |g / h| is about 0 on the first half (below the radius) and 10 x 0.1 on the second
    assert ivon.diagnostics() == {"clipped_share": 0.5}
    assert ivon.diagnostics() == {}   # reset by reading


def test_diagnostics_appear_in_the_trainer_logs(tmp_path):
    args = PCTrainingArguments(output_dir=str(tmp_path), pc_method="ivon_pcm", max_steps=12,
                               learning_rate=0.05, per_device_train_batch_size=8,
                               gradient_accumulation_steps=2, logging_steps=6, report_to=[],
                               save_strategy="no", ivon_ess=1e4, ivon_hess_init=0.1,
                               pc_megabatch_factor=4, pc_refresh_steps=4, pc_start_step=2,
                               pc_alpha=0.5, disable_tqdm=True, use_cpu=True, seed=0)
    trainer = PCTrainer(model=tiny_gpt2(), args=args, train_dataset=CharWindows())
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    last = logs[-1]
    for key in ("pc/grad_var_ratio", "pc/hess_var_ratio", "pc/clipped_share", "pc/h_out_negative_share"):
        assert key in last, last
    assert last["pc/var_steps"] == 6 and 0 < last["pc/grad_var_ratio"] < 10
    assert 0 <= last["pc/clipped_share"] <= 1 and 0 <= last["pc/h_out_negative_share"] <= 1
    off = PCTrainingArguments(**{**args.to_dict(), "pc_log_diagnostics": False,
                                 "output_dir": str(tmp_path / "off")})
    quiet = PCTrainer(model=tiny_gpt2(), args=off, train_dataset=CharWindows())
    quiet.train()
    assert not any(k.startswith("pc/grad_var") for e in quiet.state.log_history for k in e)


def test_window_ratio_adds_the_mega_batch_error_shared_by_the_window():
    """grad_var_ratio + alpha^2 m / K, with K the mega-batch in mini-batches of the step."""
    x, y = _digits()
    params = _mlp_params()
    opt = IVONPC(params, lr=0.05, ess=float(len(y)), hess_init=1.0, clip_radius=float("inf"),
                 alpha=0.5, refresh_every=4, seed=0)
    opt.track_diagnostics = True
    order = torch.Generator().manual_seed(1)
    for _ in range(8):
        if opt.needs_refresh:
            with opt.refreshing():
                for part in torch.randperm(len(y), generator=order)[:5 * 16].split(16):   # K = 5
                    with opt.sampled_params(train=True, at="mega"):
                        _mlp_loss(params, x[part], y[part]).backward()
        _corrected_step(opt, params, x, y, torch.randint(0, len(y), (16,), generator=order))
    d = opt.diagnostics()
    assert d["window_var_ratio"] == pytest.approx(d["grad_var_ratio"] + 0.25 * 4 / 5, rel=1e-12)


def test_the_trainer_measures_about_eight_steps_per_logging_window(tmp_path):
    args = PCTrainingArguments(output_dir=str(tmp_path), pc_method="ivon_pcm", max_steps=32,
                               learning_rate=0.05, per_device_train_batch_size=8, logging_steps=16,
                               report_to=[], save_strategy="no", ivon_ess=1e4, ivon_hess_init=0.1,
                               pc_megabatch_factor=2, pc_refresh_steps=5, pc_start_step=1,
                               disable_tqdm=True, use_cpu=True, seed=0)
    trainer = PCTrainer(model=tiny_gpt2(), args=args, train_dataset=CharWindows())
    trainer.train()
    logs = [e for e in trainer.state.log_history if "pc/var_steps" in e]
    # steps 16..31: every 2nd (stride 16 // 8) and the refreshes at 16, 21, 26, 31
    assert [e["pc/var_steps"] for e in logs][-1] == len({s for s in range(16, 32) if s % 2 == 0 or (s - 1) % 5 == 0})
