"""The module structure: no import cycles among cqil/ modules (imports inside functions count too), no module
imports a job module (shared logic lives in library modules: planning, metrics, distill, costs, plots, paths, ...),
and `cqil plot` draws CSVs without importing torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from cqil.cli import JOBS

PACKAGE = Path(__file__).resolve().parent.parent / "cqil"
# Modules that exist to run one job: every module cqil.cli starts a job in (`cqil <job>` runs its function).
JOB_MODULES = {target.split(":")[0].removeprefix("cqil.") for target, _ in JOBS.values()}


def imports(path: Path, modules: set[str]) -> set[str]:
    """cqil modules that `path` imports anywhere in its body (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level == 1:  # from .x import ..., from . import x
                names = [parts[0]] if node.module else [a.name for a in node.names]
            elif parts[0] == "cqil":  # from cqil.x import ..., from cqil import x
                names = parts[1:2] if len(parts) > 1 else [a.name for a in node.names]
            else:
                continue
            found |= {n for n in names if n in modules}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith("cqil.") and a.name.split(".")[1] in modules}
    return found


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = {p.stem for p in package.glob("*.py")} - {"__init__", "__main__"}
    return {m: imports(package / f"{m}.py", modules) - {m} for m in modules}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(g[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if not state.get(v) and (cycle := visit(v)):
                return cycle
        stack.pop()
        state[u] = 2
        return None

    for m in sorted(g):
        if not state.get(m) and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycles():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def job_imports(g: dict[str, set[str]], jobs: set[str]) -> dict[str, list[str]]:
    """module -> the job modules it imports, for every module that imports one."""
    return {m: sorted(deps & jobs) for m, deps in g.items() if deps & jobs}


def test_no_module_imports_a_job_module():
    """Job to job included: what two jobs share lives in a library module."""
    g = graph()
    assert JOB_MODULES <= set(g), f"cqil.cli starts jobs in modules that do not exist: {JOB_MODULES - set(g)}"
    assert not job_imports(g, JOB_MODULES), f"job modules imported by other modules: {job_imports(g, JOB_MODULES)}"


def test_the_job_check_sees_a_job_importing_a_job(tmp_path):
    (tmp_path / "a.py").write_text("def run(cfg):\n    from .b import helper\n")
    (tmp_path / "b.py").write_text("from cqil import c\n")
    (tmp_path / "c.py").write_text("x = 1\n")
    assert job_imports(graph(tmp_path), {"a", "b"}) == {"a": ["b"]}


def test_cqil_plot_imports_no_torch():
    """`cqil plot` draws CSVs: the CLI, the checks and the plot job with its figures load without torch."""
    module = JOBS["plot"][0].split(":")[0]
    code = (f"import importlib, sys; import cqil.cli, cqil.checks; importlib.import_module({module!r}); "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, f"{module} (or the CLI) imports torch"


@pytest.mark.parametrize("source, cycle", [
    ({"a": "from .b import x", "b": "def f():\n    from .a import y"}, ["a", "b", "a"]),  # a lazy import counts
    ({"a": "from cqil import b", "b": "import cqil.c", "c": "from cqil.a import z"}, ["a", "b", "c", "a"]),
    ({"a": "from .b import x", "b": "import os"}, None),
])
def test_the_cycle_check_sees_lazy_and_absolute_imports(tmp_path, source, cycle):
    for name, text in source.items():
        (tmp_path / f"{name}.py").write_text(text + "\n")
    assert find_cycle(graph(tmp_path)) == cycle


def trusting_calls(path: Path) -> list[int]:
    """Lines of `path` that pass trust_remote_code=True (a keyword or a dict entry) to anything."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        pairs = [(k.arg, k.value) for k in node.keywords] if isinstance(node, ast.Call) else \
            [(k.value if isinstance(k, ast.Constant) else None, v) for k, v in zip(node.keys, node.values)] \
            if isinstance(node, ast.Dict) else []
        lines += [v.lineno for k, v in pairs if k == "trust_remote_code" and isinstance(v, ast.Constant) and v.value is True]
    return lines


def test_no_code_runs_from_a_model_unless_the_user_asks():
    """No call in cqil/ or scripts/ trusts a model's code by itself: trust_remote_code is model.trust_remote_code,
    the user's choice (cqil.models), never a literal True."""
    files = [*PACKAGE.glob("*.py"), *(PACKAGE.parent / "scripts").glob("*.py")]
    found = {f.name: lines for f in files if (lines := trusting_calls(f))}
    assert not found, f"trust_remote_code=True in {found}"


def test_the_trust_check_sees_keywords_and_dicts(tmp_path):
    (tmp_path / "a.py").write_text("f(x, trust_remote_code=True)\nd = {'trust_remote_code': True}\n"
                                   "g(trust_remote_code=cfg.trust)\n# trust_remote_code=True in a comment\n")
    assert trusting_calls(tmp_path / "a.py") == [1, 2]
