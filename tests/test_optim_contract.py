"""The torch.optim contract, for every optimizer the package exports.

One test body per item of the contract, run over every case of ``CASES`` (``IVON``, ``IVONPC``
with and without the correction active, ``SVRG``, ``AlphaSVRG``, ``VSGDPC``, ``VONPC``):

- ``state_dict`` round trip: a copy loaded from the (``weights_only``) state_dict, stopped
  between two refreshes, continues bit for bit like the original;
- ``zero_grad``, with ``set_to_none`` both ways, touches neither the parameters nor the state;
- several parameter groups with different ``lr``: each group steps with its own;
- a parameter whose ``.grad`` is None is skipped without error;
- bad constructor arguments raise a ValueError naming the argument, the value and the range;
- an exception inside sampling (a pass at theta_in, theta_out, or of the mega-batch) restores
  the mean parameters and leaves the state as it was, and the next step runs as usual.

A case's *driver* runs the protocol the optimizer follows: the gradient-based ones take
gradients inside ``with opt.sampled_params(train=True): loss.backward()`` (``_problems.drive``),
VON-PC takes closures (``refresh(closures)``, ``step(closure)``, ``_problems.drive_closures``).
The reference twins in ``hf_ivonpc.optim.reference`` are not torch optimizers (no state_dict,
no zero_grad): they are checked against the fast ones in the per-optimizer files instead.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import pytest
import torch

from hf_ivonpc import optim
from hf_ivonpc.optim import IVON, IVONPC, SVRG, VSGDPC, AlphaSVRG, reference
from hf_ivonpc.optim.von_pc import VONPC

from _problems import drive, drive_closures, loss_fn, make_data, make_params

X, Y = make_data()
#: steps before a check: with refresh_every=3 and start_step=1 the corrected cases have refreshed
#: at step 1 and are between two refreshes (the next at step 4)
WARMUP = 3
LOOP = dict(refresh_every=3, start_step=1)

POSITIVE, NONNEG = "a finite number > 0", "a finite number >= 0"
BETA, UNIT = "[0, 1)", "[0, 1]"
INT0, INT1 = "an integer >= 0", "an integer >= 1"


@dataclass(frozen=True)
class Bad:
    """A bad constructor argument, the range the error must state, and how it names the value."""

    kwarg: str
    value: object
    accepted: str
    shown: str | None = None   # default: kwarg=repr(value)

    def __str__(self):
        return f"{self.kwarg}={self.value!r}"


@dataclass(frozen=True)
class Case:
    name: str
    cls: type
    kwargs: dict
    corrected: bool                  # correction_active after WARMUP steps
    bad: tuple[Bad, ...]
    closures: bool = False           # VON-PC: refresh(closures), step(closure)
    groups_may_differ: bool = True   # VON-PC: one posterior, the same hyperparameters in every group
    unused_kwargs: dict = field(default_factory=dict)

    def make(self, params, **over):
        return self.cls(params, **{**self.kwargs, **over})

    def groups(self, params):
        """Two parameter groups (with a different lr where the optimizer allows it)."""
        second = {"lr": self.kwargs["lr"] / 2} if self.groups_may_differ else {}
        return [{"params": params[:3]}, {"params": params[3:], **second}]

    def drive(self, opt, params, steps, **kw):
        return (drive_closures if self.closures else drive)(opt, params, steps, X, Y, **kw)

    @property
    def roles(self) -> tuple[str, ...]:
        """The sampling passes: theta_in, and the mega-batch and theta_out ones when correcting."""
        return ("in", "mega", "out") if self.corrected else ("in",)

    def fail_inside(self, opt, params, role):
        """Raise Boom inside the ``role`` pass, after its backward (the closure's loss)."""
        def boom():
            loss = loss_fn(params, X[:8], Y[:8])
            if not self.closures:
                loss.backward()
            raise Boom
        if self.closures:
            if role == "mega":
                opt.refresh([lambda: loss_fn(params, X[8:16], Y[8:16]), boom])
            else:   # "in": at its first call; "out": at its second, at theta_out
                calls = []

                def closure():
                    calls.append(1)
                    return boom() if role == "in" or len(calls) == 2 else loss_fn(params, X[:8], Y[:8])
                opt.step(closure)
        elif role == "mega":
            with opt.refreshing():
                with opt.sampled_params(train=True, at="mega"):
                    boom()
        else:
            if role == "out":
                with opt.sampled_params(train=True):
                    loss_fn(params, X[:8], Y[:8]).backward()
            with opt.sampled_params(train=True, at=role):
                boom()


class Boom(Exception):
    pass


IVON_BAD = (
    Bad("lr", 0.0, POSITIVE), Bad("lr", -1.0, POSITIVE), Bad("lr", float("nan"), POSITIVE),
    Bad("ess", 0.0, POSITIVE), Bad("ess", -5.0, POSITIVE), Bad("hess_init", 0.0, POSITIVE),
    Bad("hess_init", -1e-3, POSITIVE), Bad("beta1", 1.0, BETA), Bad("beta1", -0.1, BETA),
    Bad("beta2", 1.0, BETA), Bad("beta2", 1.5, BETA), Bad("weight_decay", -1e-4, NONNEG),
    Bad("clip_radius", 0.0, "a number > 0 (inf disables clipping)"), Bad("mc_samples", 0, INT1),
    Bad("seed", -1, INT0), Bad("chunk_size", 0, INT1), Bad("ess", float("inf"), POSITIVE),
    Bad("sync", "yes", "True or False"), Bad("debias", 1, "True or False"),
    Bad("rescale_lr", None, "True or False"), Bad("fused", "always", "None, True or False"),
    Bad("regenerate_noise", 1, "None, True or False"), Bad("seed", 1.5, INT0),
    Bad("generator", 7, "None or a torch.Generator"),
    Bad("state_dtype", "fp8", "None, 'float32'", shown="state_dtype='fp8'"),
)
PC_BAD = (
    Bad("alpha", -0.1, NONNEG), Bad("rho1", 1.1, UNIT), Bad("rho1", -0.1, UNIT), Bad("rho2", 2.0, UNIT),
    Bad("mean_term_weight", -1.0, NONNEG), Bad("refresh_every", 0, INT1),
    Bad("refresh_every", 2.5, INT1), Bad("start_step", -1, INT0),
    Bad("shared_noise", "no", "True or False"), Bad("alpha", float("nan"), NONNEG),
)
SVRG_BAD = (Bad("lr", 0.0, POSITIVE), Bad("lr", -1.0, POSITIVE), Bad("momentum", 1.0, BETA),
            Bad("weight_decay", -1.0, NONNEG), Bad("refresh_every", 0, INT1), Bad("start_step", -1, INT0),
            Bad("seed", -1, INT0), Bad("shared_noise", None, "True or False"),
            Bad("fused", 0, "None, True or False"), Bad("generator", "g", "None or a torch.Generator"),
            Bad("chunk_size", -4, INT1))
IVON_KW = dict(lr=0.1, ess=100.0, hess_init=0.3, beta2=0.99, weight_decay=1e-3)
PC_KW = dict(IVON_KW, clip_radius=0.05, alpha=0.7, rho1=0.6, rho2=0.1, mean_term_weight=1.0)

CASES = [
    Case("IVON", IVON, IVON_KW, corrected=False,
         bad=IVON_BAD + (Bad("hess_approx", "exact", "'price' or 'gradsq'"),)),
    Case("IVONPC", IVONPC, dict(PC_KW, **LOOP), corrected=True,
         bad=IVON_BAD + PC_BAD + (Bad("hess_approx", "gradsq", "'price'"),)),
    Case("IVONPC-before-start", IVONPC, dict(PC_KW, refresh_every=3, start_step=10**6),
         corrected=False, bad=()),
    Case("SVRG", SVRG, dict(lr=0.05, momentum=0.9, weight_decay=1e-3, **LOOP), corrected=True,
         bad=SVRG_BAD),
    Case("AlphaSVRG", AlphaSVRG, dict(lr=0.01, alpha=0.6, base="adamw", weight_decay=1e-2,
                                      noise_std=0.05, rho1=0.3, **LOOP), corrected=True,
         bad=SVRG_BAD + (Bad("alpha", -1.0, NONNEG), Bad("base", "adam", "'sgd' or 'adamw'"),
                         Bad("betas", (0.9,), "a pair (beta1, beta2)"),
                         Bad("betas", (0.9, 1.0), BETA, shown="betas[1]=1.0"), Bad("eps", 0.0, POSITIVE),
                         Bad("noise_std", -0.1, NONNEG), Bad("rho1", 1.5, UNIT))),
    Case("VSGDPC", VSGDPC, dict(lr=0.05, noise_std=0.05, weight_decay=1e-3, shared_noise=False, **LOOP),
         corrected=True, bad=(Bad("noise_std", -1.0, NONNEG), Bad("lr", -1.0, POSITIVE),
                              Bad("weight_decay", -1.0, NONNEG), Bad("refresh_every", 0, INT1))),
    Case("VONPC", VONPC, dict(lr=0.1, beta=0.1, ess=64.0, prior_precision=1e-2, alpha=0.7, rho1=0.3,
                              rho2=0.2, keep_pd=True, **LOOP), corrected=True, closures=True,
         groups_may_differ=False, unused_kwargs=dict(prior_precision=0.0),
         bad=(Bad("lr", 0.0, POSITIVE), Bad("lr", -1.0, POSITIVE), Bad("lr", float("nan"), POSITIVE),
              Bad("beta", 0.0, "(0, 1]"), Bad("beta", 1.5, "(0, 1]"), Bad("beta", -0.1, "(0, 1]"),
              Bad("ess", 0.0, POSITIVE), Bad("ess", float("inf"), POSITIVE),
              Bad("prior_precision", -1e-3, NONNEG), Bad("s_init", 0.0, POSITIVE),
              Bad("alpha", -0.5, NONNEG), Bad("rho1", -0.1, UNIT), Bad("rho1", 1.1, UNIT),
              Bad("rho2", 2.0, UNIT),
              Bad("mean_term_weight", -1.0, NONNEG), Bad("refresh_every", 0, INT1),
              Bad("refresh_every", 2.5, INT1), Bad("start_step", -1, INT0), Bad("noise", 1, "True or False"),
              Bad("shared_noise", "yes", "True or False"), Bad("keep_pd", None, "True or False"),
              Bad("max_dim", 0, INT1), Bad("seed", -3, INT0),
              Bad("generator", "gen", "None or a torch.Generator"))),
]
IDS = [c.name for c in CASES]


# ----------------------------------------------------------------------------- helpers
def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def assert_same(a, b, path="state_dict"):
    """Equal bit for bit: tensors, numbers, and the dicts and lists that hold them."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    else:
        assert a == b, (path, a, b)


def snapshot(opt):
    """A copy of the optimizer's state_dict without the generator state."""
    sd = _clone(opt.state_dict())
    sd["hf_ivonpc"].pop("generator")
    return sd


def values(params):
    return [p.detach().clone() for p in params]


def assert_values(params, expected):
    for i, (p, e) in enumerate(zip(params, expected)):
        assert torch.equal(p.detach(), e), f"parameter {i}"


# ----------------------------------------------------------------------------- the contract
def test_every_exported_optimizer_is_covered():
    classes = [getattr(optim, name) for name in optim.__all__]
    exported = {c.__name__ for c in classes if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)}
    assert exported == {"IVON", "IVONPC", "SVRG", "AlphaSVRG", "VSGDPC", "VONPC"}
    assert exported == {c.cls.__name__ for c in CASES}


@pytest.mark.parametrize("twin", [reference.IVON, reference.IVONPC, reference.AlphaSVRG, reference.VONPC])
def test_reference_twins_are_not_torch_optimizers(twin):
    """If one becomes a torch optimizer, it belongs in CASES."""
    assert not issubclass(twin, torch.optim.Optimizer)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parameters_and_groups_may_be_generators(case):
    """As torch.optim accepts them: ``model.parameters()`` alone or as a group's params."""
    p = make_params()
    a = case.make(iter(p), seed=0)
    b = case.make([{"params": iter(p[:3])}, {"params": (q for q in p[3:])}], seed=0)
    assert [len(g["params"]) for g in a.param_groups] == [len(p)]
    assert [len(g["params"]) for g in b.param_groups] == [3, len(p) - 3]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_round_trip_continues_bit_exactly(case):
    pa = make_params()
    a = case.make(case.groups(pa), seed=1)
    case.drive(a, pa, WARMUP)
    assert a.correction_active == case.corrected and not a.needs_refresh   # between two refreshes
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    b = case.make(case.groups(pb), seed=2)          # another seed: the generator must load
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert_same(b.state_dict(), a.state_dict())
    tail_a, tail_b = case.drive(a, pa, 4), case.drive(b, pb, 4)
    assert a.refreshes == (2 if case.corrected else 0)
    assert tail_a == tail_b
    assert_values(pb, values(pa))
    assert_same(b.state_dict(), a.state_dict())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_zero_grad_both_ways_touches_nothing_else(case):
    p = make_params()
    opt = case.make(p, seed=0)
    case.drive(opt, p, 2)
    before, mean = snapshot(opt), values(p)
    for set_to_none in (True, False, None):
        for q in p:
            q.grad = torch.ones_like(q)
        if set_to_none is None:
            opt.zero_grad()                       # torch's default: set to None
        else:
            opt.zero_grad(set_to_none=set_to_none)
        for q in p:
            if set_to_none is False:
                assert q.grad is not None and torch.equal(q.grad, torch.zeros_like(q))
            else:
                assert q.grad is None
    assert_values(p, mean)
    assert_same(snapshot(opt), before)


def separable_loss(params, x, y, _fixed=[q.detach() for q in make_params()]):
    """loss_fn with the groups (params[:3], params[3:]) apart: each against fixed values of the
    other, so that neither group's gradients depend on the other's trajectory."""
    a, b = list(params[:3]), list(params[3:])
    return loss_fn(a + _fixed[3:], x, y) + loss_fn(_fixed[:3] + b, x, y)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_each_param_group_steps_with_its_own_lr(case):
    lr = case.kwargs["lr"]
    if not case.groups_may_differ:
        p = make_params()
        with pytest.raises(ValueError, match=r"param_groups\[1\]\.lr=.* differs from param_groups\[0\]\.lr"):
            case.make([{"params": p[:3]}, {"params": p[3:], "lr": lr / 2}])
        return
    runs = {}
    for lrs in ((lr, lr / 2), (lr, lr), (lr / 2, lr / 2)):
        p = make_params()
        opt = case.make([{"params": p[:3], "lr": lrs[0]}, {"params": p[3:], "lr": lrs[1]}], seed=0)
        case.drive(opt, p, WARMUP + 2, loss=separable_loss)
        assert [g["lr"] for g in opt.param_groups] == list(lrs)
        runs[lrs] = values(p)
    mixed = runs[(lr, lr / 2)]
    assert_values(mixed[:3], runs[(lr, lr)][:3])
    assert_values(mixed[3:], runs[(lr / 2, lr / 2)][3:])
    assert not torch.equal(runs[(lr, lr)][0], runs[(lr / 2, lr / 2)][0])   # the lr does matter


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_parameter_whose_grad_is_none_is_skipped(case):
    p = make_params()
    unused = torch.nn.Parameter(torch.full((4,), 0.5, dtype=torch.float64))
    opt = case.make([{"params": p[:2] + [unused] + p[2:3]}, {"params": p[3:]}], seed=0,
                    **case.unused_kwargs)
    case.drive(opt, p, WARMUP)                    # the loss does not use `unused`
    # a refresh snapshots every parameter (m_out <- m); a step leaves the skipped one's state alone
    before = _clone({q: opt.state.get(q, {}) for q in (unused, p[0])})
    case.drive(opt, p, 1)
    assert unused.grad is None
    assert torch.equal(unused.detach(), torch.full((4,), 0.5, dtype=torch.float64))
    assert_same(_clone(opt.state.get(unused, {})), before[unused])
    if before[p[0]]:   # while the others' state did change
        assert any(not torch.equal(v, before[p[0]][k]) for k, v in opt.state[p[0]].items())


BAD = [(case, bad) for case in CASES for bad in case.bad]


@pytest.mark.parametrize("case,bad", BAD, ids=[f"{c.name}-{b}" for c, b in BAD])
def test_a_bad_argument_raises_naming_it_its_value_and_range(case, bad):
    with pytest.raises(ValueError) as err:
        case.make(make_params(), **{bad.kwarg: bad.value})
    msg = str(err.value)
    assert f"{bad.shown or bad} is invalid: accepted" in msg, msg
    assert bad.accepted in msg, msg


@pytest.mark.parametrize("name", ["IVON", "IVONPC", "AlphaSVRG"])
def test_every_keyword_has_a_bad_value_above(name):
    """Each constructor keyword of the optimizers PCTrainer builds is refused with a bad value by
    the test above (a keyword added without a check fails here)."""
    import inspect
    case = next(c for c in CASES if c.name == name)
    keywords = {n for n, p in inspect.signature(case.cls.__init__).parameters.items()
                if n not in ("self", "params") and not n.startswith("_")
                and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    assert keywords - {b.kwarg for b in case.bad} == set()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_bad_value_in_a_later_group_is_named_with_its_group(case):
    p = make_params()
    with pytest.raises(ValueError) as err:
        case.make([{"params": p[:3]}, {"params": p[3:], "lr": -1.0}])
    assert f"param_groups[1].lr=-1.0 is invalid: accepted range is {POSITIVE}" in str(err.value)


ROLES = [(case, role) for case in CASES for role in case.roles]


@pytest.mark.parametrize("case,role", ROLES, ids=[f"{c.name}-{r}" for c, r in ROLES])
def test_an_exception_inside_sampling_restores_the_mean(case, role):
    p = make_params()
    opt = case.make(case.groups(p), seed=0)
    case.drive(opt, p, WARMUP)
    mean, before = values(p), snapshot(opt)
    collected = getattr(opt, "collected", 0)
    with pytest.raises(Boom):
        case.fail_inside(opt, p, role)
    assert_values(p, mean)
    assert_same(snapshot(opt), before)
    if role == "out":   # the mini-batch cannot be paired any more: the step starts afresh
        collected = 0
    assert getattr(opt, "collected", 0) == collected       # nothing (more) was collected
    case.drive(opt, p, 1)                                  # and the next step runs as usual
    assert opt.global_step == WARMUP + 1
