"""Cost of one optimizer step, everything outside forward/backward, on a GPT-2-shaped set of tensors.

Every variant updates its own copy of the same parameters (>= ``--params`` fp32 numbers in a
GPT-2-like mix of shapes); the gradients are fixed random tensors assigned to ``p.grad`` (no model,
no forward or backward). What is timed per variant and repetition:

* ``adamw_fused`` / ``adamw_foreach``: ``torch.optim.AdamW(fused=True / foreach=True).step()``
  (the gradients stay set between steps).
* ``ivon_opt``: ivon-opt 0.1.3, ``with opt.sampled_params(train=True): <assign grads>`` then
  ``opt.step()`` (sampling, restoring and collecting are part of its optimizer work).
* ``ivon``: ``hf_ivonpc.optim.IVON``, same pattern (its ``sampled_params`` consumes the gradients
  on exit, so they are assigned inside the block each time, as a backward would).
* ``ivon_pcm``: ``hf_ivonpc.optim.IVONPC`` with the correction active: in pass, out pass, step.
  One refresh (one mega micro-batch) is done before timing and ``refresh_every`` is huge, so the
  timed steps contain no refresh; the refresh is timed separately (``refresh_ms``).
* ``alpha_svrg_adamw``: ``hf_ivonpc.optim.AlphaSVRG(alpha=0.5, base="adamw")``, same as ivon_pcm.
* ``ivon_bf16`` / ``ivon_pcm_bf16``: the same with ``state_dtype="bfloat16"``.
* ``ivon_regen`` / ``ivon_pcm_regen``: the same with ``regenerate_noise=True`` (no noise buffer:
  the noise is drawn again where the step needs it; the default on accelerators).
* ``copy``: ``dst.copy_(src)`` of as many floats as there are parameters: the machine's copy
  bandwidth (8 bytes moved per number), the yardstick of the GB/s column.
* ``randn``: ``torch.randn`` of as many floats as there are parameters (the noise floor).
* ``normal_gen``: ``buf.normal_(generator=g)`` on a preallocated buffer of that size, with the
  generator of an IVON of its own.
* ``noise_draw``: the draw our IVON makes at sampling time, on its own (``_draw_noise`` of that
  IVON: the noise N(0, 1) / sigma drawn by the counter-based generator in one compiled pass; the
  ``ivon`` variant's step writes it ahead inside its update instead), where that method exists;
  ``noise_share_ivon`` = noise_draw / ivon (normal_gen / ivon without it).
* with ``--eager``: ``ivon_eager`` / ``ivon_pcm_eager``, ours with ``fused=False`` (no torch.compile).

Bytes moved per step (``traffic``) count what each pass over memory of the step reads and writes
(see ``TRAFFIC``: one entry per kernel or foreach call, in the order the step makes them); the
achieved GB/s is that over the median time, printed beside the copy bandwidth.

One process, variants interleaved round-robin (the order rotates every repetition), warm-up
repetitions first (the first call of ours includes torch.compile: reported as ``first_call_ms``),
medians reported, with the minimum and the median process CPU time (user+system, all threads)
beside them: on a shared machine other processes inflate wall-clock medians, and the ratios on
minimum times are the steadier ones. Usage::

    PYTHONPATH=. python benchmarks/optim_step.py [--params 25e6] [--reps 15] [--warmup 3]
                                                 [--threads N] [--eager] [--only a,b]
                                                 [--json results/optim_step.json]
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from hf_ivonpc.optim import IVON, IVONPC, AlphaSVRG

try:
    import ivon as ivon_opt
except ImportError:  # the reference implementation is a test extra
    ivon_opt = None

WIDTH = 768
VOCAB = 8192
IVON_KW = dict(lr=0.1, ess=1e6)
ADAMW_KW = dict(lr=1e-3, weight_decay=0.01)
GOALS = {"ivon/adamw_fused": 6.0, "ivon_pcm/adamw_fused": 12.0, "ivon/ivon_opt": 0.15}


def traffic(variant: str) -> list[tuple[str, float]] | None:
    """The passes over memory of one step, (what, bytes per parameter read + written), for fp32
    parameters and gradients and one in-sample per step (None where not modelled). ``s`` is the
    size of a ``low_precision_buffers`` entry (momentum, h, the step's sums, IVON-PCM's g_out,
    h_out and sigma_out): 4 bytes, 2 with bf16 state. With bf16 state IVON-PCM's regenerated
    theta_out goes through a temporary instead of acc_out (the same bytes).

    A kept noise buffer is drawn into by the previous step's update (the next step's noise, drawn
    ahead in its loop): no draw pass, and the update writes the noise too. IVON-PCM's theta_out
    from kept noise is written into the parameters by its kernel, tensor by tensor (no copy)."""
    if not variant.startswith(("ivon", "ivon_pcm")) or variant.endswith("_regen") \
            or variant == "ivon_opt":
        return _traffic_drawn_at_sampling(variant)
    drawn = _traffic_drawn_at_sampling(variant)
    if drawn is None:
        return None
    out = []
    for what, b in drawn:
        if what.startswith(("draw noise", "params <- theta_out")):
            continue
        if what.startswith("update"):
            what, b = what.replace(", w mean m h", ", w mean m h noise"), b + 4
        out.append((what.replace("w acc_out", "w param") if what.startswith("theta_out") else what, b))
    return out


def _traffic_drawn_at_sampling(variant: str) -> list[tuple[str, float]] | None:
    """``traffic`` with every noise drawn when a sample is taken (the regenerated variants'
    case: they keep no buffer to draw ahead into)."""
    if variant.endswith("_regen"):   # no noise buffer: the noise is drawn again where needed
        base = _traffic_drawn_at_sampling(variant[:-len("_regen")])
        if base is None:
            return None
        # the update (and IVON-PCM's theta_out) draw the noise in their loop instead of reading it
        return [(w.replace(" noise, w", ", w"), b - 4) if w.startswith(("update", "theta_out"))
                else (w, b) for w, b in base]
    s = 2 if variant.endswith("_bf16") else 4
    if variant == "adamw_fused":
        return [("update: r param grad m v, w param m v", 28)]
    if variant in ("ivon", "ivon_bf16"):
        return [("draw noise: r h, w noise", s + 4),
                ("params += noise: r param noise, w param", 12),
                ("collect: r grad, w acc_g", 4 + s),
                ("params <- mean, leaving sampled_params: r mean, w param", 8),
                ("update: r mean m h acc_g noise, w mean m h", 4 + 3 * s + 4 + 4 + 2 * s),
                ("params <- mean: r mean, w param", 8)]
    if variant in ("ivon_pcm", "ivon_pcm_bf16"):
        # one in- and one out-sample with shared noise: both are paired with the noise in the
        # update (whose noise read also gives the bf16 rounding bits)
        return [("draw noise: r h, w noise", s + 4),
                ("params += noise: r param noise, w param", 12),
                ("collect in: r grad, w acc_g", 4 + s),
                ("params <- mean, leaving sampled_params: r mean, w param", 8),
                ("theta_out: r m_out h sigma_out noise, w acc_out", 4 + 2 * s + 4 + 4),
                ("params <- theta_out: r acc_out, w param", 8),
                ("collect out: r grad, w acc_out", 4 + s),
                ("params <- mean, leaving sampled_params: r mean, w param", 8),
                ("update: r mean m h acc_g acc_out g_out h_out m_out sigma_out noise, w mean m h",
                 4 + 6 * s + 4 + s + 4 + 4 + 2 * s),
                ("params <- mean: r mean, w param", 8)]
    if variant == "copy":
        return [("copy: r src, w dst", 8)]
    return None


# ---------------------------------------------------------------------------- parameters
def gpt2_like_shapes(target: int, width: int = WIDTH, vocab: int = VOCAB) -> list[tuple[int, ...]]:
    """Token and position embeddings, then GPT-2 blocks (separate q/k/v/o projections, biases,
    two layer norms, a 4x MLP) tensor by tensor until at least ``target`` numbers, then a final
    layer norm."""
    d, f = width, 4 * width
    block = [(d,), (d,),                                  # ln_1 weight, bias
             (d, d), (d,), (d, d), (d,), (d, d), (d,),    # q, k, v
             (d, d), (d,),                                # attention output
             (d,), (d,),                                  # ln_2
             (f, d), (f,), (d, f), (d,)]                  # mlp fc, proj
    shapes = [(vocab, d)]
    if target > vocab * d + 1024 * d:
        shapes.append((1024, d))
    total = sum(math.prod(s) for s in shapes)
    i = 0
    while total < target:
        s = block[i % len(block)]
        shapes.append(s)
        total += math.prod(s)
        i += 1
    shapes += [(d,), (d,)]                                # ln_f
    return shapes


def make_params(shapes, seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes]


def make_grads(shapes, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * 1e-2 for s in shapes]


# ---------------------------------------------------------------------------- variants
class Variant:
    """One optimizer on its own copy of the parameters; ``run()`` is one timed repetition."""

    def __init__(self, name, params, opt, fn, state_bytes):
        self.name, self.params, self.opt, self.fn = name, params, opt, fn
        self.state_bytes = state_bytes
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.first: float | None = None

    def run(self, record: bool) -> None:
        c0 = time.process_time()
        t0 = time.perf_counter()
        self.fn()
        dt = time.perf_counter() - t0
        dc = time.process_time() - c0
        if self.first is None:  # includes torch.compile of our kernels, where used
            self.first = dt
        if record:
            self.times.append(dt)
            self.cpu.append(dc)


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g


def ours_state_bytes(opt) -> int:
    return opt.state_nbytes()


def _accepts(cls, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters


def build_variants(shapes, grads, numel: int, eager: bool = False) -> list[Variant]:
    """All variants; with ``eager``, also ours with ``fused=False`` (no torch.compile), if supported."""
    variants: list[Variant] = []

    def adamw(name, **kw):
        params = make_params(shapes, 0)
        set_grads(params, grads)
        opt = torch.optim.AdamW(params, **ADAMW_KW, **kw)
        opt.step()  # creates the state

        def state_bytes():
            return sum(st[k].nbytes for st in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
        variants.append(Variant(name, params, opt, opt.step, state_bytes))

    adamw("adamw_fused", fused=True)
    adamw("adamw_foreach", foreach=True)

    if ivon_opt is not None:
        params = make_params(shapes, 0)
        opt = ivon_opt.IVON(params, **IVON_KW)

        def ivon_opt_step(opt=opt, params=params):
            with opt.sampled_params(train=True):
                set_grads(params, grads)
            opt.step()

        def ivon_opt_bytes(opt=opt):
            return sum(g[k].nbytes for g in opt.param_groups for k in ("momentum", "hess"))
        variants.append(Variant("ivon_opt", params, opt, ivon_opt_step, ivon_opt_bytes))
    else:
        print("ivon-opt is not installed: the ivon_opt variant is skipped", file=sys.stderr)

    def plain(name, opt, params):
        def step():
            with opt.sampled_params(train=True):
                set_grads(params, grads)
            opt.step()
        variants.append(Variant(name, params, opt, step, lambda: ours_state_bytes(opt)))

    params = make_params(shapes, 0)
    ours = IVON(params, **IVON_KW, seed=0)
    plain("ivon", ours, params)

    def corrected(name, opt, params):
        def refresh():
            with opt.refreshing():
                with opt.sampled_params(train=True, at="mega"):
                    set_grads(params, grads)
        refresh()
        assert opt.correction_active and not opt.needs_refresh

        def step():
            with opt.sampled_params(train=True):
                set_grads(params, grads)
            with opt.sampled_params(train=True, at="out"):
                set_grads(params, grads)
            opt.step()
        variants.append(Variant(name, params, opt, step, lambda: ours_state_bytes(opt)))
        # the refresh, timed on its own (it runs between steps, as in training)
        variants.append(Variant(name + ".refresh", params, opt, refresh, lambda: 0))

    params = make_params(shapes, 0)
    corrected("ivon_pcm", IVONPC(params, **IVON_KW, refresh_every=10**9, seed=0), params)
    if _accepts(IVON, "state_dtype"):
        params = make_params(shapes, 0)
        plain("ivon_bf16", IVON(params, **IVON_KW, seed=0, state_dtype="bfloat16"), params)
        params = make_params(shapes, 0)
        corrected("ivon_pcm_bf16", IVONPC(params, **IVON_KW, refresh_every=10**9, seed=0,
                                          state_dtype="bfloat16"), params)
    if _accepts(IVON, "regenerate_noise"):   # no noise buffer (the default on accelerators)
        params = make_params(shapes, 0)
        plain("ivon_regen", IVON(params, **IVON_KW, seed=0, regenerate_noise=True), params)
        params = make_params(shapes, 0)
        corrected("ivon_pcm_regen", IVONPC(params, **IVON_KW, refresh_every=10**9, seed=0,
                                           regenerate_noise=True), params)
    params = make_params(shapes, 0)
    corrected("alpha_svrg_adamw",
              AlphaSVRG(params, lr=1e-3, alpha=0.5, base="adamw", refresh_every=10**9, seed=0),
              params)
    if eager:
        if _accepts(IVON, "fused") and _accepts(IVONPC, "fused"):
            params = make_params(shapes, 0)
            plain("ivon_eager", IVON(params, **IVON_KW, seed=0, fused=False), params)
            params = make_params(shapes, 0)
            corrected("ivon_pcm_eager",
                      IVONPC(params, **IVON_KW, refresh_every=10**9, seed=0, fused=False), params)
        else:
            print("--eager: these optimizers have no `fused` argument; skipped", file=sys.stderr)

    src, dst = torch.randn(numel), torch.empty(numel)
    variants.append(Variant("copy", [], None, lambda: dst.copy_(src), lambda: 0))
    # noise: the floor (allocate + fill, global generator) and the draw our IVON makes
    variants.append(Variant("randn", [], None, lambda: torch.randn(numel), lambda: 0))
    # (on an optimizer of their own: drawing from the ivon variant's generator between its steps
    # would make its step draw afresh instead of using the noise its previous step drew ahead)
    drawer = IVON(make_params(shapes, 0), **IVON_KW, seed=0)
    buf = torch.empty(numel)
    gen = drawer.generator
    variants.append(Variant("normal_gen", [], None, lambda: buf.normal_(generator=gen), lambda: 0))
    if hasattr(drawer, "_draw_noise"):  # the draw our step makes: N(0, 1) / sigma, one pass
        def noise_draw():
            for gi, group in enumerate(drawer.param_groups):
                drawer._draw_noise(gi, group)
        variants.append(Variant("noise_draw", [], None, noise_draw, lambda: 0))
    return variants


# ---------------------------------------------------------------------------- main
def check_contention(ms: dict, cpu_ms: dict, threads: int, numel: int = 10**8) -> dict:
    """Did other processes hold the cores? Fused AdamW's step on >= 10M parameters keeps every
    thread busy, so its process CPU time is about ``threads`` times its wall time on idle cores; a
    thread that is descheduled shows up as a lower ratio (or, with one thread, as wall > CPU)."""
    wall, cpu = ms.get("adamw_fused"), cpu_ms.get("adamw_fused")
    out = {"adamw_cpu_per_wall": None, "threads": threads, "suspected": False, "why": None}
    if not wall or not cpu:
        return out
    ratio = cpu / wall
    out["adamw_cpu_per_wall"] = ratio
    if threads > 1 and numel >= 10**7 and ratio < 0.7 * threads:
        out["suspected"] = True
        out["why"] = (f"fused AdamW used {ratio:.2f} cores on average with {threads} threads "
                      f"(expected about {threads})")
    elif threads == 1 and ratio < 0.8:
        out["suspected"] = True
        out["why"] = f"fused AdamW got {ratio:.2f} of a core with 1 thread (expected about 1)"
    return out



def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def _git_state() -> str | None:
    """Commit of the checkout, "+dirty" when hf_ivonpc/optim differs from it (what was measured)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hf_ivonpc/optim"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=25e6, help="minimum number of parameters")
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions per variant (>= 1)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--only", default=None,
                    help="comma-separated variants to run (default: all); ratios need their pair")
    ap.add_argument("--eager", action="store_true",
                    help="also time ours with fused=False (eager chunked kernels, no torch.compile)")
    ap.add_argument("--json", default=None, help="write the results to this path")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    shapes = gpt2_like_shapes(int(args.params))
    numel = sum(math.prod(s) for s in shapes)
    grads = make_grads(shapes, 1)
    variants = build_variants(shapes, grads, numel, eager=args.eager)
    if args.only:
        keep = set(args.only.split(","))
        variants = [v for v in variants if v.name in keep or v.name.split(".")[0] in keep]
    print(f"{numel / 1e6:.2f}M fp32 parameters in {len(shapes)} tensors, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {cpu_name()}")

    n = len(variants)
    with torch.no_grad():
        for rep in range(args.warmup + args.reps):
            record = rep >= args.warmup
            for j in range(n):  # round-robin; the starting variant rotates
                variants[(rep + j) % n].run(record)
            gc.collect()

    for v in variants:  # the updates stayed finite (no NaN / denormal slow paths being timed)
        for p in v.params:
            if not torch.isfinite(p).all():
                print(f"warning: {v.name} produced non-finite parameters", file=sys.stderr)
                break

    ms = {v.name: 1e3 * statistics.median(v.times) for v in variants}
    ms_min = {v.name: 1e3 * min(v.times) for v in variants}
    cpu_ms = {v.name: 1e3 * statistics.median(v.cpu) for v in variants}
    spread = {v.name: (1e3 * min(v.times), 1e3 * max(v.times)) for v in variants}
    refresh_ms = {k.split(".")[0]: ms.pop(k) for k in list(ms) if k.endswith(".refresh")}
    refresh_ms_min = {k.split(".")[0]: ms_min.pop(k) for k in list(ms_min) if k.endswith(".refresh")}
    for k in [k for k in cpu_ms if k.endswith(".refresh")]:
        cpu_ms[k.split(".")[0] + "_refresh"] = cpu_ms.pop(k)
    first_ms = {v.name: 1e3 * v.first for v in variants if v.first is not None}
    state = {v.name: v.state_bytes() / numel for v in variants
             if v.opt is not None and not v.name.endswith(".refresh")}

    def ratio(a, b, d=ms):
        return d[a] / d[b] if a in d and b in d else None

    pairs = [("ivon", "adamw_fused"), ("ivon_pcm", "adamw_fused"), ("ivon_bf16", "adamw_fused"),
             ("ivon_pcm_bf16", "adamw_fused"), ("ivon_regen", "adamw_fused"),
             ("ivon_pcm_regen", "adamw_fused"), ("ivon", "ivon_opt"),
             ("ivon_pcm", "ivon_opt"), ("alpha_svrg_adamw", "adamw_fused"),
             ("adamw_foreach", "adamw_fused"), ("randn", "adamw_fused"), ("ivon_opt", "adamw_fused"),
             ("ivon_pcm", "ivon")]
    ratios = {f"{a}/{b}": ratio(a, b) for a, b in pairs}
    ratios_min = {f"{a}/{b}": ratio(a, b, ms_min) for a, b in pairs}
    ratios_cpu = {f"{a}/{b}": ratio(a, b, cpu_ms) for a, b in pairs}
    noise_share = ratio("noise_draw", "ivon") or ratio("normal_gen", "ivon")
    moved = {k: sum(b for _, b in traffic(k)) * numel for k in ms if traffic(k)}
    gbps = {k: moved[k] / ms[k] / 1e6 for k in moved}

    # ------------------------------------------------------------------ report
    base = ms.get("adamw_fused")
    print(f"\nmedian of {args.reps} repetitions after {args.warmup} warm-up, round-robin")
    print(f"{'variant':<20}{'median ms':>11}{'min ms':>9}{'max ms':>9}{'x fused':>9}"
          f"{'x fused(min)':>13}{'cpu ms':>9}{'state B/param':>15}{'moved GB':>10}{'GB/s':>7}")
    for name, t in ms.items():
        lo, hi = spread[name]
        x = f"{t / base:.2f}" if base else "-"
        xm = f"{lo / ms_min['adamw_fused']:.2f}" if base else "-"
        sb = f"{state[name]:.1f}" if name in state else "-"
        mv = f"{moved[name] / 1e9:.2f}" if name in moved else "-"
        bw = f"{gbps[name]:.1f}" if name in gbps else "-"
        print(f"{name:<20}{t:>11.2f}{lo:>9.2f}{hi:>9.2f}{x:>9}{xm:>13}{cpu_ms[name]:>9.1f}{sb:>15}"
              f"{mv:>10}{bw:>7}")
    if "copy" in gbps:
        print(f"\ncopy bandwidth {gbps['copy']:.1f} GB/s: a step that only moved its bytes at that "
              "speed would take " + ", ".join(f"{k} {moved[k] / gbps['copy'] / 1e6:.1f} ms"
                                                for k in moved if k != "copy"))
    for name, t in refresh_ms.items():
        print(f"{name + ' refresh':<20}{t:>11.2f}{refresh_ms_min[name]:>9.2f}{'':>9}"
              f"{t / base if base else 0:>9.2f}  (one mega micro-batch, not in the step)")
    slow_first = {k: t for k, t in first_ms.items() if t > 3 * (ms.get(k) or refresh_ms.get(k.split(".")[0]) or t)}
    if slow_first:
        print("\nfirst call (includes torch.compile where used): " +
              ", ".join(f"{k} {t / 1e3:.1f} s" for k, t in slow_first.items()))
    if noise_share is not None:
        how = ("the optimizer's own draw, noise_draw" if "noise_draw" in ms
               else "normal_ with its generator")
        print(f"\nnoise draw ({how}) = {100 * noise_share:.1f}% of our IVON step")
    contention = check_contention(ms, cpu_ms, torch.get_num_threads(), numel)
    if contention["suspected"]:
        print(f"\nWARNING: {contention['why']}. The cores were shared with other processes: "
              "every time is inflated (OpenMP waits for descheduled threads) and the ratios are "
              "not meaningful. Rerun on an idle machine, or with --threads 1.")
    print("\ngoals:")
    for key, goal in GOALS.items():
        r = ratios.get(key)
        if r is not None:
            verdict = ("not judged: contended" if contention["suspected"]
                       else "met" if r <= goal else "NOT met")
            print(f"  {key:<30} {r:7.3f}  (goal <= {goal}: {verdict}; "
                  f"on min times {ratios_min[key]:.3f}, on cpu times {ratios_cpu[key]:.3f})")
    for key, r in ratios.items():
        if key not in GOALS and r is not None:
            print(f"  {key:<30} {r:7.3f}  (min {ratios_min[key]:.3f}, cpu {ratios_cpu[key]:.3f})")
    try:
        load = os.getloadavg()
        print(f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores "
              "(other processes inflate medians; compare the min and cpu columns)")
    except OSError:
        load = None

    result = {
        "ms": ms,
        "ratios": ratios,
        "ms_min": ms_min,
        "ratios_min": ratios_min,
        "cpu_ms": cpu_ms,
        "ratios_cpu": ratios_cpu,
        "noise_share_ivon": noise_share,
        "state_bytes_per_param": state,
        "bytes_moved_per_step": moved,
        "traffic_per_param": {k: traffic(k) for k in moved},
        "achieved_gb_per_s": gbps,
        "copy_gb_per_s": gbps.get("copy"),
        "refresh_ms": refresh_ms.get("ivon_pcm"),
        "refresh_ms_by_variant": refresh_ms,
        "refresh_ms_min": refresh_ms_min,
        "first_call_ms": first_ms,
        "goals": {k: {"goal": g, "value": ratios.get(k),
                      "met": (None if ratios.get(k) is None or contention["suspected"]
                              else ratios[k] <= g)}
                  for k, g in GOALS.items()},
        "contention": contention,
        "config": {"params": numel, "tensors": len(shapes), "threads": torch.get_num_threads(),
                   "reps": args.reps, "warmup": args.warmup, "torch": torch.__version__,
                   "ivon_opt": _dist_version("ivon-opt"),
                   "cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                   "loadavg_at_end": load, "git": _git_state()},
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
