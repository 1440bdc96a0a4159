"""The package as a whole: no import circles, imports at the top, the README documents every
command and option, the version and type hints ship with it."""

from __future__ import annotations

import ast
import os
import platform
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer

import xrayfeat
from xrayfeat.cli import app

PACKAGE = Path(xrayfeat.__file__).resolve().parent
ROOT = PACKAGE.parent
#: Modules whose top imports Keras/TensorFlow: importing them inside a function is how the
#: rest of the package stays light.
HEAVY = {"xrayfeat.model", "xrayfeat.fused_kernels"}
#: Modules that must import the package at their top (the done-when of the library issue).
TOP_IMPORTS_ONLY = ["evaluation", "prediction", "figures", "visualize", "contrast", "cams", "export",
                    "layers", "metrics", "thresholds", "api"]


def _module_names() -> set[str]:
    return {f"xrayfeat.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def _imports(path: Path, modules: set[str]) -> list[tuple[str, bool]]:
    """``(imported xrayfeat module, inside a function?)`` for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                if child.module == "xrayfeat":  # from xrayfeat import figures
                    for alias in child.names:
                        target = f"xrayfeat.{alias.name}"
                        found.append((target if target in modules else "xrayfeat", nested))
                elif child.module.startswith("xrayfeat."):
                    found.append((child.module, nested))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("xrayfeat"):
                        found.append((alias.name, nested))
            visit(child, nested)

    visit(tree, False)
    return found


def test_no_module_imports_a_module_that_imports_it_back():
    modules = _module_names()
    graph = {m: {t for t, _ in _imports(PACKAGE / f"{m.split('.')[1]}.py", modules)
                 if t in modules and t != m} for m in modules}
    cycles = []

    def walk(node: str, path: list[str]) -> None:
        for nxt in graph[node]:
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif len(path) < len(modules):
                walk(nxt, path + [nxt])

    for start in sorted(modules):
        walk(start, [start])
    assert not cycles, f"import circles: {sorted({' -> '.join(c) for c in cycles})[:5]}"


def test_the_core_modules_import_the_package_at_their_top():
    modules = _module_names()
    late = [(name, target) for name in TOP_IMPORTS_ONLY
            for target, nested in _imports(PACKAGE / f"{name}.py", modules)
            if nested and target not in HEAVY]
    assert not late, late


def test_importing_the_core_does_not_import_tensorflow():
    code = ("import sys, xrayfeat.evaluation, xrayfeat.prediction, xrayfeat.visualize, "
            "xrayfeat.api; print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "False"]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="oneDNN is chosen on x86-64 only")
@pytest.mark.parametrize("user_setting, kernels", [(None, "oneDNN"), ("0", "Eigen")])
def test_tensorflow_runs_onednn_kernels_unless_the_user_said_otherwise(user_setting, kernels):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if user_setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = user_setting
    code = ("import xrayfeat; from xrayfeat.runs import tensorflow_kernels; "
            "print(tensorflow_kernels())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == kernels


def test_the_version_comes_from_the_package_metadata():
    with open(ROOT / "pyproject.toml", "rb") as fh:
        declared = tomllib.load(fh)["project"]["version"]
    assert xrayfeat.__version__ == declared


def test_type_hints_ship_with_the_package():
    assert (PACKAGE / "py.typed").is_file()
    with open(ROOT / "pyproject.toml", "rb") as fh:
        data = tomllib.load(fh)["tool"]["setuptools"]["package-data"]
    assert "py.typed" in data["xrayfeat"]


def test_the_readme_documents_every_command_and_option():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = typer.main.get_command(app)
    missing = []
    for name, sub in command.commands.items():
        if f"xrayfeat {name}" not in readme:
            missing.append(f"xrayfeat {name}")
        for param in sub.params:
            for opt in [*param.opts, *param.secondary_opts]:
                if opt.startswith("--") and opt not in ("--help",) and opt not in readme:
                    missing.append(f"{name} {opt}")
    assert not missing, f"not in README.md: {missing}"


def test_choices_are_listed_in_help_and_refused_early():
    from typer.testing import CliRunner

    runner = CliRunner()
    # Help is drawn to the terminal's width (cut with an ellipsis when narrow): draw it
    # wide, and compare it with any wrapping taken out.
    helped = runner.invoke(app, ["visualize-layers", "-h"], env={"COLUMNS": "250"})
    flat = "".join(ch for ch in helped.stdout if not ch.isspace() and ch not in "│╭╮╰╯─")
    assert helped.exit_code == 0 and "<gradcam|gradcam++|scorecam>" in flat
    refused = runner.invoke(app, ["train", "x.h5", "--out", "r", "--precision", "float16"])
    assert refused.exit_code == 2
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "float16" in lines[0], lines
