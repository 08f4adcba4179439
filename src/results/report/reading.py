"""Reading results files: usable records tagged with their file and line, malformed lines counted."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.jsonl import jsonl_lines, read_text


@dataclass
class Loaded:
    """One results file: its usable records (each tagged with ``_file``/``_line``) and its malformed lines."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    malformed: list[tuple[int, str]] = field(default_factory=list)


def read_results(path: Path) -> Loaded:
    """Raises UnreadableFileError for a binary or non-UTF-8 file: replacing its bytes would invent records."""
    loaded = Loaded(path)
    for line_number, line in enumerate(jsonl_lines(read_text(path)), start=1):
        if not line.strip():
            continue
        record, problem = _parse_line(line)
        if problem:
            loaded.malformed.append((line_number, problem))
        else:
            loaded.records.append(record | {"_file": str(path), "_line": line_number})
    return loaded


def _parse_line(line: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return None, f"not valid JSON ({error.msg}; a truncated line?)"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if not isinstance(record.get("method"), str) or record.get("status") not in ("ok", "error"):
        # without a method and a status the record cannot be placed in any row
        return None, "no method or no status 'ok'/'error'"
    return record, None
