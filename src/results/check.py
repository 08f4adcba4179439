"""Validate a results JSONL file against the record contract.

    python -m src.tools.check_results datasets/results.jsonl [--strict]

Prints line-numbered problems and one summary line per method; exits 1 on any problem, 2 when the file
cannot be read as text (missing, a directory, binary or not UTF-8). ``--strict`` also checks cross-field
consistency (counts add up, ratios match their parts, one ``ok`` record per resume key, a fingerprint that
repeats the record's method and params, one fingerprint per ``fingerprint_id``) and the method-specific and
system fields.

``fingerprint`` (dict) and ``fingerprint_id`` (10 hex characters) are optional: files written before runs
recorded their fingerprint lack both; a record with one of them needs the other.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.jsonl import UnreadableFileError, jsonl_lines, read_text
from src.results.schema import METHOD_FIELDS, NUMBER, fields_of, method_family


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose argument errors are the house's one line (``error: <problem>: <fix>``, exit status 2)
    instead of a usage block before it; ``--help`` still prints the usage. Shared by the tools' command lines
    (check_results, report, tune, spec_bench_export): it lives here, in the torch-free layer they all import."""

    def error(self, message: str):
        self.exit(2, f"error: {message}: see `{self.prog} --help`\n")


COMMON_FIELDS = fields_of("common")
OK_FIELDS = fields_of("ok")
OPTIONAL_FIELDS = fields_of("optional")  # absent in older files, or only in some runs; typed where present
FINGERPRINT_KEYS = ("method", "params", "target", "draft", "prompt", "files")
FINGERPRINT_ID = re.compile(r"[0-9a-f]{10}")
SYSTEM_FIELDS = ("git_sha", "hostname", "python", "torch", "transformers", "lightning", "device", "gpu_name",
                 "gpu_driver", "cuda", "cpu", "num_threads", "timestamp")


def _type_names(types: tuple) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def check_record(record: dict[str, Any], strict: bool) -> list[str]:
    problems = []
    fields = dict(COMMON_FIELDS)
    if record.get("status") == "ok":
        fields.update(OK_FIELDS)
    for name, types in fields.items():
        if name not in record:
            problems.append(f"missing field {name!r}")
        else:
            problems += _check_type(record, name, types)
    for name, types in OPTIONAL_FIELDS.items():
        if name in record:
            problems += _check_type(record, name, types)
    if problems:
        return problems
    problems += _check_fingerprint(record, strict)
    status = record["status"]
    if status not in ("ok", "error"):
        return [f"status={status!r} should be 'ok' or 'error'"]
    if record["turn"] < 1:
        problems.append(f"turn={record['turn']} should be >= 1")
    if status == "error":
        error = record.get("error")
        if not isinstance(error, dict) or not {"type", "message", "traceback"} <= error.keys():
            problems.append("an error record needs error = {type, message, traceback}")
        return problems
    if record.get("error") is not None:
        problems.append("an ok record must have error = null")
    for name in ("new_tokens", "draft_calls", "drafted_tokens", "accepted_tokens"):
        if record[name] < 0:
            problems.append(f"{name}={record[name]} should be >= 0")
    if record["target_calls"] < 1:
        problems.append(f"target_calls={record['target_calls']} should be >= 1")
    for name in ("prefill_s", "decode_s", "wall_s"):
        if record[name] < 0:
            problems.append(f"{name}={record[name]} should be >= 0")
    for name in ("tokens_per_s", "tokens_per_target_call", "speedup"):
        if record[name] is not None and record[name] <= 0:
            problems.append(f"{name}={record[name]} should be > 0")
    rate = record["acceptance_rate"]
    if rate is not None and not 0 <= rate <= 1:
        problems.append(f"acceptance_rate={rate} should be in [0, 1]")
    for i, value in enumerate(record["accepted_per_position"]):
        if value is not None and not (isinstance(value, NUMBER) and 0 <= value <= 1):
            problems.append(f"accepted_per_position[{i}]={value!r} should be in [0, 1]")
    if strict:
        problems += _check_consistency(record)
    return problems


def _check_type(record: dict[str, Any], name: str, types: tuple) -> list[str]:
    value = record[name]
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        return [f"{name}={value!r} should be {_type_names(types)}"]
    return []


def _check_fingerprint(record: dict[str, Any], strict: bool) -> list[str]:
    """Both fields or neither; strict: the fingerprint has its sections and repeats the method and params."""
    if ("fingerprint" in record) != ("fingerprint_id" in record):
        present, absent = sorted(("fingerprint", "fingerprint_id"), key=lambda name: name not in record)
        return [f"{present} without {absent}: a record carries both or neither"]
    if "fingerprint" not in record:
        return []
    problems = []
    if not FINGERPRINT_ID.fullmatch(record["fingerprint_id"]):
        problems.append(f"fingerprint_id={record['fingerprint_id']!r} should be 10 lowercase hex characters")
    fingerprint = record["fingerprint"]
    if strict:
        missing = [k for k in FINGERPRINT_KEYS if k not in fingerprint]
        if missing:
            problems.append(f"fingerprint lacks {missing}")
        # an `auto` parameter: the fingerprint keeps `auto`, params the value chosen at run start (auto_choice)
        chosen = (record.get("auto_choice") or {}).get("values") or {}
        expected = {"method": fingerprint.get("method"),
                    "params": {**fingerprint["params"], **chosen} if isinstance(fingerprint.get("params"), dict)
                    else fingerprint.get("params")}
        for name in ("method", "params"):
            if name in fingerprint and expected[name] != record[name]:
                problems.append(f"fingerprint.{name}={fingerprint[name]!r} != {name}={record[name]!r}")
    return problems


def _check_consistency(record: dict[str, Any]) -> list[str]:
    problems = []
    if record["accepted_tokens"] > record["drafted_tokens"]:
        problems.append(f"accepted_tokens={record['accepted_tokens']} exceeds drafted_tokens={record['drafted_tokens']}")
    expected = record["new_tokens"] / record["target_calls"]
    if record["tokens_per_target_call"] is None or abs(record["tokens_per_target_call"] - expected) > 1e-6:
        problems.append(f"tokens_per_target_call={record['tokens_per_target_call']} != new_tokens/target_calls={expected:.6g}")
    if abs(record["prefill_s"] + record["decode_s"] - record["wall_s"]) > 1e-3 * max(1.0, record["wall_s"]):
        problems.append(f"wall_s={record['wall_s']} != prefill_s + decode_s")
    split = [record.get(name) for name in ("target_s", "draft_s", "other_s")]
    if all(isinstance(value, NUMBER) for value in split):
        if abs(sum(split) - record["wall_s"]) > 1e-3 * max(1.0, record["wall_s"]):
            problems.append(f"target_s + draft_s + other_s = {sum(split):.6g} != wall_s={record['wall_s']}")
        if min(split) < -1e-6:
            problems.append(f"a time split share is negative: target_s, draft_s, other_s = {split}")
    if record.get("divergence_class") == "mismatch":  # a near tie is rounding; a mismatch is a wrong token
        problems.append(f"greedy output leaves the baseline's at token {record['first_divergence']} with a target "
                        f"margin of {record.get('divergence_margin')} logits (> tolerance "
                        f"{record.get('divergence_tolerance')}): a mismatch, not a near tie")
    if record["matches_baseline"] is False and record["first_divergence"] is None:
        problems.append("matches_baseline is false but first_divergence is null")
    missing_system = [k for k in SYSTEM_FIELDS if k not in record["system"]]
    if missing_system:
        problems.append(f"system lacks {missing_system}")
    for name in METHOD_FIELDS.get(method_family(record["method"]), ()):
        if name not in record:
            problems.append(f"missing {record['method']} field {name!r}")
    if "judge_accepted" in record and "exact_accepted_tokens" in record:
        # every accepted draft was either an exact match (before the cycle's first mismatch) or let through
        if record["judge_accepted"] + record["exact_accepted_tokens"] > record["accepted_tokens"]:
            problems.append(
                f"judge_accepted={record['judge_accepted']} + exact_accepted_tokens={record['exact_accepted_tokens']}"
                f" exceeds accepted_tokens={record['accepted_tokens']}"
            )
    if record.get("answer_correct") not in (None, True, False):
        problems.append(f"answer_correct={record['answer_correct']!r} should be true, false or null")
    return problems


@dataclass
class _Seen:
    """What --strict remembers across lines."""

    ok_keys: dict[str, int] = field(default_factory=dict)  # resume_key -> line of its ok record
    by_id: dict[str, tuple[str, int]] = field(default_factory=dict)  # fingerprint_id -> (JSON, line)
    by_fingerprint: dict[str, tuple[str, int]] = field(default_factory=dict)  # fingerprint JSON -> (id, line)


def _check_across(record: dict[str, Any], line_number: int, seen: _Seen) -> list[str]:
    problems = []
    key = record.get("resume_key")
    if record.get("status") == "ok" and isinstance(key, str):
        if key in seen.ok_keys:
            problems.append(f"resume_key {key!r} already ok on line {seen.ok_keys[key]}")
        seen.ok_keys[key] = line_number
    fingerprint_id, fingerprint = record.get("fingerprint_id"), record.get("fingerprint")
    if isinstance(fingerprint_id, str) and isinstance(fingerprint, dict):
        # the id names one configuration: one id per fingerprint and one fingerprint per id
        text = json.dumps(fingerprint, sort_keys=True)
        first_text, first_line = seen.by_id.setdefault(fingerprint_id, (text, line_number))
        if first_text != text:
            problems.append(f"fingerprint_id {fingerprint_id!r} has another fingerprint on line {first_line}")
        first_id, first_line = seen.by_fingerprint.setdefault(text, (fingerprint_id, line_number))
        if first_id != fingerprint_id:
            problems.append(f"fingerprint_id {fingerprint_id!r}, but the same fingerprint on line "
                            f"{first_line} has {first_id!r}")
    return problems


def check_file(path: Path, strict: bool) -> tuple[list[str], dict[str, dict[str, int]]]:
    problems: list[str] = []
    summary: dict[str, dict[str, int]] = defaultdict(lambda: {"ok": 0, "error": 0})
    seen = _Seen()
    text = read_text(path)
    if not text:
        problems.append(f"{path}: the file is empty")
    for line_number, line in enumerate(jsonl_lines(text), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"{path}:{line_number}: not valid JSON ({error.msg}; a truncated line?)")
            continue
        if not isinstance(record, dict):
            problems.append(f"{path}:{line_number}: a record must be a JSON object")
            continue
        problems += [f"{path}:{line_number}: {p}" for p in check_record(record, strict)]
        method = record["method"] if isinstance(record.get("method"), str) else "?"
        summary[method]["ok" if record.get("status") == "ok" else "error"] += 1
        if strict:
            problems += [f"{path}:{line_number}: {p}" for p in _check_across(record, line_number, seen)]
    return problems, dict(summary)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="python -m src.tools.check_results", description=__doc__.split("\n")[0])
    parser.add_argument("path", type=Path, help="a results JSONL file")
    parser.add_argument("--strict", action="store_true", help="also check cross-field consistency")
    args = parser.parse_args(argv)
    try:
        problems, summary = check_file(args.path, args.strict)
    except UnreadableFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem)
    for method, counts in sorted(summary.items()):
        print(f"{method}: {counts['ok']} ok, {counts['error']} error")
    print(f"{len(problems)} problem(s) in {args.path}" if problems else f"{args.path}: valid")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
