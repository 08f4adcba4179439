"""Append-only JSONL files: the one place that reads, appends and repairs them, and guards a store's meta.json.

Used by the results writer and readers (:mod:`src.results`), the AutoJudge label store
(:mod:`src.data.mining`) and the EAGLE feature store (:mod:`src.data.features`). It is a leaf module (standard
library and :mod:`src.errors` only) rather than part of :mod:`src.results` because the data stores may not
import the results layer (the import rule in tests/test_layers.py).

A killed run (kill -9, a full disk, a crash that leaves NULs) can leave the last line of such a file cut. One
policy for stores and results files alike: nothing is ever dropped, and a cut line is never a reason to throw a
file away. :func:`repair_lines` moves every line that is not a JSON object to ``<file>.corrupt`` (named in a
warning) before the next append, and readers skip such lines with a warning:

- stores (:func:`read_rows`, :func:`append_rows`): a skipped row's work is redone (the prompt or item it
  finished is mined again); the store's writer repairs its files when it opens the store;
- results files (:func:`read_records`, :func:`repair_lines`): the resumed run repairs before appending.

A file reached through a symlink is repaired in place of its target, so the link keeps pointing at it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from src.errors import IncompatibleModelsError

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


# ---------------------------------------------------------------- one parse for stores and results files

def split_lines(data: bytes) -> tuple[list[tuple[bytes, dict[str, Any]]], list[tuple[int, bytes]]]:
    """The lines of a JSONL file's bytes that hold a JSON object, as (line, object), and the others, as (line
    number, line).

    Split on b"\\n" only (see :func:`jsonl_lines`), and decoded line by line: a line cut inside a multi-byte
    character is one bad line, not an unreadable file."""
    good, bad = [], []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if isinstance(row, dict):
            good.append((line, row))
        else:
            bad.append((number, line))
    return good, bad


# ---------------------------------------------------------------- stores (label store, feature store)

def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of an append-only store file ([] when absent). A line that is not a JSON object (cut by a
    killed run) is skipped with a warning: its prompt or item is not finished, so its work is redone; the store's
    next writer moves it to the side file (:func:`repair_lines`)."""
    if not path.is_file():
        return []
    good, bad = split_lines(path.read_bytes())
    if bad:
        log.warning("%s: line %s not valid JSON (cut by a killed run?): skipped, its work is redone; moved to %s "
                    "when the store is next written", path, ", ".join(str(n) for n, _ in bad), side_file(path))
    return [row for _, row in good]


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows in one write. The store was repaired when opened; only a last line
    cut since then (another writer killed) is checked for here, by reading the file's tail, not all of it."""
    if not _ends_with_a_whole_row(path):
        repair_lines(path)
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows))


def _ends_with_a_whole_row(path: Path, tail_bytes: int = 1 << 16) -> bool:
    """Whether the file is absent, empty, or ends with a newline after a JSON object (a longer last line than
    ``tail_bytes`` is left to :func:`repair_lines`, which reads the whole file)."""
    if not path.is_file() or not path.stat().st_size:
        return True
    with path.open("rb") as handle:
        size = handle.seek(0, 2)
        handle.seek(max(0, size - tail_bytes))
        tail = handle.read()
    if not tail.endswith(b"\n"):
        return False
    last = tail[:-1].rsplit(b"\n", 1)
    if len(last) == 1 and size > len(tail):
        return False  # the last line starts before the tail read
    good, bad = split_lines(last[-1])
    return bool(good) and not bad


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


def side_file(path: Path) -> Path:
    """Where :func:`repair_lines` moves the cut lines of ``path``: ``<path>.corrupt``, beside the name given."""
    return path.with_name(path.name + ".corrupt")


def repair_lines(path: Path) -> int:
    """Move lines that are not a JSON object (a record cut by a kill or a full disk) to ``<path>.corrupt``.

    The file is rewritten through a temporary file and an atomic rename, so a crash here loses nothing; the
    cut lines are appended to the side file, never dropped. A symlinked ``path`` is resolved first: its target
    is rewritten (the temporary file beside it), so the link stays and later appends still reach the real file.
    Returns how many lines were moved.
    """
    if not path.is_file() or not path.stat().st_size:
        return 0
    real = path.resolve()
    good, bad = split_lines(real.read_bytes())
    if not bad:
        end_with_newline(real)
        return 0
    side = side_file(path)
    with side.open("ab") as handle:
        handle.writelines(line + b"\n" for _, line in bad)
    temporary = real.with_name(real.name + ".repair.tmp")
    with temporary.open("wb") as handle:
        handle.writelines(line + b"\n" for line, _ in good)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, real)
    log.warning("%s: moved %d cut line(s) (line %s) to %s before appending", path, len(bad),
                ", ".join(str(n) for n, _ in bad), side)
    return len(bad)
