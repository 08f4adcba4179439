"""Import hygiene: modules that used to form import cycles load first in a fresh interpreter, and the
imports that hid the cycles inside functions stay gone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORMER_CYCLES = [
    "src.data.answers",
    "src.data.prompts",
    "src.data.tasks",
    "src.models.gguf",
    "src.models.embedded",
    "src.models.loading",
]


def imported_modules(path: Path, nested_only: bool = False) -> set[str]:
    """Modules ``path`` imports (``import x`` and ``from x import y``); only those inside functions if asked."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes = [n for f in functions for n in ast.walk(f)] if nested_only else list(ast.walk(tree))
    names = {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.module}
    return names | {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}


def test_former_cycles_each_import_first_in_a_fresh_interpreter():
    # One process per module, all started at once: each pays torch's import time, so in parallel it stays fast.
    runs = {
        name: subprocess.Popen([sys.executable, "-c", f"import {name}"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for name in FORMER_CYCLES
    }
    failures = {name: run.communicate(timeout=60)[1].strip().splitlines()[-1:] for name, run in runs.items()}
    assert not {name: error for name, error in failures.items() if runs[name].returncode}


def test_tasks_imports_prompt_at_module_level():
    assert "src.data.prompts" not in imported_modules(ROOT / "src/data/tasks.py", nested_only=True)


def test_embedded_does_not_import_the_loader():
    assert "src.models.loading" not in imported_modules(ROOT / "src/models/embedded.py")


@pytest.mark.parametrize("module", ["src.data.prompts", "src.data.tasks"])
def test_answers_imports_neither_prompts_nor_tasks(module):
    assert module not in imported_modules(ROOT / "src/data/answers.py")


def test_nothing_under_src_imports_the_test_toy_models():
    users = [p for p in (ROOT / "src").rglob("*.py") if imported_modules(p) & {"toy", "src.decoding.toy"}]
    assert not users
