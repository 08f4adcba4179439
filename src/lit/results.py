"""ResultsWriter: appends each record to the JSONL output as soon as its prompt is done."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L


def check_output_path(path: str | Path, resume: bool) -> Path:
    """Fail before any model loads when the output cannot be written or would mix with an earlier run."""
    path = Path(path)
    if path.exists() and not resume:
        raise FileExistsError(
            f"results file {path} already exists: pass --resume true to continue it, or choose another --output"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as error:
        raise PermissionError(f"cannot write results to {path} ({error.strerror}): choose another --output") from error
    return path


class ResultsWriter(L.Callback):
    """Writes records line by line and flushes each, so a killed run loses at most the prompt in flight."""

    def __init__(self, output: str | Path) -> None:
        self.output = Path(output)
        self.written = 0
        self.ok = 0

    def on_predict_batch_end(self, trainer, pl_module, outputs: list[dict[str, Any]], batch, batch_idx, dataloader_idx=0):
        with self.output.open("a", encoding="utf-8") as handle:
            for record in outputs:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
                self.written += 1
                self.ok += record.get("status") == "ok"
