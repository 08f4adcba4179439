"""Sections: duplicates dropped, each method's configurations split (or merged on request)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from src.results.records import flatten
from src.results.report.reading import Loaded

MAX_LISTED = 20  # error records / malformed lines listed one by one; the rest is counted


@dataclass
class Config:
    """One configuration (settings) of a method within a section."""

    key: str  # fingerprint_id, or the derived signature of records written before fingerprints
    fields: dict[str, Any]  # flattened settings ("target.dtype": "float32")
    label: str = ""  # its row label: the method key, or "<method> #<n>" when the method is split
    records: int = 0


@dataclass
class Section:
    """The records of one report section (all files, or one side of --compare)."""

    loaded: list[Loaded]
    records: list[dict[str, Any]]  # deduplicated; "method" holds the row label
    duplicate_lines: list[list[int]]  # per file of ``loaded``: lines of records counted once already
    configs: dict[str, list[Config]]  # method key -> its configurations, first seen first
    merged: bool  # --merge-configs: one row per method whatever its configurations


def drop_duplicates(loaded: list[Loaded]) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """Records after the first with the same (run_id, resume_key, status) - a file appended twice, or the same
    file passed twice - are dropped; returns (kept records, per file the lines dropped)."""
    seen: set[tuple[str, str, str]] = set()
    kept, dropped = [], []
    for one in loaded:
        dropped.append([])
        for record in one.records:
            identity = (record.get("run_id"), record.get("resume_key"), record["status"])
            if not all(isinstance(part, str) for part in identity):
                kept.append(record)  # without both ids a record cannot be told from a rerun: keep it
            elif identity in seen:
                dropped[-1].append(record["_line"])
            else:
                seen.add(identity)
                kept.append(record)
    return kept, dropped


def _model_settings(info: Any) -> dict[str, Any] | None:
    if not isinstance(info, dict):
        return None
    return {key: info.get(key) for key in ("name", "dtype", "quantization")}


def settings_of(record: dict[str, Any], legacy: bool) -> tuple[str, dict[str, Any]]:
    """(grouping key, flattened settings): the record's fingerprint, or with ``legacy`` (a method some of
    whose records predate fingerprints) its params and the target's / draft's name, dtype and quantization."""
    if legacy:
        fields = flatten({"params": record.get("params"), "target": _model_settings(record.get("target")),
                          "draft": _model_settings(record.get("draft"))})
        return json.dumps(fields, sort_keys=True, default=str), fields
    fingerprint = record.get("fingerprint") if isinstance(record.get("fingerprint"), dict) else {}
    return record["fingerprint_id"], {"fingerprint_id": record["fingerprint_id"]} | flatten(fingerprint)


def split_configs(records: list[dict[str, Any]], merge: bool) -> tuple[list, dict[str, list[Config]]]:
    """Copies of ``records`` whose "method" is their configuration's row label, and method -> configs."""
    # a method compares on what all its records carry: the fingerprint, unless one of them has none
    legacy = {r["method"] for r in records if not isinstance(r.get("fingerprint_id"), str)}
    configs: dict[str, dict[str, Config]] = {}
    keys = []
    for record in records:
        key, fields = settings_of(record, record["method"] in legacy)
        config = configs.setdefault(record["method"], {}).setdefault(key, Config(key, fields))
        config.records += 1
        keys.append(key)
    for method, found in configs.items():
        for number, config in enumerate(found.values(), start=1):
            config.label = f"{method} #{number}" if len(found) > 1 and not merge else method
    labelled = [r | {"method": configs[r["method"]][key].label} for r, key in zip(records, keys)]
    return labelled, {method: list(found.values()) for method, found in configs.items()}


def make_section(loaded: list[Loaded], merge: bool) -> Section:
    kept, duplicate_lines = drop_duplicates(loaded)
    records, configs = split_configs(kept, merge)
    return Section(loaded, records, duplicate_lines, configs, merge)


_ABSENT = object()  # a settings field one configuration lacks


def _settings_value(value: Any, limit: int = 40) -> str:
    if value is _ABSENT:
        return "(absent)"
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def differing_fields(configs: list[Config]) -> list[str]:
    """``field: value1 vs value2`` (configuration order) for each settings field that differs between them."""
    lines = []
    for key in dict.fromkeys(k for config in configs for k in config.fields):
        values = [config.fields.get(key, _ABSENT) for config in configs]
        # compared in full: the values shown are shortened
        if len({None if v is _ABSENT else json.dumps(v, sort_keys=True, default=str) for v in values}) > 1:
            lines.append(f"{key}: " + " vs ".join(_settings_value(v) for v in values))
    return lines


def duplicate_warning(section: Section) -> str | None:
    pairs = [(one, lines) for one, lines in zip(section.loaded, section.duplicate_lines) if lines]
    if not pairs:
        return None
    count = sum(len(lines) for _, lines in pairs)
    listed = "; ".join(f"{one.path} lines {line_list(lines)}" for one, lines in pairs)
    return f"warning: {count} duplicated records (same run_id, resume_key) counted once: {listed}"


def prompt_key(record: dict[str, Any]) -> tuple[str, str, str]:
    return str(record.get("dataset")), str(record.get("prompt_id")), str(record.get("turn"))


def pooled_prompts_warning(section: Section) -> str | None:
    """Records of one (dataset, prompt_id, turn) made from different prompt texts (``prompt_sha``): two prompt
    files of the same name, or one edited between runs, pooled in one section."""
    texts: dict[tuple[str, str, str], set[str]] = {}
    for record in section.records:
        if record.get("prompt_sha"):
            texts.setdefault(prompt_key(record), set()).add(record["prompt_sha"])
    differing = sorted(key for key, shas in texts.items() if len(shas) > 1)
    if not differing:
        return None
    listed = ", ".join("/".join(key) for key in differing[:MAX_LISTED])
    more = f" and {len(differing) - MAX_LISTED} more" if len(differing) > MAX_LISTED else ""
    return (f"warning: {len(differing)} prompts (dataset/prompt_id/turn) were decoded from different texts and are "
            f"pooled here: {listed}{more}: report the files of each prompt set apart (or rename one set's file)")


def line_list(lines: list[int]) -> str:
    more = len(lines) - MAX_LISTED
    return ", ".join(map(str, lines[:MAX_LISTED])) + (f" and {more} more" if more > 0 else "")
