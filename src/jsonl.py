"""Append-only JSONL files: the one place that reads, appends and repairs them, and guards a store's meta.json.

Used by the results writer and readers (:mod:`src.results`), the AutoJudge label store
(:mod:`src.data.mining`) and the EAGLE feature store (:mod:`src.data.features`). It is a leaf module (standard
library and :mod:`src.errors` only) rather than part of :mod:`src.results` because the data stores may not
import the results layer (the import rule in tests/test_layers.py).

A killed run (kill -9, a full disk) can leave the last line of such a file cut. Two policies, both here:

- stores (:func:`read_rows`, :func:`append_rows`): a cut *last* line is a row whose work is redone, so it is
  skipped on read and dropped before the next append (never left mid-file); a bad line elsewhere is an error
  that names the file, the line and the fix;
- results files (:func:`read_records`, :func:`repair_lines`): nothing is ever dropped: a cut line is moved
  to ``<file>.corrupt`` before appending, and readers skip it with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from src.errors import IncompatibleModelsError, MalformedInputError

log = logging.getLogger(__name__)

NOT_TEXT = "is not a UTF-8 text file (binary?): pass a results JSONL written by python -m src predict"


class UnreadableFileError(Exception):
    """A results file that cannot be read as text: the message is printed as one line, exit status 2."""


def read_text(path: Path) -> str:
    """The file decoded as UTF-8; raises UnreadableFileError for a missing, unreadable or binary file."""
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise UnreadableFileError(f"results file {path} {what}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UnreadableFileError(f"cannot read {path} ({error.strerror})") from error
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    # JSON lines never hold a raw NUL (strings escape control characters): one means a binary file
    if text is None or "\0" in text:
        raise UnreadableFileError(f"{path} {NOT_TEXT}")
    return text


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL text. Only "\\n" ends a record: str.splitlines would also split at U+2028 or \\x1c
    inside a JSON string."""
    return text.split("\n")


# ---------------------------------------------------------------- stores (label store, feature store)

def read_rows(path: Path, fix: str) -> list[dict[str, Any]]:
    """The rows of an append-only store file ([] when absent); a last line cut by a killed run is skipped, any
    other bad line is a one-line error ending with ``fix`` (e.g. "delete the label store and mine again")."""
    if not path.is_file():
        return []
    lines = jsonl_lines(path.read_text(encoding="utf-8"))
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                continue  # a line cut by a killed run
            raise MalformedInputError(f"{path}:{number} is not valid JSON: {fix}") from error
    return rows


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows in one write, after dropping a last line cut by a killed run (so it never ends up mid-file)."""
    if path.is_file() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with path.open("rb+") as handle:
                handle.truncate(data.rfind(b"\n") + 1)
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows))


def read_meta(meta_path: Path) -> dict[str, Any]:
    """A store's meta.json ({} when the store was never opened)."""
    return json.loads(meta_path.read_text()) if meta_path.is_file() else {}


def guard_meta(meta_path: Path, meta: dict[str, Any], made: str, fix: str) -> None:
    """Write ``meta`` to a new store, or refuse an existing store whose meta.json differs from it.

    ``made`` says how the store was made and ``fix`` what to do, for the one-line error:
    "<made> with other settings (<keys> differ): <fix>", e.g. ``made="label store X was mined"``.
    """
    meta = json.loads(json.dumps(meta))  # compare as JSON: tuples are lists there
    if not meta_path.is_file():
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        return
    existing = read_meta(meta_path)
    if existing != meta:
        differing = sorted(k for k in set(existing) | set(meta) if existing.get(k) != meta.get(k))
        raise IncompatibleModelsError(f"{made} with other settings ({', '.join(differing)} differ): {fix}")


# ---------------------------------------------------------------- results files (never drop a line)

def read_records(path: Path) -> list[dict[str, Any]]:
    """Every JSON object of a results file; a truncated or invalid line is skipped with a warning."""
    records: list[dict[str, Any]] = []
    if not path.is_file():
        return records
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d is not valid JSON (a run killed mid-write?); it is ignored", path, line_number)
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def end_with_newline(path: Path) -> None:
    """After a killed run the last line may be cut: start the next records on a fresh line."""
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as handle:
            handle.seek(-1, 2)
            last = handle.read(1)
        if last != b"\n":
            with path.open("a", encoding="utf-8") as handle:
                handle.write("\n")


def repair_lines(path: Path) -> int:
    """Move lines that are not valid JSON (a record cut by a kill or a full disk) to ``<path>.corrupt``.

    The file is rewritten through a temporary file and an atomic rename, so a crash here loses nothing; the
    cut lines are appended to the side file, never dropped. Returns how many lines were moved.
    """
    if not path.is_file() or not path.stat().st_size:
        return 0
    good, bad = [], []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
            good.append(line)
        except json.JSONDecodeError:
            bad.append((line_number, line))
    if not bad:
        end_with_newline(path)
        return 0
    side = path.with_name(path.name + ".corrupt")
    with side.open("a", encoding="utf-8") as handle:
        handle.writelines(line + "\n" for _, line in bad)
    temporary = path.with_name(path.name + ".repair.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.writelines(line + "\n" for line in good)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    log.warning("%s: moved %d cut line(s) (line %s) to %s before appending", path, len(bad),
                ", ".join(str(n) for n, _ in bad), side)
    return len(bad)
