"""Every config in train_configs/ parses against its script, and config mistakes fail clearly."""

from pathlib import Path

import pytest

from hf_ivonpc import PCTrainingArguments
from hf_ivonpc.tasks.cli import CONFIGS, ConfigError, parse_args

from _scripts import load_script

# config-name prefix -> (script, its arguments dataclass)
SCRIPTS = {"pretrain": ("pretrain", "PretrainArguments"),
           "continual": ("continual_pretrain", "ContinualArguments"),
           "xsum": ("finetune_xsum", None), "gsm8k": ("finetune_gsm8k", None),
           "vit": ("finetune_vit", None)}


def _script_args(prefix):
    script, cls = SCRIPTS[prefix]
    mod = load_script(script)
    if cls is None:   # the one dataclass of the script besides PCTrainingArguments
        import dataclasses
        found = [v for v in vars(mod).values() if dataclasses.is_dataclass(v) and isinstance(v, type)
                 and v.__module__ == mod.__name__]
        assert len(found) == 1, f"{script}: expected one arguments dataclass, found {found}"
        return found[0]
    return getattr(mod, cls)


CONFIG_FILES = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def test_every_config_belongs_to_a_script():
    assert CONFIG_FILES
    for name in CONFIG_FILES:
        assert name.split("_")[0] in SCRIPTS, name


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_parses(name, tmp_path):
    prefix = name.split("_")[0]
    if not (Path(__file__).resolve().parents[1] / "scripts" / f"{SCRIPTS[prefix][0]}.py").exists():
        pytest.skip(f"scripts/{SCRIPTS[prefix][0]}.py is not there")
    cls = _script_args(prefix)
    script_args, targs = parse_args((cls, PCTrainingArguments), None,
                                    ["--config", name, "--output_dir", str(tmp_path), "--bf16", "false"])
    assert targs.output_dir == str(tmp_path)   # the command line overrides the file
    if "offline" in name:
        assert not targs.bf16 and targs.report_to in ([], ["none"], "none")


def test_unknown_key_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_stepz: 3\n")
    with pytest.raises(ConfigError, match="'max_stepz' is not an argument.*max_steps"):
        parse_args((PCTrainingArguments,), bad, [])
    with pytest.raises(ConfigError, match="--config nothing.yaml: no such file"):
        parse_args((PCTrainingArguments,), None, ["--config", "nothing.yaml"])
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        parse_args((PCTrainingArguments,), bad, [])
