"""Element-wise kernels over flat state buffers, and how they run.

Each kernel is a plain function of flat tensors and a 1-D tensor of scalars (tensors, so that a
changing learning rate or debiasing factor does not trigger a recompilation). ``run_kernel`` runs
it either compiled by ``torch.compile`` into one fused loop over the whole buffer (the default
wherever compilation works: one pass over memory instead of one per operation), or eagerly over
cache-sized chunks (the fallback, and ``fused=False``). Both evaluate the same expressions.
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable

import torch

_compiled: dict[Callable, Callable] = {}
_compile_failed: set[Callable] = set()
_lock = threading.Lock()


#: with ``fused=None``, buffers smaller than this run eagerly (a compiled call costs ~0.1 ms)
FUSE_MIN_NUMEL = 1 << 16

#: compiled specializations per kernel: one per combination of flags, optional buffers and
#: dtypes used in the process (torch's default of 8 is reached by a test suite or a process
#: that trains several configurations; then ``fused=True`` would raise)
RECOMPILE_LIMIT = 64


#: inductor's options for our kernels. ``cpp.dynamic_threads``: a CPU loop is always an OpenMP
#: parallel loop, sized by the runtime. Without it inductor decides from the size of the buffer
#: that the kernel is first compiled for whether to parallelize at all, and a kernel compiled
#: dynamic for a small buffer (a test, a small parameter group with ``fused=True``) stays
#: serial for every later size, in the process and, through inductor's cache, in every later
#: process of the machine: an IVON-PCM update of 26M parameters took 116 ms instead of 62 ms on
#: 2 cores after a first compilation for 60 elements. ``cpp.simdlen`` (set at the first
#: compilation, see ``compile_options``) puts the vector width into the key of inductor's cache.
COMPILE_OPTIONS = {"cpp.dynamic_threads": True}


def compile_options() -> dict:
    """``COMPILE_OPTIONS`` with ``cpp.simdlen`` pinned to the vector width inductor picks for this
    process (from the CPU and ``ATEN_CPU_CAPABILITY``; 0: scalar code).

    Left unset, the width is chosen at code generation but is not part of the key of inductor's
    on-disk cache: a process whose vector width differs from the one that filled the cache (another
    ``ATEN_CPU_CAPABILITY``, or a cache shared by machines with other CPUs) loads kernels generated
    for the other width; seen here as NaN in an IVON-PCM update and as a segmentation fault. Pinned,
    each width has its own entries, and the choice among the ISAs of that width is inductor's own
    (``pick_vec_isa`` takes the first valid one of that width, as it does from the capability)."""
    try:
        from torch._inductor import cpu_vec_isa   # imported on first compilation only
        width = cpu_vec_isa.pick_vec_isa().bit_width()
    except Exception:   # no C++ toolchain (a GPU-only setup): nothing to pin
        return dict(COMPILE_OPTIONS)
    return {**COMPILE_OPTIONS, "cpp.simdlen": width}


def _compiled_version(fn: Callable) -> Callable:
    with _lock:
        if fn not in _compiled:
            compiled = torch.compile(fn, dynamic=True, fullgraph=True, options=compile_options())

            def call(*args, _compiled=compiled, **kwargs):
                with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                    return _compiled(*args, **kwargs)
            _compiled[fn] = call
        return _compiled[fn]


def run_kernel(fn: Callable, tensors: dict, scalars: torch.Tensor, *, fused: bool | None,
               chunk: int, ranges: list[slice], counter: torch.Tensor | None = None,
               **flags) -> None:
    """Apply ``fn(**tensors_slice, sc=scalars, **flags)`` over each range of the flat buffers.

    ``fused=None`` compiles buffers of at least ``FUSE_MIN_NUMEL`` elements and falls back to
    eager chunks (with one warning) if compilation fails; ``fused=True`` compiles and raises on
    failure; ``fused=False`` never compiles.

    With ``counter`` (a key of ``counter_key``) the kernel draws standard normals
    (``standard_normal_pairs``) over whole buffers: it gets each buffer as a pair of slices, one in
    each half (``buf[lo:hi]`` and ``buf[m + lo:m + hi]``, m = n // 2), and ``counter`` offset
    by lo (an odd last element comes alone, with the counter m): the draw is the same whatever
    the slicing, fused or chunked.
    """
    if fused is None and next(iter(tensors.values())).numel() < FUSE_MIN_NUMEL:
        fused = False   # compiling pays off only for large buffers
    if fused or (fused is None and fn not in _compile_failed):
        try:
            cfn = _compiled_version(fn)
            for kw, single in _slices(tensors, ranges, None, counter):
                # the odd last element of a counter kernel runs eagerly (no specialization for it)
                (fn if single else cfn)(**kw, sc=scalars, **flags)
            return
        except Exception as err:  # no C++ compiler, unsupported backend, ...
            if fused:
                raise
            _compile_failed.add(fn)
            warnings.warn(f"torch.compile of {fn.__name__} failed ({type(err).__name__}: {err}); "
                          "using the eager chunked kernels (pass fused=False to skip compiling)",
                          RuntimeWarning, stacklevel=3)
    for kw, _ in _slices(tensors, ranges, chunk, counter):
        fn(**kw, sc=scalars, **flags)


def _slices(tensors: dict, ranges: list[slice], chunk: int | None, counter: torch.Tensor | None):
    """The keyword arguments of each kernel call, the ranges cut in chunks (None: whole), and
    whether the call is a counter kernel's odd last element."""
    if counter is None:
        for r in ranges:
            step = chunk or max(r.stop - r.start, 1)
            for lo in range(r.start, r.stop, step):
                sl = slice(lo, min(lo + step, r.stop))
                yield {k: v[sl] for k, v in tensors.items()}, False
        return
    n = next(iter(tensors.values())).numel()
    if ranges != [slice(0, n)]:
        raise ValueError("a kernel that draws noise runs over whole buffers")
    m = n // 2
    step = max((chunk or n) // 2, 1)
    for lo in range(0, m, step):
        hi = min(lo + step, m)
        yield dict({k: (v[lo:hi], v[m + lo:m + hi]) for k, v in tensors.items()},
                   counter=_offset(counter, lo)), False
    if n % 2:
        yield dict({k: (v[2 * m:],) for k, v in tensors.items()}, counter=_offset(counter, m)), True


def _offset(counter: torch.Tensor, columns: int) -> torch.Tensor:
    if columns == 0:
        return counter
    out = counter.clone()
    out[4] += columns
    return out


# ---------------------------------------------------------------------------- counter-based noise
# Standard normals as a pure function of (key, counter), so that a kernel can draw them itself
# (in the loop that uses them: no pass over memory to fill a buffer first), on any device, with the
# same stream whatever the chunking and the thread count. Two 32-bit words per counter come from
# a keyed integer hash (two rounds of a 32-bit finalizer with the keys between them); Box-Muller
# turns them into two independent N(0, 1), the cosine output for the counter's column in the first
# half of a buffer and the sine output for its column in the second half. The uniforms have 24
# bits (as torch's own CPU normal_), so |z| <= 5.9.
def _mix(x):
    """A bijective 32-bit integer finalizer (xor-shift-multiply) on int32 with wrapping products;
    right shifts are logical (masked)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * -0x7B935975             # 0x846CA68B as int32
    return x ^ ((x >> 16) & 0xFFFF)


def standard_normal_pairs(counter, like, dtype):
    """N(0, 1) draws for ``like``, a pair of slices of equal length m (or one of length 1): for
    the first the cosine outputs, for the second the sine outputs of the counters
    ``counter[4] + i``; ``counter[:4]`` are the keys."""
    m = like[0].shape[0]
    # 64-bit counters, hashed as two 32-bit halves (with 32-bit counters inductor leaves this
    # loop on one thread)
    c = torch.arange(m, dtype=torch.int64, device=counter.device) + counter[4]
    lo, hi = c.to(torch.int32), (c >> 32).to(torch.int32)
    k = counter[:4].to(torch.int32)
    a = _mix(_mix(lo ^ k[0]) ^ (k[1] + hi))
    b = _mix(_mix(lo ^ k[2]) ^ (k[3] + hi))
    u = (((a >> 8) & 0xFFFFFF).to(dtype) + 0.5) * (1.0 / 16777216)     # in (0, 1)
    r = torch.sqrt(-2.0 * torch.log(u))
    t = ((b >> 8) & 0xFFFFFF).to(dtype) * (6.283185307179586 / 16777216)
    return [r * torch.cos(t), r * torch.sin(t)][:len(like)]


def normal_fill(out, sc, counter):
    """out <- N(0, 1) draws (``standard_normal_pairs``)."""
    for o, z in zip(out, standard_normal_pairs(counter, out, sc.dtype)):
        o.copy_(z)


# ---------------------------------------------------------------------------- low-precision state
# Buffers in bf16 are read as the state dtype (sc.dtype) before any arithmetic. Those that carry
# information from step to step (momentum, h, g_out, h_out, sigma_out) are written with
# stochastic rounding (the per-step accumulators, written once or a few times per step by the
# gradient collection, are rounded to nearest): the 16 bits that bf16 drops are compared with 16 random bits, so the stored
# value is one of the two bf16 neighbours of the fp32 result and equal to it in expectation (round
# to nearest would drop every update smaller than half a bf16 step, 0.2% of the value: h, whose
# updates are (1 - beta2) ~ 1e-4 of it, would freeze). The random bits are the low mantissa bits
# of the step's fp32 noise draw (uniform, fresh every step, and determined by the optimizer's
# generator, so a resumed run rounds exactly as an uninterrupted one); each buffer of a kernel
# takes them through its own bijection of the 16-bit values (``salt``).
_SALT_MUL = (1, 0x2C1B, 0x4F6D, 0x6A09)   # odd: x -> (a x + b) mod 2^16 is a bijection
_SALT_ADD = (0, 0x3C6F, 0x1F83, 0x5BE1)


def store(dst, value, bits=None, salt: int = 0):
    """dst <- value, with stochastic rounding from ``bits`` (an fp32 tensor) when dst is bf16."""
    if dst.dtype != torch.bfloat16:
        dst.copy_(value)
        return
    r = bits.view(torch.int32) & 0xFFFF
    if salt:
        r = (r * _SALT_MUL[salt] + _SALT_ADD[salt]) & 0xFFFF   # < 2^31: no int32 overflow
    v = value.to(torch.float32).view(torch.int32)
    # adding to the bit pattern raises the magnitude (either sign); clearing the low 16 bits leaves
    # a bf16 value exactly: rounded away from zero with probability (low bits) / 2^16
    dst.copy_(((v + r) & -65536).view(torch.float32))


def _read(buf, sc):
    """A buffer as the state dtype (a no-op for fp32 buffers)."""
    return buf if buf is None else buf.to(sc.dtype)


# ---------------------------------------------------------------------------- IVON / IVON-PCM
def product(out, a, b, sc):
    """out <- a b (computed in fp32 / fp64 whatever the buffers' dtypes)."""
    out.copy_(_read(a, sc) * _read(b, sc))


def _root_precision(h, ess, wd, sc):
    """sqrt(ess (h + wd)) = 1 / sigma, in the one order of operations every kernel uses (so that
    noise drawn again is the noise kept: the same expressions from the same counters, equal up to
    how a CPU vectorizes each kernel, bit for bit on the CPUs tested)."""
    return ((_read(h, sc) + wd) * ess).sqrt()


def ivon_scale_noise(noise, hess, sc):
    """noise <- noise / sqrt(ess (h + wd));  sc = [ess, wd]."""
    noise.div_(_root_precision(hess, sc[0], sc[1], sc))


def ivon_draw_noise(noise, hess, sc, counter):
    """noise <- z / sqrt(ess (h + wd)) with z drawn in the loop;  sc = [ess, wd]."""
    for nz, h, z in zip(noise, hess, standard_normal_pairs(counter, noise, sc.dtype)):
        nz.copy_(z / _root_precision(h, sc[0], sc[1], sc))


def ivon_draw_noise_out(noise, hess, sigma_out, sc, counter):
    """theta_out's noise eps sigma_out with z drawn in the loop, rounded as ``ivon_draw_noise``
    then ``ivon_noise_to_out`` round it from a kept buffer (the same numbers whether the noise
    is kept or drawn again);  sc = [ess, wd]."""
    for nz, h, so, z in zip(noise, hess, sigma_out, standard_normal_pairs(counter, noise, sc.dtype)):
        s = _root_precision(h, sc[0], sc[1], sc)
        nz.copy_(z / s * (s * _read(so, sc)))


def ivon_nxg_drawing(out, hess, grad, sc, counter):
    """out <- noise grad with the noise z / sqrt(ess (h + wd)) drawn in the loop (as
    ``ivon_draw_noise`` draws it);  sc = [ess, wd]."""
    for o, h, g, z in zip(out, hess, grad, standard_normal_pairs(counter, out, sc.dtype)):
        o.copy_(z / _root_precision(h, sc[0], sc[1], sc) * _read(g, sc))


def _noise_at_out(noise, hess, sigma_out, ess, wd, sc):
    """eps sigma_out for theta_in's noise eps / sqrt(ess (h + wd)): the same standard normals at
    the outer posterior (shared noise), rounded as every kernel rounds it."""
    return noise * (_root_precision(hess, ess, wd, sc) * _read(sigma_out, sc))


def ivon_noise_to_out(noise, hess, sigma_out, sc):
    """eps = noise sqrt(ess (h + wd)) reused at the outer posterior: noise <- eps sigma_out."""
    noise.copy_(_noise_at_out(noise, hess, sigma_out, sc[0], sc[1], sc))


def pc_theta_out(theta, m_out, hess, sigma_out, sc, noise=None, counter=None):
    """theta <- m_out + eps sigma_out, theta_out with theta_in's standard normals eps (shared
    noise), written into a scratch buffer: from theta_in's noise kept in ``noise``, or drawn
    again from its ``counter`` (then each buffer is a pair of slices, see ``run_kernel``); the
    noise rounded as ``ivon_noise_to_out`` and ``ivon_draw_noise_out`` round it. sc = [ess, wd]."""
    if counter is None:
        theta.copy_(_read(m_out, sc) + _noise_at_out(noise, hess, sigma_out, sc[0], sc[1], sc))
        return
    for i, z in enumerate(standard_normal_pairs(counter, theta, sc.dtype)):
        nz = z / _root_precision(hess[i], sc[0], sc[1], sc)
        theta[i].copy_(m_out[i] + _noise_at_out(nz, hess[i], sigma_out[i], sc[0], sc[1], sc))


def _paired(x_in, x_out, noise, hess, sigma_out, ess, wd, alpha, sc):
    """A step's one in- and out-sample gradient (shared noise, ``noise`` theta_in's) as the
    collections of several samples accumulate them: (noise x_in, noise_out x_out,
    x_in - alpha x_out)."""
    x_in, x_out = _read(x_in, sc), _read(x_out, sc)
    return (noise * x_in, _noise_at_out(noise, hess, sigma_out, ess, wd, sc) * x_out,
            x_in - alpha * x_out)


def pc_pair_first(acc_g, acc_out, acc_nxg, noise, hess, sigma_out, sc):
    """The step's first in- and out-sample, left unpaired by their collections (acc_g holds x_in,
    acc_out x_out), paired now that another sample follows: acc_nxg <- noise x_in,
    acc_out <- noise_out x_out, acc_g <- x_in - alpha x_out. sc = [ess, wd, alpha]."""
    nxg, nxg_out, g = _paired(acc_g, acc_out, noise, hess, sigma_out, sc[0], sc[1], sc[2], sc)
    acc_nxg.copy_(nxg)
    acc_g.copy_(g)
    acc_out.copy_(nxg_out)


def ivon_refresh(mean, hess, acc_g, acc_nxg, g_out, h_out, m_out, sigma_out, sc, first: bool,
                 bits=None):
    """Alg. 4 lines 3-5. sc = [1/M, ess, wd, rho1, 1 - rho1, rho2, 1 - rho2]."""
    inv_m, ess, wd = sc[0], sc[1], sc[2]
    hpd = _read(hess, sc) + wd
    g_hat = _read(acc_g, sc) * inv_m
    h_hat = _read(acc_nxg, sc) * hpd * (ess * inv_m)
    if first:
        store(g_out, g_hat, bits, 2)
        store(h_out, h_hat, bits, 3)
    else:
        store(g_out, sc[3] * _read(g_out, sc) + sc[4] * g_hat, bits, 2)
        store(h_out, sc[5] * _read(h_out, sc) + sc[6] * h_hat, bits, 3)
    m_out.copy_(mean)
    store(sigma_out, (hpd * ess).rsqrt(), bits, 1)


def ivon_update(mean, momentum, hess, acc_g, sc, acc_nxg=None, noise=None, g_out=None,
                h_out=None, m_out=None, sigma_out=None, acc_nxg_out=None, acc_g_out=None,
                bits=None, price: bool = True, clip: bool = True, mean_term: bool = False,
                clipped=None):
    """One IVON(-PCM) step, Alg. 4 lines 8-16. The correction is used when ``g_out`` is given.
    With ``acc_g_out``, the step's only in- and out-sample are paired here (see
    ``pc_pair_first``): acc_g holds x_in, acc_g_out x_out and ``noise`` theta_in's noise.

    sc = [1/k, beta1, 1 - beta1, beta2, 1 - beta2, (1 - beta2)^2 / 2, wd, ess/k, debias,
          step size, clip radius, alpha, alpha * mean-term weight]
    (complements are computed in float64 by the caller: 1 - beta2 in fp32 would be off by 0.1%).
    ``bits``: the random bits of bf16 momentum and h (see ``store``)."""
    inv_k, b1, c1, b2, c2, c22, wd, ess_k = sc[0], sc[1], sc[2], sc[3], sc[4], sc[5], sc[6], sc[7]
    debias, lr, r, a, aw = sc[8], sc[9], sc[10], sc[11], sc[12]
    h = _read(hess, sc)
    hpd = h + wd                                       # with the old h: the noise's
    if acc_g_out is not None:                          # k = 1: ess_k is ess
        acc_nxg, acc_nxg_out, acc_g = _paired(acc_g, acc_g_out, noise, hess, sigma_out, ess_k,
                                              wd, a, sc)
    else:
        acc_g = _read(acc_g, sc)
        acc_nxg = noise * acc_g if noise is not None else _read(acc_nxg, sc)
    g_hat = acc_g * inv_k                              # line 8
    h_hat = acc_nxg * hpd * ess_k if price else acc_nxg * ess_k
    extra = None
    if g_out is not None:
        h_out, sigma_out = _read(h_out, sc), _read(sigma_out, sc)
        h_hat_out = _read(acc_nxg_out, sc) * inv_k / (sigma_out * sigma_out)    # line 9
        g_hat = g_hat + a * _read(g_out, sc)           # line 10 (acc_g holds g_in - alpha g_out)
        h_hat = h_hat - a * (h_hat_out - h_out)
        if mean_term:                                  # line 14's extra term, weighted
            extra = aw * (h_out - h_hat_out) * (mean - m_out)
    g_new = b1 * _read(momentum, sc) + c1 * g_hat     # line 11
    h_new = b2 * h + c2 * h_hat + c22 * (h - h_hat) * (h - h_hat) / hpd   # line 12
    if hess.dtype == torch.bfloat16:
        # line 12 keeps h + wd > 0 (it at most halves it), but bf16 resolves h near -wd only to
        # wd 2^-8: below -wd (1 - 2^-7) a rounding could take h + wd to 0 or under (sigma inf)
        h_new = torch.maximum(h_new, wd * -(1.0 - 2.0 ** -7))
    store(momentum, g_new, bits, 0)
    store(hess, h_new, bits, 1)
    num = g_new / debias + wd * mean                   # lines 13-14
    if extra is not None:
        num = num + extra
    u = num / (h_new + wd)
    if clip:
        if clipped is not None:                        # diagnostics: coordinates at the radius
            clipped.add_((u.abs() > r).sum(dtype=torch.float64))
        u = torch.clamp(u, -r, r)
    mean.copy_(mean - lr * u)                          # line 15


def ivon_update_drawing(sc, counter, low_bits: bool = False, ahead: bool = False,
                        read_noise: bool = False, **buffers_and_flags):
    """``ivon_update`` with a draw from ``counter`` in its loop, z / sqrt(ess (h + wd)). Each buffer
    is a pair of slices as ``run_kernel`` gives them with a counter; sc = ivon_update's + [ess].

    Without ``ahead``: the draw is the step's only in-sample's noise drawn again (with the h
    before the update) instead of read, and gives the rounding bits with ``low_bits``.
    With ``ahead``: the draw is the next draw's noise (with the updated h), written into the kept
    ``noise`` buffer after the update (``ivon_draw_noise`` would draw the same numbers from
    ``counter`` then); the update reads this step's noise from that buffer first with
    ``read_noise``, and its rounding bits with ``low_bits``."""
    flags = {k: v for k, v in buffers_and_flags.items() if not isinstance(v, (tuple, list))}
    buffers = {k: v for k, v in buffers_and_flags.items() if isinstance(v, (tuple, list))}
    for i, z in enumerate(standard_normal_pairs(counter, buffers["mean"], sc.dtype)):
        row = {k: v[i] for k, v in buffers.items()}
        if ahead:
            noise = row.pop("noise")
            ivon_update(**row, sc=sc, noise=noise if read_noise else None,
                        bits=noise if low_bits else None, **flags)
            noise.copy_(z / _root_precision(row["hess"], sc[13], sc[6], sc))
        else:
            noise = z / _root_precision(row["hess"], sc[13], sc[6], sc)
            ivon_update(**row, sc=sc, noise=noise, bits=noise if low_bits else None, **flags)


# ---------------------------------------------------------------------------- diagnostics
# The variance of an estimate e with mean E[e] is E||e||^2 - ||E[e]||^2; ||E[e]||^2 is estimated
# by <e, r> with a reference r independent of e whose mean is E[e]: the debiased momentum for
# gradients, h_out (the mega-batch estimate) for Hessians. Plain and corrected estimates of the
# same micro-batch use the same references, so alpha = 0 gives the same variance for both.
def _dot(a, b):
    return (a * b).sum(dtype=torch.float64)


def pc_stats_plain(acc_g, hess, momentum, h_out, sc, out, acc_nxg=None, noise=None):
    """The plain estimates of a micro-batch before its theta_out pass. sc = [wd, ess, 1/debias].
    out += [x.x, x.r, hx.hx, hx.h_out] with x its gradient, hx = x eps / sigma, r the momentum
    (x eps sigma in ``acc_nxg``, or formed from theta_in's ``noise``)."""
    hess, momentum, h_out = _read(hess, sc), _read(momentum, sc), _read(h_out, sc)
    acc_g = _read(acc_g, sc)
    acc_nxg = noise * acc_g if noise is not None else _read(acc_nxg, sc)
    r = momentum * sc[2]
    hx = acc_nxg * (hess + sc[0]) * sc[1]
    out.add_(torch.stack([_dot(acc_g, acc_g), _dot(acc_g, r), _dot(hx, hx), _dot(hx, h_out)]))


def pc_stats_corrected(acc_g, hess, sigma_out, momentum, g_out, h_out, sc, out, acc_nxg=None,
                       acc_nxg_out=None, acc_g_out=None, noise=None):
    """The corrected estimates of the same micro-batch after its theta_out pass; acc_g holds
    z = x - alpha g_o, so the corrected gradient is c z + alpha g_out for a micro-batch that is a
    share 1/c of the step. sc = [wd, ess, 1/debias, alpha]. out += [z.z, z.ga, ga.ga, z.r, ga.r,
    w.w, w.ha, ha.ha, w.h_out, ha.h_out] with ga = alpha g_out, ha = alpha h_out and
    w = hx - alpha ho the corrected Hessian estimate's micro-batch part. With ``acc_g_out`` the
    two samples are not paired yet (see ``pc_pair_first``): they are paired here as there."""
    hess, momentum, g_out, h_out = _read(hess, sc), _read(momentum, sc), _read(g_out, sc), _read(h_out, sc)
    if acc_g_out is not None:
        acc_nxg, acc_nxg_out, acc_g = _paired(acc_g, acc_g_out, noise, hess, sigma_out, sc[1],
                                              sc[0], sc[3], sc)
    else:
        acc_g, acc_nxg, acc_nxg_out = _read(acc_g, sc), _read(acc_nxg, sc), _read(acc_nxg_out, sc)
    sigma_out = _read(sigma_out, sc)
    r = momentum * sc[2]
    ga = g_out * sc[3]
    ha = h_out * sc[3]
    w = acc_nxg * (hess + sc[0]) * sc[1] - sc[3] * acc_nxg_out / (sigma_out * sigma_out)
    out.add_(torch.stack([_dot(acc_g, acc_g), _dot(acc_g, ga), _dot(ga, ga), _dot(acc_g, r),
                          _dot(ga, r), _dot(w, w), _dot(w, ha), _dot(ha, ha), _dot(w, h_out),
                          _dot(ha, h_out)]))


def variances_from_stats(raw: torch.Tensor, c: float) -> torch.Tensor:
    """[Var plain gradient, Var corrected gradient, Var plain Hessian, Var corrected Hessian] of a
    step's estimates from the 14 sums of ``pc_stats_plain`` and ``pc_stats_corrected`` of one
    micro-batch that is a share 1/c of the step (c = 1 when it is a whole estimate)."""
    xx, xr, hxx, hxo, zz, zga, gaga, zr, gar, ww, wha, haha, wo, hao = raw.unbind()
    return torch.stack([c * c * xx - c * xr,
                        c * c * zz + 2 * c * zga + gaga - (c * zr + gar),
                        c * c * hxx - c * hxo,
                        c * c * ww + 2 * c * wha + haha - (c * wo + hao)])


# ---------------------------------------------------------------------------- SVRG family
def svrg_refresh(mean, acc_g, g_out, m_out, sc, first: bool):
    """sc = [1/M, rho1, 1 - rho1]."""
    g_hat = acc_g * sc[0]
    if first:
        g_out.copy_(g_hat)
    else:
        g_out.copy_(sc[1] * g_out + sc[2] * g_hat)
    m_out.copy_(mean)


def sgd_update(mean, acc_g, momentum_buffer, sc, g_out=None, first: bool = False,
               momentum: bool = False):
    """torch.optim.SGD's update (no dampening). sc = [1/k, lr, wd, mu, alpha]."""
    g = acc_g * sc[0]
    if g_out is not None:
        g = g + sc[4] * g_out
    g = g + sc[2] * mean
    if momentum:
        buf = g if first else sc[3] * momentum_buffer + g
        momentum_buffer.copy_(buf)
        g = buf
    mean.copy_(mean - sc[1] * g)


def adamw_update(mean, acc_g, exp_avg, exp_avg_sq, sc, g_out=None):
    """torch.optim.AdamW's update.

    sc = [1/k, 1 - lr wd, beta1, 1 - beta1, beta2, 1 - beta2, eps, lr / bc1, sqrt(bc2), alpha]."""
    g = acc_g * sc[0]
    if g_out is not None:
        g = g + sc[9] * g_out
    m = mean * sc[1]
    ea = sc[2] * exp_avg + sc[3] * g
    eas = sc[4] * exp_avg_sq + sc[5] * g * g
    exp_avg.copy_(ea)
    exp_avg_sq.copy_(eas)
    mean.copy_(m - sc[7] * ea / (eas.sqrt() / sc[8] + sc[6]))
