"""Bad parameters and calls raise a ValueError naming what is wrong, changing nothing.

(Each optimizer's bad constructor arguments, named with their value and accepted range, are
checked in test_optim_contract.py.)"""

import pytest
import torch

from hf_ivonpc.optim import IVON, IVONPC, AlphaSVRG, MegaBatchSampler

from _problems import make_params

IVON_KW = dict(lr=0.1, ess=100.0)


def test_mixed_dtypes_and_devices_and_empty():
    a = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="params have mixed dtypes"):
        IVON([a, torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))], **IVON_KW)
    with pytest.raises(ValueError, match="params are on mixed devices"):
        IVON([a, torch.nn.Parameter(torch.zeros(3, device="meta"))], **IVON_KW)
    with pytest.raises(ValueError, match="params is empty"):
        IVONPC([], **IVON_KW)
    with pytest.raises(ValueError, match="same tensor twice"):
        AlphaSVRG([a, a], lr=0.1)


@pytest.mark.parametrize("make", [lambda p: IVON(p, **IVON_KW), lambda p: IVONPC(p, **IVON_KW),
                                  lambda p: AlphaSVRG(p, lr=0.1, base="adamw")])
def test_step_without_gradients_changes_nothing(make):
    p = make_params()
    opt = make(p)
    before = [q.detach().clone() for q in p]
    state = {k: v.clone() for k, v in opt.flat_state(transient=True)[0].items()}
    with pytest.raises(ValueError, match="no collected gradients"):
        opt.step()
    assert opt.global_step == 0
    for a, b in zip(p, before):
        assert torch.equal(a, b)
    for k, v in opt.flat_state(transient=True)[0].items():
        assert torch.equal(v, state[k]), k


def test_megabatch_sampler_arguments_and_resume():
    with pytest.raises(ValueError, match="megabatch_factor=0 is invalid"):
        MegaBatchSampler(100, 8, 0)
    with pytest.raises(ValueError, match=r"megabatch_factor=20 is invalid: accepted range is an integer in \[1, 12\]"):
        MegaBatchSampler(100, 8, 20)
    a = MegaBatchSampler(100, 8, 5, seed=3)
    a.sample()
    b = MegaBatchSampler(100, 8, 5, seed=9)
    b.load_state_dict(a.state_dict())
    for x, y in zip(a.sample(), b.sample()):
        assert torch.equal(x, y)
    mb = a.sample()
    flat = torch.cat(mb)
    assert len(mb) == 5 and flat.unique().numel() == 40   # without replacement


#: a bad value for every PCTrainingArguments field of the IVON methods (a field added without one
#: fails ``test_every_field_has_a_bad_value``): wrong type, NaN, inf, negative, out of range
FIELD_BAD = [
    ("pc_method", "ivon-pcm"), ("learning_rate", float("nan")), ("learning_rate", -1.0),
    ("ivon_ess", float("inf")), ("ivon_ess", 0.0), ("ivon_hess_init", -1e-3),
    ("ivon_beta1", 1.0), ("ivon_beta2", float("nan")), ("ivon_clip_radius", 0.0),
    ("weight_decay", -1e-4), ("pc_alpha", -1.0), ("pc_alpha", float("inf")), ("pc_rho1", 1.5),
    ("pc_rho2", -0.1), ("pc_mean_term_weight", -1.0), ("pc_refresh_steps", 0),
    ("pc_refresh_steps", 2.5), ("pc_start_step", -1), ("pc_shared_noise", "yes"),
    ("pc_state_dtype", "fp16"), ("pc_start_ratio", 1.0), ("pc_megabatch_factor", 0),
    ("pc_log_diagnostics", 1), ("pc_max_skipped_steps", 0), ("pc_max_skipped_steps", "10"),
    ("eval_mc_samples", -1),
]


def test_every_field_has_a_bad_value():
    from hf_ivonpc.optim.hparams import BY_FIELD
    assert set(BY_FIELD) | {"pc_method", "learning_rate"} <= {f for f, _ in FIELD_BAD}


@pytest.mark.parametrize("field,value", FIELD_BAD, ids=[f"{f}={v!r}" for f, v in FIELD_BAD])
def test_a_bad_field_is_refused_naming_it_and_what_is_accepted(tmp_path, field, value):
    from hf_ivonpc import PCTrainingArguments
    with pytest.raises(ValueError, match=rf"^{field}=.* is invalid: accepted (range )?is"):
        PCTrainingArguments(output_dir=str(tmp_path), **{"pc_method": "ivon_pcm", field: value})


@pytest.mark.parametrize("argv,expected", [
    (["--pc_alpha", "-1"], "pc_alpha=-1.0 is invalid: accepted range is a finite number >= 0"),
    (["--pc_method", "adam"], "pc_method='adam' is invalid"),
    (["--config", "no_such_config"], "--config no_such_config: no such file"),
])
def test_the_command_line_reports_a_bad_value_in_one_line_before_any_work(
        tmp_path, monkeypatch, capsys, argv, expected):
    from hf_ivonpc import __main__ as cli_main
    from hf_ivonpc.tasks import pretrain

    def no_work(*args, **kwargs):
        raise AssertionError("data or a model was loaded before the arguments were checked")
    monkeypatch.setattr(pretrain, "build_trainer", no_work)
    monkeypatch.setattr("hf_ivonpc.tasks.cli.PROG", None)
    with pytest.raises(SystemExit) as done:
        cli_main.main(["pretrain", "--output_dir", str(tmp_path), *argv])
    assert done.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("hf-ivonpc pretrain: error: ") and expected in lines[-1], err
    assert "Traceback" not in err


def test_the_command_line_help_lists_every_field(capsys, monkeypatch):
    """argparse %-formats help texts: a bare percent sign in a field's help breaks --help."""
    from hf_ivonpc import __main__ as cli_main
    from hf_ivonpc.optim.hparams import BY_FIELD
    monkeypatch.setattr("hf_ivonpc.tasks.cli.PROG", None)
    with pytest.raises(SystemExit) as done:
        cli_main.main(["pretrain", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert all(f"--{name}" in out for name in BY_FIELD) and "63% of the way" in out
