"""Import a file of scripts/ (or benchmarks/) as a module (they are not packages)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def load_script(name: str, folder: Path = SCRIPTS):
    spec = importlib.util.spec_from_file_location(f"script_{name}", folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod
