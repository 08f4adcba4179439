"""ResultsWriter: appends each record to the JSONL output as soon as its prompt is done; reads it back to resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L

from src.errors import OutputExistsError, OutputNotWritableError

log = logging.getLogger(__name__)


def check_output_path(path: str | Path, resume: bool) -> Path:
    """Fail before any model loads when the output cannot be written or would mix with an earlier run."""
    path = Path(path)
    if path.exists() and not resume:
        raise OutputExistsError(
            f"results file {path} already exists: pass --resume true to continue it, or choose another --output"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as error:
        raise OutputNotWritableError(
            f"cannot write results to {path} ({error.strerror}): choose another --output"
        ) from error
    return path


def read_ok_records(path: Path) -> dict[str, dict[str, Any]]:
    """``resume_key -> record`` of the ``ok`` records already in ``path``; a truncated line is skipped."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d is not valid JSON (a run killed mid-write?); it is ignored", path, line_number)
                continue
            if isinstance(record, dict) and record.get("status") == "ok" and "resume_key" in record:
                done[record["resume_key"]] = record
    return done


class ResultsWriter(L.Callback):
    """Writes records line by line and flushes each, so a killed run loses at most the prompt in flight."""

    def __init__(self, output: str | Path, resume: bool = False) -> None:
        self.output = Path(output)
        self.previous = read_ok_records(self.output) if resume else {}
        self.written = 0
        self.ok = 0
        self._end_with_newline()

    def _end_with_newline(self) -> None:
        """After a killed run the last line may be cut: start our records on a fresh line."""
        if self.output.is_file() and self.output.stat().st_size:
            with self.output.open("rb") as handle:
                handle.seek(-1, 2)
                last = handle.read(1)
            if last != b"\n":
                with self.output.open("a", encoding="utf-8") as handle:
                    handle.write("\n")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        with self.output.open("a", encoding="utf-8") as handle:
            for record in outputs:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
                self.written += 1
                self.ok += record.get("status") == "ok"
