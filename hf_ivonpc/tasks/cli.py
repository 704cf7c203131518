"""What every workload shares: arguments from a YAML config plus command-line overrides, model
loading that fails clearly offline, and the end of a run (metrics JSON, curves PNG, push).

A workload declares its own arguments as a dataclass and calls::

    script_args, training_args = parse_args((MyArgs, PCTrainingArguments), default_config=...)

``--config NAME`` picks a config (a path, or a name in the package's ``configs`` folder; the
workload's offline default when absent). A config may start from another with ``base: NAME`` (a
name in ``configs``, or a path relative to the file) and then sets only what differs: the base's
keys are read first, the file's own replace them, and chains of bases are followed. Every key of
the result must be a field of one of the dataclasses, and any ``--field value`` on the command line
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

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: how command-line errors name the program (``hf-ivonpc COMMAND`` when run through it)
PROG: str | None = None
#: the key naming the config a file starts from
BASE_KEY = "base"


class ConfigError(ValueError):
    """A config file that does not exist, does not parse, or names an unknown argument."""


def config_path(name: str | Path, relative_to: Path | None = None) -> Path:
    """``name`` as given if it exists (relative to the folder ``relative_to`` when given), else
    ``configs/name`` (``.yaml`` optional)."""
    p = Path(name)
    near = [relative_to / p, relative_to / f"{p}.yaml"] if relative_to is not None else [p]
    for cand in (*near, CONFIGS / p, CONFIGS / f"{p}.yaml"):
        if cand.is_file():
            return cand
    where = relative_to if relative_to is not None else "the current folder"
    raise ConfigError(f"--config {name}: no such file (looked in {where} and {CONFIGS})")


def read_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The YAML mapping in ``path`` with its chain of ``base:`` configs merged in (the file's own
    keys win), without the ``base`` key."""
    path = config_path(path) if not _seen else path
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise ConfigError(f"{path}: its bases form a cycle ({chain})")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a mapping of argument names to values")
    base = cfg.pop(BASE_KEY, None)
    if base is None:
        return cfg
    if not isinstance(base, str):
        raise ConfigError(f"{path}: {BASE_KEY}: {base!r} is invalid: accepted is the name or path of a config")
    try:
        base_path = config_path(base, relative_to=path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {BASE_KEY}: {base}: no such config (looked beside it and in {CONFIGS})") from e
    return {**read_config(base_path, (*_seen, path.resolve())), **cfg}


def load_config(path: str | Path, dataclass_types) -> dict:
    """The config ``path`` (bases merged in), every key checked against the dataclasses' fields."""
    path = config_path(path)
    cfg = read_config(path)
    known = {f.name for t in dataclass_types for f in dataclasses.fields(t) if f.init}
    for key in cfg:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ConfigError(f"{path}: config key {key!r} is not an argument of this script{hint}")
    return cfg


def parse_args(dataclass_types, default_config: str | Path | None = None, argv: list[str] | None = None,
               cli: bool = False):
    """Parse ``--config FILE`` and overrides into instances of ``dataclass_types`` (in order).

    With ``cli=True`` a missing or bad config, or a value that an argument's checks refuse, ends
    the process as argparse ends it for a malformed flag: one line ``PROG: error: ...`` on
    stderr and exit status 2 (before any data or model is loaded); otherwise the error is raised."""
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(dataclass_types, **({"prog": PROG} if PROG else {}))
    if cli:
        try:
            return _parse(parser, dataclass_types, known.config or default_config, default_config, rest)
        except ValueError as e:   # a ConfigError too
            parser.exit(2, f"{parser.prog}: error: {' '.join(str(e).split())}\n")
    return _parse(parser, dataclass_types, known.config or default_config, default_config, rest)


def _parse(parser, dataclass_types, cfg_file, default_config, rest):
    parser.add_argument("--config", default=None,
                        help=f"YAML config (a path, or a name in {CONFIGS}); default: {default_config}")
    if cfg_file is not None:
        parser.set_defaults(**load_config(cfg_file, dataclass_types))
    out = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=False,
                                             look_for_args_file=False)
    # --config is not a dataclass field: the parser hands it back in a trailing Namespace
    return tuple(o for o in out if not isinstance(o, argparse.Namespace))


def run_workload(arguments, default_config: str, build_trainer, argv: list[str] | None = None,
                 training_arguments=None) -> dict:
    """A workload from end to end: its arguments and its trainer's arguments (``training_arguments``,
    by default ``PCTrainingArguments``; ``PCSFTConfig`` for the TRL workloads) from ``--config``
    (``default_config`` when absent) and the command line, ``build_trainer(args, training_args)``
    -> (trainer, how to report), then :func:`train_and_report`."""
    if training_arguments is None:
        from ..args import PCTrainingArguments as training_arguments

    args, training_args = parse_args((arguments, training_arguments), default_config, argv, cli=True)
    trainer, report = build_trainer(args, training_args)
    return train_and_report(trainer, workload_args=dataclasses.asdict(args), **report)


def train_and_report(trainer, *, dataset: str, plot_keys: tuple[str, ...], tags: tuple[str, ...] = (),
                     metrics: dict | None = None, evaluate=None, before: str | None = None,
                     workload_args: dict | None = None) -> dict:
    """The end of every script: optionally evaluate first (``before`` is the metric prefix, e.g.
    "base"), train (resuming from ``resume_from_checkpoint``), evaluate ("eval"), save the model,
    :func:`finish`, and push when ``push_to_hub`` is set. ``evaluate(prefix)`` defaults to
    ``trainer.evaluate(metric_key_prefix=prefix)``; ``metrics`` are extra figures to report;
    ``workload_args`` (the workload's own arguments) are saved as ``workload_args.json``, from
    which ``hf-ivonpc posterior evaluate`` rebuilds the task."""
    evaluate = evaluate or (lambda prefix: trainer.evaluate(metric_key_prefix=prefix))
    metrics = dict(metrics or {})
    if before:
        metrics.update(evaluate(before))
    result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    metrics.update(result.metrics)
    metrics.update(evaluate("eval"))
    trainer.save_model()
    if workload_args is not None and trainer.is_world_process_zero():
        out = Path(trainer.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "workload_args.json").write_text(json.dumps(workload_args, indent=1))
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
                         title=f"{out.name}: {trainer.args.pc_method}")
    return metrics


def list_configs() -> dict[str, str]:
    """Every runnable config shipped with the package: name -> its first comment line."""
    out = {}
    for p in sorted(CONFIGS.glob("*.yaml")):
        first = next((ln.lstrip("# ").strip() for ln in p.read_text().splitlines() if ln.startswith("#")), "")
        out[p.stem] = first
    return out


def main(argv=None) -> int:
    """``hf-ivonpc configs``: the shipped configs, one per line."""
    if argv:
        print(f"hf-ivonpc configs takes no arguments (got {' '.join(argv)}); the files are in {CONFIGS}")
        return 2
    rows = list_configs()
    width = max(map(len, rows))
    print("\n".join(f"{name:<{width}}  {what}" for name, what in rows.items()))
    print(f"\n({CONFIGS}; use one with --config NAME)")
    print("accelerate configs (accelerate launch --config_file FILE ...):")
    print("\n".join(f"  {p}" for p in sorted((CONFIGS / "accelerate").glob("*.yaml"))))
    return 0
