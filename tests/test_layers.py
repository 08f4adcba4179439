"""The import rule between layers, read from the source (every import, function-local ones included).

- ``src.results`` (the record contract and everything that reads or writes results) imports nothing from
  decoding, models, data or lit, and neither torch nor Lightning: ``check_results`` and the report run without
  them;
- nothing in decoding, models or data imports ``src.results`` (records are built from what they return);
- ``src.jsonl`` (shared by the results files and the data stores) and ``src.errors`` are leaves.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
HEAVY = ("torch", "lightning", "transformers", "torchmetrics")


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in the file names (relative imports resolved)."""
    package = ".".join(shown(path).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
    return names


def shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else Path(path.name)


def files_of(*packages: str) -> list[Path]:
    found = []
    for package in packages:
        target = SRC.joinpath(*package.split(".")[1:])
        found += sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]
    return found


def offending(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{shown(path)} imports {name}" for path in files for name in sorted(imported_modules(path))
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


def test_results_imports_no_lower_layer_and_no_torch():
    files = files_of("src.results")
    assert len(files) >= 10, files  # the package is really there (schema, records, files, check, report/...)
    assert offending(files, ("src.decoding", "src.models", "src.data", "src.lit", "src.cli", *HEAVY)) == []


def test_decoding_models_and_data_never_import_results():
    assert offending(files_of("src.decoding", "src.models", "src.data"), ("src.results",)) == []


@pytest.mark.parametrize("leaf", ["src.jsonl", "src.errors"])
def test_leaf_modules_import_only_the_standard_library_and_errors(leaf):
    names = imported_modules(files_of(leaf)[0])
    ours = {name for name in names if name.startswith("src")}
    assert ours <= {"src.errors"}, ours
    assert not any(name.split(".")[0] in HEAVY for name in names), names


def test_the_rule_is_able_to_fail(tmp_path):
    module = tmp_path / "probe.py"  # a function-local import counts as much as one at the top
    module.write_text("def late():\n    from src.decoding.stats import Generation\n    return Generation\n")
    assert offending([module], ("src.decoding",)) == ["probe.py imports src.decoding.stats"]


def test_check_results_and_report_load_without_torch():
    code = ("import sys; import src.results.check, src.results.report.cli, src.results.files, src.results.summary; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
