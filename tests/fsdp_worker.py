"""Worker of tests/test_fsdp.py: the optimizers over FSDP2-sharded parameters (torchrun, gloo, CPU).

Each rank trains a small MLP wrapped with ``fully_shard`` on its half of a global batch; then, on
rank 0 only, the same steps run in one process on the whole batch without sharding. The "noise"
is a fixed function of each element's index in its whole parameter (a subclass overrides the
draw), so both runs see the same theta draws and must agree up to summation order. Rank 0 writes
the largest differences to the JSON file named on the command line.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUT.json
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from hf_ivonpc import Posterior
from hf_ivonpc.optim import IVON, IVONPC, AlphaSVRG
from hf_ivonpc.optim._sharding import is_sharded, local_part

STEPS, BATCH, REFRESH, MEGA = 6, 8, 3, 2


class IndexNoise:
    """Noise = cos(0.7 * index in the whole parameter + draw number): the same on any sharding.

    Overrides the optimizer's standard-normal draw (its hook ``_draw_standard_normal``, a test of
    the internals); the buffer is a group's flat noise buffer, laid out parameter after parameter
    (each rank's shard of it when sharded)."""

    def _draw_standard_normal(self, buf):
        self.index_draws = getattr(self, "index_draws", 0) + 1
        gi = next(i for i, f in enumerate(self.flat_state(transient=True)) if f["noise"] is buf)
        off = 0
        for p in self.param_groups[gi]["params"]:
            idx = local_part(p, torch.arange(p.numel(), dtype=buf.dtype).view(p.shape))
            buf[off:off + idx.numel()].view_as(idx).copy_(torch.cos(0.7 * idx + self.index_draws))
            off += idx.numel()


def make(name, params):
    kw = dict(fused=False)
    if name == "ivon":
        cls, kw = type("I", (IndexNoise, IVON), {}), dict(kw, lr=0.1, ess=1e3, hess_init=0.5, seed=0)
    elif name == "ivon_pcm":
        cls = type("P", (IndexNoise, IVONPC), {})
        kw = dict(kw, lr=0.1, ess=1e3, hess_init=0.5, alpha=1.0, refresh_every=REFRESH, start_step=1, seed=0,
                  clip_radius=float("inf"), weight_decay=1e-4, rescale_lr=True)
    else:
        cls = type("S", (IndexNoise, AlphaSVRG), {})
        kw = dict(kw, lr=1e-2, alpha=0.5, refresh_every=REFRESH, start_step=1, seed=0)
    opt = cls(params, **kw)
    opt.max_grad_norm = 0.5   # small enough to clip: the norm must be the whole gradient's
    return opt


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def data(step, role="in"):
    g = torch.Generator().manual_seed(1000 * step + {"in": 0, "mega": 1}[role])
    return torch.randn(BATCH * MEGA, 5, generator=g), torch.randint(0, 3, (BATCH * MEGA,), generator=g)


def train(name, net, part):
    """``part(x)``: this process's share of a batch."""
    opt = make(name, groups(net))
    lossf = nn.CrossEntropyLoss()
    for step in range(STEPS):
        if opt.corrects and opt.needs_refresh:
            x, y = data(step, "mega")
            with opt.refreshing():
                for k in range(MEGA):   # each micro-batch of the mega-batch its own draw
                    xs, ys = x[k * BATCH:(k + 1) * BATCH], y[k * BATCH:(k + 1) * BATCH]
                    with opt.sampled_params(train=True, at="mega"):
                        lossf(net(part(xs)), part(ys)).backward()
        x, y = data(step)
        x, y = x[:BATCH], y[:BATCH]
        with opt.sampled_params(train=True):
            lossf(net(part(x)), part(y)).backward()
        if opt.correction_active:
            with opt.sampled_params(train=True, at="out"):
                lossf(net(part(x)), part(y)).backward()
        opt.step()
    return opt


def groups(net):
    return [{"params": list(net[0].parameters()), "weight_decay": 1e-3},
            {"params": list(net[2].parameters()), "weight_decay": 0.0}]


def same_state(a, b):
    hyper = [[{k: v for k, v in g.items() if k != "params"} for g in o.param_groups] for o in (a, b)]
    return (a.counters == b.counters and hyper[0] == hyper[1] and a.param_groups[0]["step"] == STEPS
            and torch.equal(a.generator.get_state(), b.generator.get_state())
            and all(torch.equal(x[n], y[n]) for x, y in zip(a.flat_state(), b.flat_state()) for n in x))


def dcp_round_trip(name, net, opt, folder):
    """Save with torch.distributed.checkpoint (Trainer's FSDP checkpoints) into a new optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    dcp.save({"optim": get_optimizer_state_dict(net, opt)}, checkpoint_id=str(folder))
    fresh = make(name, groups(net))
    target = {"optim": get_optimizer_state_dict(net, fresh)}
    dcp.load(target, checkpoint_id=str(folder))
    set_optimizer_state_dict(net, fresh, target["optim"])
    return on_all_ranks(same_state(opt, fresh))


def on_all_ranks(ok: bool) -> bool:
    flag = torch.tensor(int(ok))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def full(t):
    return t.full_tensor() if is_sharded(t) else t


def main(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.fsdp import fully_shard
    report = {}
    for name in ("ivon", "ivon_pcm", "alpha_svrg"):
        net = model()
        fully_shard(net[0])
        fully_shard(net[2])
        fully_shard(net)
        share = BATCH // world
        opt = train(name, net, lambda t: t[rank * share:(rank + 1) * share])
        torch.randn(rank + 1, generator=opt.generator)   # IndexNoise leaves it unused: move it per rank
        sharded = {"params": [full(p).detach() for p in net.parameters()],
                   "state": [full(s).detach() for g in opt.param_groups for p in g["params"]
                             for s in opt.state[p].values()]}
        post = Posterior.from_optimizer(opt, net) if name != "alpha_svrg" else None   # a collective
        sd = opt.state_dict()
        shapes_ok = all(s.shape == p.shape and is_sharded(s)
                        for g in opt.param_groups for p in g["params"] for s in opt.state[p].values())
        # a state_dict saved per rank restores the optimizer exactly (resume with torch.save)
        opt2 = make(name, groups(net))
        opt2.load_state_dict(sd)
        reload_ok = on_all_ranks(same_state(opt, opt2))
        dcp_ok = dcp_round_trip(name, net, opt, Path(out).parent / f"dcp-{name}")
        if rank == 0:
            ref_net = model()
            ref = train(name, ref_net, lambda t: t)
            plain = {"params": [p.detach() for p in ref_net.parameters()],
                     "state": [s for g in ref.param_groups for p in g["params"] for s in ref.state[p].values()]}
            diff = {k: max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                           for a, b in zip(sharded[k], plain[k])) for k in plain}
            moved = max((a - b).abs().max().item() for a, b in zip(plain["params"],
                                                                     [p.detach() for p in model().parameters()]))
            if post is not None:   # gathered from the shards: the one-process posterior
                ref_post = Posterior.from_optimizer(ref, ref_net)
                diff["posterior_std"] = max(((post.std[n] - ref_post.std[n]).abs().max()
                                             / ref_post.std[n].abs().max()).item() for n in ref_post.names)
            report[name] = {"rel_diff": diff, "moved": moved, "state_is_dtensor": shapes_ok,
                            "reload_exact": reload_ok, "dcp_exact": dcp_ok, "refreshes": ref.refreshes,
                            "sharded_refreshes": opt.refreshes,
                            "local_numel": sum(f["mean"].numel() for f in opt.flat_state()),
                            "numel": sum(p.numel() for p in ref_net.parameters())}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
