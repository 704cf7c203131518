"""Small problems shared by the optimizer tests."""

import torch


def make_params(dtype=torch.float64, seed=0):
    """Mixed shapes, including a scalar and a 3-D tensor."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (5,), (5, 3), (3,), (2, 3, 1), ()]
    return [torch.nn.Parameter(0.3 * torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def make_data(n=64, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def loss_fn(params, x, y):
    w1, b1, w2, b2, w3, s = params
    h = torch.tanh(x @ w1 + b1)
    logits = h @ w2 + b2 + s * (x[:, :2] @ w3.view(2, 3))
    return torch.nn.functional.cross_entropy(logits, y)


def groups_of(params):
    """Two parameter groups with different hyperparameters."""
    return [{"params": params[:3]}, {"params": params[3:], "lr": 0.05, "weight_decay": 0.0}]


def _data_order(opt, n, steps, batch, mega):
    """Per step: the mega-batch's micro-batches (when a refresh is due, else None) and the step's
    batch indices, drawn from one fixed generator in that order."""
    order = torch.Generator().manual_seed(7)
    for _ in range(steps):
        parts = torch.randperm(n, generator=order)[: mega[0]].chunk(mega[1]) if opt.needs_refresh else None
        yield parts, torch.randint(0, n, (batch,), generator=order)


def inner_step(opt, params, x, y, idx, loss=loss_fn):
    """One inner step on the examples ``idx``: theta_in, theta_out when the correction is
    active, then ``step()``."""
    active = getattr(opt, "correction_active", False)
    with opt.sampled_params(train=True):
        loss(params, x[idx], y[idx]).backward()
    if active:
        with opt.sampled_params(train=True, at="out"):
            loss(params, x[idx], y[idx]).backward()
    opt.step()


def drive(opt, params, steps, x, y, batch=8, mega=(32, 2), micro=1, loss=loss_fn):
    """The correction protocol on a fixed data order: `micro` micro-batches per step,
    a mega-batch of mega[0] examples in mega[1] micro-batches when a refresh is due."""
    losses = []
    for parts, idx in _data_order(opt, x.shape[0], steps, batch * micro, mega):
        if parts is not None:
            with opt.refreshing():
                for part in parts:
                    with opt.sampled_params(train=True, at="mega"):
                        loss(params, x[part], y[part]).backward()
        active = opt.correction_active
        for part in idx.chunk(micro):
            with opt.sampled_params(train=True):
                value = loss(params, x[part], y[part])
                value.backward()
            if active:
                with opt.sampled_params(train=True, at="out"):
                    loss(params, x[part], y[part]).backward()
            losses.append(value.item())
        opt.step()
    return losses


def drive_closures(opt, params, steps, x, y, batch=8, mega=(32, 2), loss=loss_fn):
    """`drive` for the closure-based VON-PC (``refresh(closures)``, ``step(closure)``), on the
    same data order (one micro-batch per step)."""
    losses = []
    for parts, idx in _data_order(opt, x.shape[0], steps, batch, mega):
        if parts is not None:
            opt.refresh([lambda part=part: loss(params, x[part], y[part]) for part in parts])
        losses.append(opt.step(lambda: loss(params, x[idx], y[idx])).item())
    return losses
