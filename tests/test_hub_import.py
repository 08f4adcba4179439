"""``hub:`` datasets: the repository's own ``datasets/`` folder (no ``__init__.py``) must not hide the Hugging
Face package, and without the package the error names the install command. No network: the "installed"
package is a fake written to a temporary folder."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from src.data.prompts import import_hf_datasets, read_hub_dataset
from src.errors import MissingInputError

FAKE_PACKAGE = '''
def load_dataset(name, config=None, split=None):
    return [{"question": f"{name}/{config}/{split}: 2+2?", "answer": "2+2=4\\n#### 4"}]
'''


def _without_real_datasets(entries: list[str]) -> list[str]:
    """``sys.path`` minus the current directory and any entry that provides a ``datasets`` package."""
    return [e for e in entries
            if e and not (Path(e) / "datasets").exists() and not (Path(e) / "datasets.py").exists()]


@pytest.fixture
def no_cached_datasets(monkeypatch):
    """No ``datasets`` in sys.modules during the test; whatever the test imports is undone after it."""
    # setitem records the entry to restore (or to remove when there was none); delitem then clears it
    monkeypatch.setitem(sys.modules, "datasets", sys.modules.get("datasets"))
    monkeypatch.delitem(sys.modules, "datasets")


@pytest.fixture
def shadowing_repo(tmp_path, monkeypatch, no_cached_datasets):
    """cwd = a folder holding an empty ``datasets/`` (like the repository root)."""
    repo = tmp_path / "repo"
    (repo / "datasets").mkdir(parents=True)
    monkeypatch.chdir(repo)
    return repo


def test_missing_package_names_the_install_command(shadowing_repo, monkeypatch):
    path = ["", *_without_real_datasets(sys.path)]
    monkeypatch.setattr(sys, "path", list(path))
    with pytest.raises(MissingInputError, match=r"pip install datasets \(or pip install -e '\.\[hub\]'\)"):
        import_hf_datasets("hub:gsm8k:main")
    assert sys.path == path  # restored
    with pytest.raises(MissingInputError, match="reading 'hub:gsm8k' needs the Hugging Face `datasets`"):
        read_hub_dataset("hub:gsm8k", "test", "auto", "prompt")


def test_installed_package_is_found_behind_the_shadowing_folder(shadowing_repo, tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "datasets").mkdir(parents=True)
    (site / "datasets" / "__init__.py").write_text(FAKE_PACKAGE)
    path = ["", str(shadowing_repo), *_without_real_datasets(sys.path)]
    monkeypatch.setattr(sys, "path", list(path))
    # imported once before the package was on the path: the namespace package of the folder is cached
    assert not hasattr(importlib.import_module("datasets"), "load_dataset")
    path.append(str(site))
    sys.path.append(str(site))
    module = import_hf_datasets()
    assert Path(module.__file__) == site / "datasets" / "__init__.py"
    assert sys.path == path and sys.modules["datasets"] is module
    prompts = read_hub_dataset("hub:org/gsm8k:main", "test", "auto", "prompt")
    assert [(p.dataset, p.turns, p.answer) for p in prompts] == [
        ("gsm8k", ["org/gsm8k/main/test: 2+2?"], "4")]


def test_shadowing_folder_with_init_is_left_alone(tmp_path, monkeypatch, no_cached_datasets):
    """Only namespace-package folders are skipped: a real package found first is returned as is."""
    site = tmp_path / "site"
    (site / "datasets").mkdir(parents=True)
    (site / "datasets" / "__init__.py").write_text(FAKE_PACKAGE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(site), *_without_real_datasets(sys.path)])
    assert import_hf_datasets().load_dataset("x", split="y")[0]["question"] == "x/None/y: 2+2?"

