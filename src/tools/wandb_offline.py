"""Read what an offline wandb run recorded, without uploading it: ``python -m src.tools.wandb_offline RUN_DIR``.

An offline run keeps everything in one ``run-<id>.wandb`` file (no ``files/wandb-summary.json`` until it is
synced). That file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version), then 32 KiB
blocks of chunks, each ``crc32 (4) | length (2) | type (1) | payload``, where a protobuf ``Record`` may span
chunks (FIRST, MIDDLE..., LAST). We only need the final summary, the config and the history rows.
"""

from __future__ import annotations

import argparse
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = b":W&B" + struct.pack("<H", 0xBEE1)
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    path: Path
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    project: str | None = None
    run_id: str | None = None
    group: str | None = None
    job_type: str | None = None
    name: str | None = None


def find_run_file(path: str | Path) -> Path:
    """``path`` may be the ``.wandb`` file, a run folder, or a folder of runs (then the newest run)."""
    path = Path(path)
    if path.is_file():
        return path
    candidates = sorted(path.glob("run-*.wandb")) or sorted(path.glob("*run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"no run-*.wandb file under {path}: pass a wandb run folder such as wandb/offline-run-*")
    return candidates[-1]


def read_offline_runs(folder: str | Path) -> list[OfflineRun]:
    """Every run under a ``wandb`` folder, oldest first (a predict writes one ``compare`` run and one per method)."""
    files = sorted(Path(folder).glob("*run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    return [read_offline_run(f) for f in files]


def iter_payloads(data: bytes) -> Iterator[bytes]:
    """The record payloads of a log file, chunks reassembled."""
    if not data.startswith(HEADER):
        raise ValueError(f"not a wandb log file (header {data[:7]!r})")
    position, pending = len(HEADER) + 1, b""
    while position + CHUNK_HEADER <= len(data):
        room = BLOCK_SIZE - position % BLOCK_SIZE
        if room < CHUNK_HEADER:  # the writer pads a block tail too short for a chunk header
            position += room
            continue
        _, length, kind = struct.unpack_from("<IHB", data, position)
        payload = data[position + CHUNK_HEADER : position + CHUNK_HEADER + length]
        position += CHUNK_HEADER + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""
        elif kind == 0 and length == 0:  # zero padding at the end of a block
            position += BLOCK_SIZE - position % BLOCK_SIZE if position % BLOCK_SIZE else 0
        else:
            raise ValueError(f"corrupt wandb log: chunk type {kind} at byte {position}")


def _items(items) -> dict[str, Any]:
    """Key/value items; an item with a ``nested_key`` path sets one leaf of a nested dict."""
    out: dict[str, Any] = {}
    for item in items:
        path = list(item.nested_key) or [item.key]
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def read_offline_run(path: str | Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

    run_file = find_run_file(path)
    run = OfflineRun(path=run_file)
    for payload in iter_payloads(run_file.read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.project, run.run_id, run.name = record.run.project, record.run.run_id, record.run.display_name
            run.group, run.job_type = record.run.run_group or None, record.run.job_type or None
            _merge(run.config, _items(record.run.config.update))
        elif kind == "config":
            _merge(run.config, _items(record.config.update))
        elif kind == "summary":
            _merge(run.summary, _items(record.summary.update))
            for item in record.summary.remove:
                run.summary.pop(item.key, None)
        elif kind == "history":
            run.history.append(_items(record.history.item))
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a .wandb file, a run folder, or a folder of runs (newest is read)")
    args = parser.parse_args(argv)
    run = read_offline_run(args.run)
    print(f"{run.path} (project {run.project}, run {run.run_id}, group {run.group}, job_type {run.job_type})")
    for key, value in sorted(run.summary.items()):
        if not key.startswith("_"):
            print(f"  {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
