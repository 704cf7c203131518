"""What every script shares: arguments from a YAML config plus command-line overrides, model
loading that fails clearly offline, and the end of a run (metrics JSON, curves PNG, push).

A script declares its own arguments as a dataclass and calls::

    script_args, training_args = parse_args((MyArgs, PCTrainingArguments), default_config=...)

``--config FILE.yaml`` picks a config (the script's offline default when absent); every key of the
file must be a field of one of the dataclasses, and any ``--field value`` on the command line
overrides the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "train_configs"


class ConfigError(ValueError):
    """A config file that does not exist, does not parse, or names an unknown argument."""


def config_path(name: str | Path) -> Path:
    """``name`` as given if it exists, else ``train_configs/name`` (``.yaml`` optional)."""
    p = Path(name)
    for cand in (p, CONFIGS / p, CONFIGS / f"{p}.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"--config {name}: no such file (looked in the current folder and {CONFIGS})")


def load_config(path: str | Path, dataclass_types) -> dict:
    """The YAML mapping in ``path``, every key checked against the dataclasses' fields."""
    path = config_path(path)
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a mapping of argument names to values")
    known = {f.name for t in dataclass_types for f in dataclasses.fields(t) if f.init}
    for key in cfg:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ConfigError(f"{path}: config key {key!r} is not an argument of this script{hint}")
    return cfg


def parse_args(dataclass_types, default_config: str | Path | None = None, argv: list[str] | None = None):
    """Parse ``--config FILE`` and overrides into instances of ``dataclass_types`` (in order)."""
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(dataclass_types)
    parser.add_argument("--config", default=None,
                        help=f"YAML config (a path, or a name in {CONFIGS}); default: {default_config}")
    cfg_file = known.config or default_config
    if cfg_file is not None:
        parser.set_defaults(**load_config(cfg_file, dataclass_types))
    out = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=False,
                                             look_for_args_file=False)
    # --config is not a dataclass field: the parser hands it back in a trailing Namespace
    return tuple(o for o in out if not isinstance(o, argparse.Namespace))


def load_pretrained(loader, name_or_path: str, what: str = "model", **kwargs):
    """``loader.from_pretrained(name_or_path, **kwargs)``, turning the offline failure into an error
    that says how to provide the model locally."""
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        local = Path(name_or_path).exists()
        why = "its files could not be read" if local else "it is not a local folder and the Hub is unreachable or it is not cached"
        raise OSError(
            f"could not load the {what} {name_or_path!r}: {why} ({type(e).__name__}: {str(e)[:300]}). "
            "Provide it locally: on a machine with Hub access run "
            f"`huggingface-cli download {name_or_path} --local-dir DIR` (or `save_pretrained(DIR)`), "
            "copy DIR here and pass its path") from e


def train_and_report(trainer, *, dataset: str, plot_keys: tuple[str, ...], tags: tuple[str, ...] = (),
                     metrics: dict | None = None, evaluate=None, before: str | None = None) -> dict:
    """The end of every script: optionally evaluate first (``before`` is the metric prefix, e.g.
    "base"), train (resuming from ``resume_from_checkpoint``), evaluate ("eval"), save the model,
    :func:`finish`, and push when ``push_to_hub`` is set. ``evaluate(prefix)`` defaults to
    ``trainer.evaluate(metric_key_prefix=prefix)``; ``metrics`` are extra figures to report."""
    evaluate = evaluate or (lambda prefix: trainer.evaluate(metric_key_prefix=prefix))
    metrics = dict(metrics or {})
    if before:
        metrics.update(evaluate(before))
    result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    metrics.update(result.metrics)
    metrics.update(evaluate("eval"))
    trainer.save_model()
    finish(trainer, metrics, plot_keys=plot_keys)
    if trainer.args.push_to_hub:
        trainer.push_to_hub(dataset=dataset, tags=["hf_ivonpc", trainer.args.pc_method, *tags])
    return metrics


def finish(trainer, metrics: dict, plot_keys: tuple[str, ...] = ("loss", "eval_loss")) -> dict:
    """Save the final metrics (``all_results.json``), the model card (``README.md``), the trainer
    state and the training curves (``training_curves.png`` beside ``log_history.json``) in
    ``output_dir``, on the main process."""
    from ..plotting import plot_log_history

    trainer.save_metrics("all", metrics)  # all_results.json
    trainer.create_model_card()           # README.md: method, hyperparameters, metrics, posterior
    if trainer.is_world_process_zero():
        trainer.save_state()
        out = Path(trainer.args.output_dir)
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        plot_log_history(trainer.state.log_history, out / "training_curves.png", keys=plot_keys,
                         title=f"{Path(sys.argv[0]).stem}: {trainer.args.pc_method}")
    return metrics
