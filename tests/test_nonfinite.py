"""Non-finite gradients are skipped, counted and bounded (see ``optim/_sampling.py``).

Each poisoned run is compared with a run that never met the poisoned batch: the same operations
on the same layout in the same process, so the state must be equal bit for bit (the mean, every
buffer, the parameters and the generator)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_ivonpc.optim import IVON, IVONPC, AlphaSVRG, NonFiniteError

from _problems import groups_of, inner_step, loss_fn, make_data, make_params

HP = dict(lr=0.1, ess=500.0, hess_init=0.2, beta1=0.9, beta2=0.99, weight_decay=1e-3,
          clip_radius=0.05, rescale_lr=False)
PC = dict(alpha=0.7, rho1=0.6, rho2=0.1, mean_term_weight=1.0, refresh_every=3, start_step=2)
MAKERS = {
    "ivon": lambda p, **kw: IVON(groups_of(p), **HP, seed=3, **kw),
    "ivon_pcm": lambda p, **kw: IVONPC(groups_of(p), **HP, **PC, seed=3, **kw),
    "alpha_svrg": lambda p, **kw: AlphaSVRG(p, lr=0.05, alpha=0.5, base="adamw", refresh_every=3,
                                            start_step=2, noise_std=0.01, seed=3, **kw),
}
BAD = float("nan")


def _loop(opt, params, steps, x, y, poison=None, skip_refresh_at=None, bad=BAD):
    """The correction protocol on a fixed data order. ``poison`` = (t, where): before step t's
    real pass, one attempt whose loss is multiplied by ``bad`` at theta_in, at theta_out or in
    the mega-batch's second micro-batch (then that refresh is the poisoned attempt).
    ``skip_refresh_at``: the step whose due refresh is not made (what a discarded one leaves)."""
    order = torch.Generator().manual_seed(7)
    poison_t, where = poison or (None, None)
    for t in range(steps):
        mega = torch.randperm(64, generator=order)[:32].chunk(2)
        idx = torch.randint(0, 64, (8,), generator=order)
        bad_idx = torch.randint(0, 64, (8,), generator=order)
        if opt.needs_refresh and t != skip_refresh_at:
            with opt.refreshing():
                for i, part in enumerate(mega):
                    with opt.sampled_params(train=True, at="mega"):
                        scale = bad if (t == poison_t and where == "mega" and i == 1) else 1.0
                        (scale * loss_fn(params, x[part], y[part])).backward()
        if t == poison_t and where in ("in", "out"):
            with opt.sampled_params(train=True):
                (loss_fn(params, x[bad_idx], y[bad_idx]) * (bad if where == "in" else 1.0)).backward()
            if opt.correction_active:
                with opt.sampled_params(train=True, at="out"):
                    (loss_fn(params, x[bad_idx], y[bad_idx]) * (bad if where == "out" else 1.0)).backward()
            step = opt.global_step
            opt.step()
            assert opt.global_step == step   # skipped
        inner_step(opt, params, x, y, idx)


def _assert_same_run(a, pa, b, pb):
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
    for fa, fb in zip(a.flat_state(), b.flat_state()):
        assert fa.keys() == fb.keys()
        for name in fa:
            assert torch.equal(fa[name], fb[name]), name
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert a.global_step == b.global_step and a.refreshes == b.refreshes


@pytest.mark.parametrize("method,where", [
    ("ivon", "in"), ("ivon_pcm", "in"), ("ivon_pcm", "out"), ("ivon_pcm", "mega"),
    ("alpha_svrg", "in"), ("alpha_svrg", "out"), ("alpha_svrg", "mega")])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_poisoned_pass_is_skipped_as_if_it_never_happened(method, where, clip):
    x, y = make_data()
    # the poisoned attempt at step 5, where IVON-PCM's and alpha-SVRG's refresh is due
    runs = []
    for poison in ((5, where), None):
        params = make_params()
        opt = MAKERS[method](params)
        opt.max_grad_norm = clip
        _loop(opt, params, 9, x, y, poison=poison,
              skip_refresh_at=5 if (poison is None and where == "mega") else None)
        runs.append((opt, params))
    (a, pa), (b, pb) = runs
    assert all(torch.isfinite(p).all() for p in pa)
    _assert_same_run(a, pa, b, pb)
    counts = a.counters
    key = "skipped_refreshes" if where == "mega" else "skipped_steps"
    assert counts[key] == 1 and counts["consecutive_skips"] == 0   # later steps were taken
    assert counts["skipped_steps" if where == "mega" else "skipped_refreshes"] == 0
    assert b.counters[key] == 0
    if where == "mega":   # the refreshes before and after the discarded one were made
        assert a.refreshes == 2


def test_inf_in_a_bf16_model_is_skipped():
    x, y = make_data(dtype=torch.bfloat16)
    runs = []
    for poison in ((3, "in"), None):
        params = make_params(dtype=torch.bfloat16)
        opt = IVON(params, **HP, seed=3)
        _loop(opt, params, 6, x, y, poison=poison, bad=float("inf"))
        runs.append((opt, params))
    (a, pa), (b, pb) = runs
    _assert_same_run(a, pa, b, pb)
    assert a.counters["skipped_steps"] == 1


def test_a_first_refresh_discarded_leaves_the_correction_off_until_a_good_one():
    x, y = make_data()
    params = make_params()
    opt = IVONPC(params, **HP, **{**PC, "start_step": 0}, seed=3)
    with opt.refreshing():
        with opt.sampled_params(train=True, at="mega"):
            (BAD * loss_fn(params, x, y)).backward()
    assert opt.refreshes == 0 and not opt.correction_active and not opt.needs_refresh
    assert all((f["g_out"] == 0).all() for f in opt.flat_state())   # never written
    _loop(opt, params, 4, x, y)   # IVON steps until the refresh at step 3
    assert opt.refreshes == 1 and opt.correction_active


def test_consecutive_skips_stop_training_with_the_step_and_the_pass():
    x, y = make_data()
    params = make_params()
    opt = IVONPC(params, **HP, **{**PC, "start_step": 0}, seed=3)
    opt.max_skipped_steps = 3
    _loop(opt, params, 2, x, y)
    before = [p.detach().clone() for p in params]
    for attempt in range(3):
        with opt.sampled_params(train=True):
            loss_fn(params, x, y).backward()
        with opt.sampled_params(train=True, at="out"):
            (BAD * loss_fn(params, x, y)).backward()
        if attempt < 2:
            opt.step()
        else:
            with pytest.raises(NonFiniteError, match=r"3 consecutive .* step 3, in the theta_out pass"):
                opt.step()
    assert opt.counters["skipped_steps"] == 3 and opt.global_step == 2
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    # a good step resets the run of skips
    opt.max_skipped_steps = 10
    _loop(opt, params, 1, x, y)
    assert opt.counters["consecutive_skips"] == 0 and opt.counters["skipped_steps"] == 3


def test_skip_counts_resume_and_old_files_load():
    x, y = make_data()
    params = make_params()
    opt = IVON(params, **HP, seed=3)
    _loop(opt, params, 4, x, y, poison=(2, "in"))
    sd = opt.state_dict()
    other = IVON(make_params(), **HP, seed=4)
    other.load_state_dict(sd)
    assert other.counters == opt.counters and other.counters["skipped_steps"] == 1
    for k in ("skipped_steps", "skipped_refreshes", "consecutive_skips"):
        del sd["hf_ivonpc"]["pc"][k]   # a file written before the skip counts existed
    other.load_state_dict(sd)
    assert other.counters["skipped_steps"] == 0 and other.global_step == 4


def test_parameters_given_as_generators_as_torch_optim_takes_them():
    model = torch.nn.Linear(3, 2)
    for make in (lambda g: IVON(g, lr=0.1, ess=10.0), lambda g: IVONPC(g, lr=0.1, ess=10.0),
                 lambda g: AlphaSVRG(g, lr=0.1)):
        for params in (model.parameters(), [{"params": model.parameters()}],
                       [{"params": (p for p in model.parameters())}]):
            opt = make(params)
            assert len(opt.param_groups[0]["params"]) == 2


WORKER = r"""
import os, sys, torch
import torch.distributed as dist
from hf_ivonpc.optim import IVONPC
from _problems import loss_fn, make_data, make_params
dist.init_process_group("gloo")
rank = dist.get_rank()
x, y = make_data()
out = {}
for poison in (True, False):
    params = make_params()
    opt = IVONPC(params, lr=0.1, ess=500.0, hess_init=0.2, clip_radius=0.05, alpha=0.7,
                 refresh_every=3, start_step=0, seed=3)
    opt.sync = True   # each rank its own micro-batches (no DDP all-reduce of the gradients)
    for t in range(5):
        part = slice(8 * (2 * t + rank), 8 * (2 * t + rank + 1))
        if opt.needs_refresh:
            with opt.refreshing():
                with opt.sampled_params(train=True, at="mega"):
                    loss_fn(params, x[rank::2], y[rank::2]).backward()
        if poison and t == 2:   # a NaN on rank 1 only: both ranks skip
            with opt.sampled_params(train=True):
                (loss_fn(params, x[part], y[part]) * (float("nan") if rank == 1 else 1.0)).backward()
            with opt.sampled_params(train=True, at="out"):
                loss_fn(params, x[part], y[part]).backward()
            opt.step()
        with opt.sampled_params(train=True):
            loss_fn(params, x[part], y[part]).backward()
        if opt.correction_active:
            with opt.sampled_params(train=True, at="out"):
                loss_fn(params, x[part], y[part]).backward()
        opt.step()
    out[poison] = {"params": [p.detach() for p in params], "flat": opt.flat_state(),
                   "pc": opt.counters}
torch.save(out, os.path.join(sys.argv[1], f"r{rank}.pt"))
dist.destroy_process_group()
"""


def test_a_nan_on_one_of_two_ranks_skips_the_step_on_both(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port=29631", str(script), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for r in (0, 1):
        run = torch.load(tmp_path / f"r{r}.pt", weights_only=True)
        poisoned, clean = run[True], run[False]
        assert poisoned["pc"]["skipped_steps"] == 1 and clean["pc"]["skipped_steps"] == 0
        assert poisoned["pc"]["step"] == 5
        for a, b in zip(poisoned["params"], clean["params"]):
            assert torch.isfinite(a).all() and torch.equal(a, b)
        for fa, fb in zip(poisoned["flat"], clean["flat"]):
            for name in fa:
                assert torch.equal(fa[name], fb[name]), (r, name)


class _Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x, labels=None):
        out = self.lin(x).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class _Rows(torch.utils.data.Dataset):
    """64 rows of a linear regression; row 5's input is NaN (its loss, and any batch's, is NaN)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.1 * torch.randn(64, generator=g)
        self.x[5] = float("nan")

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


@pytest.mark.parametrize("limit", [10, 1])
def test_pctrainer_skips_a_nan_batch_logs_it_and_stops_at_the_limit(tmp_path, limit):
    from hf_ivonpc import PCTrainer, PCTrainingArguments
    args = PCTrainingArguments(
        output_dir=str(tmp_path), pc_method="ivon_pcm", max_steps=24, per_device_train_batch_size=8,
        learning_rate=0.1, ivon_hess_init=0.1, ivon_clip_radius=float("inf"), ivon_ess=1e3,
        pc_megabatch_factor=2, pc_refresh_steps=4, pc_start_step=2, logging_steps=1,
        report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
        pc_max_skipped_steps=limit)
    trainer = PCTrainer(model=_Regression(), args=args, train_dataset=_Rows())
    if limit == 1:
        with pytest.raises(NonFiniteError, match=r"1 consecutive .*pc_max_skipped_steps"):
            trainer.train()
        assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
        return
    trainer.train()
    opt = trainer.pc_optimizer
    counts = opt.counters
    # 8 batches of 8 per epoch, 3 epochs: the batch with row 5 comes once per epoch
    assert counts["skipped_steps"] == 3 and opt.global_step == 24 - 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(torch.isfinite(f[n]).all() for f in opt.flat_state() for n in f)
    logged = [e["pc/skipped_steps"] for e in trainer.state.log_history if "pc/skipped_steps" in e]
    assert logged[-1] == 3 and logged[0] <= logged[-1]
    assert any("pc/skipped_refreshes" in e for e in trainer.state.log_history)
