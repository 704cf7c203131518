"""The package installs like a library: the wheel holds the configs (bases and accelerate files
included) and the model-card template, declares the ``hf-ivonpc`` command, and, installed outside
the repository, finds its configs from any folder."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hf_ivonpc.__main__ import COMMANDS, main
from hf_ivonpc.tasks.cli import CONFIGS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # from a copy of the sources: a build/ folder left in the checkout would leak stale files in
    src = out / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "results",
                                                             "docs", "tests", "__pycache__", ".ci"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [whl] = out.glob("hf_ivonpc-*.whl")
    return whl


def test_wheel_holds_configs_card_template_and_command(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"hf_ivonpc/{p.relative_to(CONFIGS.parent).as_posix()}" for p in CONFIGS.rglob("*.yaml")}
    assert len(shipped) >= 35 and shipped <= names, sorted(shipped - names)
    assert "hf_ivonpc/model_cards/posterior_model_card.md" in names
    [entry] = [n for n in names if n.endswith("entry_points.txt")]
    assert "hf-ivonpc = hf_ivonpc.__main__:main" in zipfile.ZipFile(wheel).read(entry).decode()
    assert not any(n.startswith(("tests/", "scripts/", "docs/", "research/", "train_configs/")) for n in names)


def test_installed_package_finds_its_configs_from_any_folder(wheel, tmp_path):
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}   # the installed copy before the repository's
    code = ("import hf_ivonpc, sys; from hf_ivonpc.tasks.cli import parse_args, CONFIGS; "
            "from hf_ivonpc.tasks.pretrain import PretrainArguments; from hf_ivonpc import PCTrainingArguments; "
            "a, t = parse_args((PretrainArguments, PCTrainingArguments), None, "
            "['--config', 'pretrain_gpt2-125m_owt_ivon_pcm', '--output_dir', 'o', '--bf16', 'false']); "
            "print(hf_ivonpc.__file__, CONFIGS, a.n_layer, t.pc_start_ratio, sep='\\n')")
    done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    module, configs, n_layer, ratio = done.stdout.split()
    assert module.startswith(str(site)) and configs.startswith(str(site))
    assert (n_layer, ratio) == ("12", "0.5")   # the base's model and the method file's correction


def test_command_lists_commands_and_configs(capsys):
    assert main([]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in COMMANDS)
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "pretrain_gpt2-125m_owt_ivon_pcm" in out and "accelerate/fsdp2.yaml" in out
    assert main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err
