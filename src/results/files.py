"""Results files on disk: refusing an output that would lose or mix results, data-parallel part files and
merging them, and the ``ok`` records a resume skips. No torch, no Lightning: the writer callback
(:class:`src.lit.results.ResultsWriter`) calls these.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from src.errors import MalformedInputError, OutputExistsError, OutputNotWritableError
from src.jsonl import end_with_newline, read_records


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
    if path.exists() and not path.is_file():  # a FIFO would block the first append until a reader comes, forever
        raise OutputNotWritableError(
            f"--output {path} is not a regular file (a FIFO, a device or a socket): give a results file path, "
            "e.g. datasets/results.jsonl"
        )
    folder = _nearest_existing(path.parent)
    if not folder.is_dir():
        raise OutputNotWritableError(
            f"cannot write results to {path}: {folder} is a file, not a folder: choose another --output"
        )
    holder = output_lock_holder(path)
    if holder is not None:  # before the "already exists" check: the file may be the other run's, still growing
        raise OutputExistsError(_locked_message(path, holder))
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


def read_ok_records(path: Path) -> dict[str, dict[str, Any]]:
    """``resume_key -> record`` of the ``ok`` records already in ``path``; a truncated line is skipped."""
    return {r["resume_key"]: r for r in read_records(Path(path)) if r.get("status") == "ok" and "resume_key" in r}


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


# ---------------------------------------------------------------- one writer per output

def lock_path(output: Path) -> Path:
    """The sidecar file the advisory lock of ``output`` is taken on: ``<output>.lock`` next to the file a symlink
    points to (two names of one file share one lock), as the output itself may not exist yet (it is created with
    its first record)."""
    real = Path(os.path.realpath(output))
    return real.with_name(f"{real.name}.lock")


def output_lock_holder(output: Path) -> int | str | None:
    """The pid of the process holding ``output``'s lock (``"?"`` when it wrote none yet), or None when free.
    Creates nothing: a probe for the check before any model loads."""
    try:
        descriptor = os.open(lock_path(Path(output)), os.O_RDONLY)
    except OSError:  # no lock file (no run holds it), or one we may not read: OutputLock.acquire decides
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _pid_in(descriptor)
    else:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return None
    finally:
        os.close(descriptor)


def _pid_in(descriptor: int) -> int | str:
    text = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else "?"


def _locked_message(output: Path, holder: int | str) -> str:
    return (
        f"--output {output} is being written by another run (pid {holder}): wait for it to end (or stop it), "
        "then pass --resume true to continue its file, or choose another --output"
    )


class OutputLock:
    """An exclusive ``flock`` on ``<output>.lock`` held for a whole run, so one output has one writer at a time.

    flock is released by the kernel when the process ends, kill -9 included, so a killed run never leaves a
    stale lock: a lock file without a holder is free. ``release`` deletes the lock file and the folders that
    ``acquire`` created for it (the output's own folder is created again with its first record).
    """

    def __init__(self, path: Path, descriptor: int, created: list[Path]) -> None:
        self.path, self.descriptor, self.created = path, descriptor, created

    @classmethod
    def acquire(cls, output: str | Path) -> OutputLock:
        """Take the lock or refuse in one line naming the other process (its pid)."""
        output = Path(output)
        path = lock_path(output)
        created = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _pid_in(descriptor)
                    os.close(descriptor)
                    raise OutputExistsError(_locked_message(output, holder)) from None
                # A holder that released deletes the file: a lock taken on the deleted one guards nothing.
                if _same_inode(descriptor, path):
                    break
                os.close(descriptor)
        except OSError as error:
            if isinstance(error, OutputExistsError):
                raise
            raise OutputNotWritableError(
                f"cannot create the lock file {path} of --output {output} ({error.strerror or error}): "
                "free space or fix the location, or choose another --output"
            ) from error
        try:  # the pid is for the refusal message only: a disk too full for it leaves the lock held anyway
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        return cls(path, descriptor, created)

    def release(self) -> None:
        if self.descriptor < 0:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: a waiting run then makes a new file
        os.close(self.descriptor)
        self.descriptor = -1
        for folder in self.created:  # innermost first; a folder the run filled stays
            try:
                folder.rmdir()
            except OSError:
                break


def _same_inode(descriptor: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(descriptor)
    return stat.S_ISREG(held.st_mode) and (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)
