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

from src.errors import MalformedInputError, OutputExistsError, OutputNotWritableError
from src.lit.records import fingerprint_differences, fingerprint_id

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


RECORD_KEYS = ("run_id", "resume_key", "status")  # every record of ours has them (run_id is its first field)


def check_output_path(path: str | Path, resume: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """Fail before any model loads when the output cannot be written, is an input of the run, or would mix with
    an earlier run. Creates nothing: the file appears with its first record (a failed run leaves no empty file).
    """
    path = Path(path)
    for source in inputs:
        if _same_file(path, Path(source)):
            raise OutputExistsError(
                f"--output {path} is an input of this run ({source}): results would be appended to it; "
                "choose another --output, e.g. datasets/results.jsonl"
            )
    if path.is_dir():
        raise OutputNotWritableError(f"--output {path} is a folder: give a file path, e.g. {path / 'results.jsonl'}")
    has_records = path.is_file() and path.stat().st_size > 0  # an empty file (an earlier failed run) holds nothing
    if has_records and not resume:
        raise OutputExistsError(
            f"results file {path} already exists: pass --resume true to continue it, or choose another --output"
        )
    if has_records:
        check_is_results_file(path)
    leftovers = part_files(path)
    if leftovers and not resume:
        names = ", ".join(p.name for p in leftovers)
        raise OutputExistsError(
            f"part files of an earlier data-parallel run of {path} exist ({names}): pass --resume true to fold "
            "their records into it and continue, or move them away"
        )
    folder = _nearest_existing(path.parent)
    writable = os.access(path, os.W_OK) if path.exists() else folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)
    if not writable:
        raise OutputNotWritableError(f"cannot write results to {path} (no write permission in {folder}): "
                                     "choose another --output")
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _nearest_existing(folder: Path) -> Path:
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_is_results_file(path: Path) -> None:
    """Refuse to append to a file that is not a results JSONL of ours (a prompt file, a config, a binary file):
    its first record must be a JSON object with ``run_id``, ``resume_key`` and ``status``."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedInputError(
            f"{path} is not a UTF-8 text file (binary?), so not a results file of sp-samp: choose another --output"
        ) from None
    for line_number, line in enumerate(text.splitlines(keepends=True), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if line_number == 1 and not line.endswith("\n") and line.startswith('{"run_id"'):
                return  # our first record, cut by a kill: repaired before appending
            record = None
        if not isinstance(record, dict) or not all(key in record for key in RECORD_KEYS):
            raise OutputExistsError(
                f"{path} is not a results file of sp-samp (line {line_number} is not a record with "
                f"{', '.join(RECORD_KEYS)}): choose another --output"
            )
        return


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

    In ``setup`` (every rank, before the models load): rank 0 repairs lines cut by a killed run, folds part files
    left by a killed data-parallel run into the output (``--resume true``) and checks that the records already
    there were made with this run's configuration (its run fingerprint); the ok records are shared with every
    rank, as is rank 0's ``run_id``, so every record of one data-parallel run carries the same ``run_id``. With
    one process the records go straight to the output; with several, to this rank's part file, merged by rank 0
    in ``on_predict_end``. Files are created with their first record.

    ``written`` / ``ok`` count this run's records: after predict, over all ranks.

    Args:
        output: the results JSONL file.
        resume: continue ``output``: prompts already ``ok`` there (same configuration) are skipped.
        new_config: on resume, add this run's configuration next to different ones already in ``output`` (its
            records are keyed apart by their fingerprint) instead of refusing.
    """

    def __init__(self, output: str | Path, resume: bool = False, new_config: bool = False) -> None:
        self.output = Path(output)
        self.resume = resume
        self.new_config = new_config
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
                self._check_configuration(previous, pl_module, trainer.datamodule)
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
        self.target = part_path(self.output, trainer.global_rank) if self.world_size > 1 else self.output
        if self.world_size > 1 and self.target.exists():  # rank 0 folded or refused every leftover part
            raise OutputExistsError(f"part file {self.target} appeared during setup: is another run writing here?")
        strategy.barrier("results_writer_setup")

    def _prepare_output(self, order: dict[tuple[str, str], int] | None = None) -> dict[str, dict[str, Any]]:
        """Rank 0: repair cut lines and fold leftover part files into the output (resume only); read its ok records."""
        leftovers = part_files(self.output)
        if leftovers and not self.resume:
            raise OutputExistsError(f"part files of an earlier run of {self.output} exist: pass --resume true")
        if not self.resume:
            return {}
        for path in [self.output, *leftovers]:
            repair_lines(path)
        if leftovers:
            appended, ok = merge_parts(self.output, leftovers, order)
            log.warning(
                "folded %d records (%d ok) from %d part files of a killed run into %s",
                appended, ok, len(leftovers), self.output,
            )
        return read_ok_records(self.output)

    def _check_configuration(self, previous: dict[str, dict[str, Any]], pl_module, datamodule) -> None:
        """Refuse a resume whose configuration differs from the one the output's records were made with.

        Per method key: if the output holds ok records of it and none has this run's fingerprint, continuing
        would put two configurations under one name (e.g. a float32 and a bfloat16 target). ``new_config``
        adds this one next to them instead: the resume keys hold the fingerprint, so the records stay apart.
        """
        if not previous or self.new_config or not hasattr(pl_module, "fingerprints"):
            return
        options = datamodule.prompt_options() if hasattr(datamodule, "prompt_options") else {}
        for method_key, fingerprint in pl_module.fingerprints(options).items():
            theirs = [r for r in previous.values() if r.get("method") == method_key]
            if not theirs or any(r.get("fingerprint_id") == fingerprint_id(fingerprint) for r in theirs):
                continue
            differences = fingerprint_differences(theirs[-1].get("fingerprint"), fingerprint)
            more = f" (and {len(differences) - 2} more)" if len(differences) > 2 else ""
            raise OutputExistsError(
                f"--resume would mix configurations in {self.output}: its {method_key!r} records differ from this "
                f"run in {'; '.join(differences[:2])}{more}: pass --resume_as_new_config true to add this "
                "configuration next to them (keyed apart), or choose another --output"
            )

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            with self.target.open("a", encoding="utf-8") as handle:
                for record in outputs or []:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    handle.flush()
                    self.written += 1
                    self.ok += record.get("status") == "ok"
        except OSError as error:
            raise OutputNotWritableError(
                f"cannot append to {self.target} ({error.strerror or error}): the {self.written} records written "
                "before are kept; free space (or fix the location) and rerun with --resume true"
            ) from error

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.world_size <= 1:
            return
        strategy = trainer.strategy
        strategy.barrier("results_writer_merge")  # every rank has finished its part
        merged, problem = (0, 0), None
        if trainer.is_global_zero:
            parts = [p for p in (part_path(self.output, rank) for rank in range(self.world_size)) if p.exists()]
            try:
                merged = merge_parts(self.output, parts, prompt_order(trainer.datamodule)) if parts else (0, 0)
            except (OSError, ValueError) as error:
                problem = OutputNotWritableError(f"cannot merge the part files into {self.output}: {error}")
        merged, problem = strategy.broadcast((merged, problem), src=0)
        if problem is not None:
            raise problem
        self.written, self.ok = merged  # the totals over all ranks
        self.target = self.output
