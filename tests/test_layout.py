"""The package's layering holds: no import cycle among its modules, no module of a lower layer
importing a higher one, no ``sys.path`` edits anywhere, and no private optimizer attribute used
outside ``hf_ivonpc/optim`` (tests of the optimizer's internals excepted)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_ivonpc"
#: lower layers first; a module may import its own layer and the ones before it
LAYERS = (("hf_ivonpc.optim",), ("hf_ivonpc.metrics", "hf_ivonpc.plotting", "hf_ivonpc.uncertainty", "hf_ivonpc.trunk"),
          ("hf_ivonpc.posterior", "hf_ivonpc.convert", "hf_ivonpc.model_card", "hf_ivonpc.args",
           "hf_ivonpc.trainer", "hf_ivonpc.trl", "hf_ivonpc"),
          ("hf_ivonpc.data",), ("hf_ivonpc.tasks", "hf_ivonpc.__main__"))


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[tuple[str, tuple[str, ...]]]:
    """(module, names) of every hf_ivonpc import in ``path``, at any depth (lazy imports included)."""
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {(a.name, ()) for a in node.names if a.name.startswith("hf_ivonpc")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("hf_ivonpc"):
                out.add((base, tuple(a.name for a in node.names)))
    return out


def _graph() -> dict[str, set[str]]:
    """module -> the modules it imports: ``from pkg import mod`` is an edge to ``pkg.mod``, not to
    ``pkg`` (whose ``__init__`` has already run when a submodule is imported)."""
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for m, p in files.items():
        deps = set()
        for item in _imports(p):
            base, names = item if isinstance(item, tuple) else (item, ())
            subs = {f"{base}.{n}" for n in names if f"{base}.{n}" in files}
            deps |= subs or {base}
        graph[m] = {d for d in deps if d in files and d != m}
    return graph


def _layer(module: str) -> int:
    best = max((prefix for layer in LAYERS for prefix in layer
                if module == prefix or module.startswith(prefix + ".")), key=len)
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_module_imports_a_higher_layer():
    graph = _graph()
    # the package's __init__ names the trainer lazily; "hf_ivonpc" itself is one module of layer 2
    upward = [(m, n) for m, deps in graph.items() for n in deps
              if n != "hf_ivonpc" and _layer(n) > _layer(m)]
    assert not upward, upward


def test_no_sys_path_edits():
    offenders = [str(p.relative_to(ROOT)) for folder in ("hf_ivonpc", "scripts", "benchmarks", "tests")
                 for p in (ROOT / folder).rglob("*.py")
                 if p.name != Path(__file__).name and re.search(r"sys\.path\.(insert|append)", p.read_text())]
    assert not offenders, offenders


PRIVATE = re.compile(r"\b(?:opt|optimizer|pc_optimizer|ivon)\.(_(?:flat|pc|views|shard_group|device|ivon))\b")
#: tests of the optimizer's internals, allowed to look inside
INTERNALS = {"test_ivon.py", "fsdp_worker.py"}


def test_no_private_optimizer_attribute_outside_optim():
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0)}"
                 for folder in ("hf_ivonpc", "scripts", "benchmarks", "tests")
                 for p in (ROOT / folder).rglob("*.py")
                 if "optim" not in p.relative_to(ROOT).parts[:2] and p.name not in INTERNALS
                 for m in PRIVATE.finditer(p.read_text())]
    assert not offenders, offenders


def test_the_package_never_imports_the_research_code():
    """The campaigns' code (scripts/research) is not in the wheel: the package must not need it."""
    offenders = []
    for p in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{p.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "research"]
    assert not offenders, offenders


def test_train_configs_at_the_top_leads_to_the_package_configs():
    """The configs live in the package (the wheel carries them); train_configs/ leads there."""
    link = ROOT / "train_configs"
    assert link.is_symlink() and link.resolve() == (PACKAGE / "configs").resolve()
    assert (link / "pretrain_offline.yaml").is_file()
