"""ResultsWriter: appends each record to the JSONL output as soon as its prompt is done; reads it back to resume.

Under a data-parallel strategy (``--trainer.devices N --trainer.strategy ddp``) every rank appends its records to
its own part file ``<output>.rank<R>.part`` next to the output; at the end of predict rank 0 merges the parts into
the output (in prompt order, each ``ok`` resume key once) and deletes them. Part files left by a killed run are
folded into the output by the next ``--resume true`` run before it starts, so their records are not redone.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L

from src.errors import OutputExistsError, OutputNotWritableError

log = logging.getLogger(__name__)


def part_path(output: Path, rank: int) -> Path:
    """The part file of ``rank`` for ``output``: ``<output>.rank<R>.part`` in the same folder."""
    return output.with_name(f"{output.name}.rank{rank}.part")


def part_files(output: Path) -> list[Path]:
    """The part files of ``output`` that exist (e.g. left by a killed data-parallel run), in rank order."""
    output = Path(output)
    if not output.parent.is_dir():
        return []
    pattern = re.compile(re.escape(output.name) + r"\.rank(\d+)\.part")
    found = [
        (int(m.group(1)), p) for p in output.parent.iterdir() if (m := pattern.fullmatch(p.name)) and p.is_file()
    ]
    return [p for _, p in sorted(found)]


def check_output_path(path: str | Path, resume: bool) -> Path:
    """Fail before any model loads when the output cannot be written or would mix with an earlier run."""
    path = Path(path)
    if path.exists() and not resume:
        raise OutputExistsError(
            f"results file {path} already exists: pass --resume true to continue it, or choose another --output"
        )
    leftovers = part_files(path)
    if leftovers and not resume:
        names = ", ".join(p.name for p in leftovers)
        raise OutputExistsError(
            f"part files of an earlier data-parallel run of {path} exist ({names}): pass --resume true to fold "
            "their records into it and continue, or move them away"
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


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSONL results file; a truncated or invalid line is skipped with a warning."""
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


def read_ok_records(path: Path) -> dict[str, dict[str, Any]]:
    """``resume_key -> record`` of the ``ok`` records already in ``path``; a truncated line is skipped."""
    return {r["resume_key"]: r for r in read_records(Path(path)) if r.get("status") == "ok" and "resume_key" in r}


def end_with_newline(path: Path) -> None:
    """After a killed run the last line may be cut: start the next records on a fresh line."""
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as handle:
            handle.seek(-1, 2)
            last = handle.read(1)
        if last != b"\n":
            with path.open("a", encoding="utf-8") as handle:
                handle.write("\n")


def _identity(record: dict[str, Any]) -> tuple:
    """One run writes one record per resume key: (run, key, status) tells a record copied twice."""
    return record.get("run_id"), record.get("resume_key"), record.get("status")


def merge_parts(
    output: Path, parts: Iterable[Path], order: dict[tuple[str, str], int] | None = None
) -> tuple[int, int]:
    """Append the records of ``parts`` to ``output`` and delete the parts; returns (records appended, ok ones).

    Records are appended in prompt order (``order``: (dataset, prompt_id) -> position; unknown prompts after the
    known ones), then part by part, line by line. A record already in ``output`` (merged before a crash) is not
    appended again, nor an ``ok`` record of a resume key that is already ``ok``: merging is idempotent.
    """
    order = order or {}
    parts = list(parts)
    existing = read_records(output)
    seen = {_identity(r) for r in existing}
    ok_keys = {r.get("resume_key") for r in existing if r.get("status") == "ok"}
    entries = []
    for part_index, part in enumerate(parts):
        for line_index, record in enumerate(read_records(part)):
            position = order.get((record.get("dataset"), record.get("prompt_id")), len(order))
            entries.append((position, part_index, line_index, record))
    entries.sort(key=lambda entry: entry[:3])
    appended = ok = 0
    end_with_newline(output)
    with output.open("a", encoding="utf-8") as handle:
        for *_, record in entries:
            is_ok = record.get("status") == "ok"
            if _identity(record) in seen or (is_ok and record.get("resume_key") in ok_keys):
                continue
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            seen.add(_identity(record))
            if is_ok:
                ok_keys.add(record.get("resume_key"))
            appended += 1
            ok += is_ok
        handle.flush()
        os.fsync(handle.fileno())
    for part in parts:
        part.unlink(missing_ok=True)
    return appended, ok


def prompt_order(datamodule: Any) -> dict[tuple[str, str], int]:
    """(dataset, prompt_id) -> position of the prompts of ``datamodule`` (empty when it has no prompt list)."""
    prompts = getattr(datamodule, "prompts", None) or []
    order: dict[tuple[str, str], int] = {}
    for index, prompt in enumerate(prompts):
        key = (getattr(prompt, "dataset", None), getattr(prompt, "prompt_id", None))
        order.setdefault(key, index)
    return order


class ResultsWriter(L.Callback):
    """Writes records line by line and flushes each, so a killed run loses at most the prompt in flight (per rank).

    In ``setup`` (every rank, before the models load): rank 0 folds part files left by a killed run into the output
    (``--resume true``) and the ok records of the output are shared with every rank, as is rank 0's ``run_id``, so
    every record of one data-parallel run carries the same ``run_id``. With one process the records go straight to
    the output; with several, to this rank's part file, merged by rank 0 in ``on_predict_end``.

    ``written`` / ``ok`` count this run's records: after predict, over all ranks.
    """

    def __init__(self, output: str | Path, resume: bool = False) -> None:
        self.output = Path(output)
        self.resume = resume
        self.previous: dict[str, dict[str, Any]] = {}  # resume_key -> ok record of an earlier run
        self.written = 0
        self.ok = 0
        self.target = self.output  # the file this process appends to
        self.world_size = 1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        strategy = trainer.strategy
        self.world_size = trainer.world_size
        self.written = self.ok = 0
        problem, previous = None, {}
        if trainer.is_global_zero:
            try:
                previous = self._prepare_output(prompt_order(trainer.datamodule))
            except (OSError, ValueError) as error:  # raised on every rank alike below: no rank is left waiting
                problem = error
        problem, previous = strategy.broadcast((problem, previous), src=0)
        if problem is not None:
            raise problem
        self.previous = previous
        if hasattr(pl_module, "previous_records"):
            pl_module.previous_records = self.previous
        if hasattr(pl_module, "run_id"):  # one run id for the records of every rank
            pl_module.run_id = strategy.broadcast(pl_module.run_id, src=0)
        if self.world_size > 1:
            self.target = part_path(self.output, trainer.global_rank)
            self.target.open("x", encoding="utf-8").close()  # fresh: rank 0 folded or refused any leftover
        else:
            self.target = self.output
        strategy.barrier("results_writer_setup")

    def _prepare_output(self, order: dict[tuple[str, str], int] | None = None) -> dict[str, dict[str, Any]]:
        """Rank 0: fold leftover part files into the output (resume only) and read its ok records."""
        leftovers = part_files(self.output)
        if leftovers and not self.resume:
            raise OutputExistsError(f"part files of an earlier run of {self.output} exist: pass --resume true")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        end_with_newline(self.output)
        if leftovers:
            appended, ok = merge_parts(self.output, leftovers, order)
            log.warning(
                "folded %d records (%d ok) from %d part files of a killed run into %s",
                appended, ok, len(leftovers), self.output,
            )
        return read_ok_records(self.output) if self.resume else {}

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        with self.target.open("a", encoding="utf-8") as handle:
            for record in outputs or []:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
                self.written += 1
                self.ok += record.get("status") == "ok"

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.world_size <= 1:
            return
        strategy = trainer.strategy
        strategy.barrier("results_writer_merge")  # every rank has finished its part
        merged, problem = (0, 0), None
        if trainer.is_global_zero:
            parts = [part_path(self.output, rank) for rank in range(self.world_size)]
            try:
                merged = merge_parts(self.output, parts, prompt_order(trainer.datamodule))
            except (OSError, ValueError) as error:
                problem = OutputNotWritableError(f"cannot merge the part files into {self.output}: {error}")
        merged, problem = strategy.broadcast((merged, problem), src=0)
        if problem is not None:
            raise problem
        self.written, self.ok = merged  # the totals over all ranks
        self.target = self.output
