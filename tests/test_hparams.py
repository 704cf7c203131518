"""One source of truth for the hyperparameters: the optimizers, PCTrainingArguments, PCTrainer's
optimizer and the model card all agree with ``hf_ivonpc.optim.hparams``."""

import inspect
import math

import pytest

from hf_ivonpc import PCTrainer, PCTrainingArguments
from hf_ivonpc.model_card import render_model_card
from hf_ivonpc.optim import IVON, IVONPC, AlphaSVRG
from hf_ivonpc.optim import reference as ref
from hf_ivonpc.optim.hparams import BY_FIELD, BY_KWARG, HPARAMS, RESOLVED_FIELDS

from _tiny_lm import CharWindows, tiny_gpt2


def _signature_defaults(cls) -> dict:
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def test_arguments_take_default_and_help_from_the_table():
    fields = PCTrainingArguments.__dataclass_fields__
    for name, h in BY_FIELD.items():
        assert _same(fields[name].default, None if name in RESOLVED_FIELDS else h.default), name
        if name != "weight_decay":   # Trainer's own field (its default is checked equal above)
            # (percent signs doubled for argparse's %-formatting of help texts)
            assert h.help in fields[name].metadata["help"].replace("%%", "%"), name


@pytest.mark.parametrize("cls", [IVONPC, ref.IVONPC])
def test_ivon_pcm_defaults_are_the_projects(cls):
    d = _signature_defaults(cls)
    for kwarg, h in BY_KWARG.items():
        if kwarg in d:
            assert _same(d[kwarg], h.default), (cls, kwarg, d[kwarg], h.default)
    assert {"alpha", "rho1", "rho2", "mean_term_weight", "hess_init", "clip_radius", "rescale_lr",
            "weight_decay", "refresh_every", "start_step", "shared_noise"} <= set(d)


@pytest.mark.parametrize("cls", [IVON, ref.IVON])
def test_ivon_keeps_ivon_opt_defaults_only_where_the_table_says(cls):
    d = _signature_defaults(cls)
    for kwarg, h in BY_KWARG.items():
        if kwarg in d:
            want = h.ivon_opt if h.ivon_opt is not None else h.default
            assert _same(d[kwarg], want), (cls, kwarg, d[kwarg], want)
    # ivon-opt 0.1.3's signature, which IVON must keep
    assert (d["hess_init"], d["weight_decay"], d["clip_radius"], d["rescale_lr"]) == (1.0, 1e-4, math.inf, True)


def _trainer(tmp_path, method, **over):
    args = PCTrainingArguments(output_dir=str(tmp_path), pc_method=method, max_steps=20,
                               report_to=[], use_cpu=True, save_strategy="no", **over)
    trainer = PCTrainer(model=tiny_gpt2(), args=args, train_dataset=CharWindows())
    trainer.create_optimizer_and_scheduler(num_training_steps=20)
    return trainer


@pytest.mark.parametrize("method", ["ivon", "ivon_pcm", "alpha_svrg"])
def test_trainer_builds_the_optimizer_with_the_tables_defaults(tmp_path, method):
    opt = _trainer(tmp_path, method).pc_optimizer
    group = opt.param_groups[0]
    for h in HPARAMS:
        if not h.kwarg or method not in h.methods or h.kwarg in ("ess", "weight_decay", "beta2"):
            continue
        if h.kwarg in group:
            assert _same(group[h.kwarg], h.default), (h.kwarg, group[h.kwarg])
        else:   # an attribute of the optimizer
            assert _same(getattr(opt, h.kwarg), h.default), (h.kwarg, getattr(opt, h.kwarg))
    if method != "alpha_svrg":
        assert opt.rescale_lr is False
        # unset beta2: h moves 63% of the way from h0 within the run's 20 steps
        assert group["beta2"] == pytest.approx(1 - 1 / 20) and 1 - group["beta2"] ** 20 == pytest.approx(0.64, abs=0.01)


def test_trainer_passes_every_field_to_the_optimizer(tmp_path):
    over = dict(ivon_hess_init=0.02, ivon_beta1=0.8, ivon_beta2=0.999, ivon_clip_radius=0.5,
                pc_alpha=0.7, pc_rho1=0.3, pc_rho2=0.2, pc_mean_term_weight=0.5, pc_refresh_steps=3,
                pc_start_step=2, pc_shared_noise=False, ivon_ess=123.0, weight_decay=0.01,
                pc_state_dtype="bfloat16")
    opt = _trainer(tmp_path, "ivon_pcm", **over).pc_optimizer
    got = {**opt.param_groups[0], "refresh_every": opt.refresh_every, "start_step": opt.start_step,
           "shared_noise": opt.shared_noise, "state_dtype": opt.state_dtype}
    for field, value in over.items():
        assert got[BY_FIELD[field].kwarg] == value, field


def test_start_ratio_scales_with_the_run(tmp_path):
    opt = _trainer(tmp_path, "ivon_pcm", pc_start_ratio=0.25).pc_optimizer
    assert opt.start_step == 5   # 25% of 20 steps
    both = _trainer(tmp_path, "ivon_pcm", pc_start_ratio=0.25, pc_start_step=3).pc_optimizer
    assert both.start_step == 3   # a step count (given on the command line, say) wins


def test_model_card_lists_every_hyperparameter_of_the_method(tmp_path):
    trainer = _trainer(tmp_path, "ivon_pcm", pc_alpha=0.375)
    card = render_model_card(trainer, None)
    for h in HPARAMS:
        if h.field and "ivon_pcm" in h.methods and h.field != "pc_log_diagnostics":
            assert f"| {h.field} |" in card, h.field
    assert "| pc_alpha | 0.375 |" in card


def test_alpha_svrg_refuses_a_base_it_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="optim='adafactor' is invalid"):
        PCTrainingArguments(output_dir=str(tmp_path), pc_method="alpha_svrg", optim="adafactor")
    sgd = _trainer(tmp_path, "alpha_svrg", optim="sgd").pc_optimizer
    assert isinstance(sgd, AlphaSVRG) and sgd.base == "sgd"


def test_ivon_warns_about_ignored_adam_settings(tmp_path):
    with pytest.warns(UserWarning, match="adam_beta2 set but ignored"):
        PCTrainingArguments(output_dir=str(tmp_path), pc_method="ivon", adam_beta2=0.95)


@pytest.mark.parametrize("field,value", [("learning_rate", float("nan")), ("learning_rate", -1.0),
                                         ("learning_rate", 300.0), ("ivon_ess", math.inf),
                                         ("pc_start_ratio", 1.0), ("pc_log_diagnostics", "yes")])
def test_bad_values_are_refused_when_the_arguments_are_built(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"{field}=.* is invalid: accepted range is"):
        PCTrainingArguments(output_dir=str(tmp_path), pc_method="ivon_pcm", **{field: value})


def test_a_reporting_integration_that_is_not_installed_is_named_at_once(tmp_path):
    from transformers.integrations import get_available_reporting_integrations
    missing = next(n for n in ("tensorboard", "wandb", "mlflow", "comet_ml")
                   if n not in get_available_reporting_integrations())
    with pytest.raises(ValueError, match=f"report_to='{missing}' is invalid: .*pip install {missing}"):
        PCTrainingArguments(output_dir=str(tmp_path), report_to=missing)
