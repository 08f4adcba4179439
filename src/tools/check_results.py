"""Validate a results JSONL file against the record contract.

    python -m src.tools.check_results datasets/results.jsonl [--strict]

Prints line-numbered problems and one summary line per method; exits 1 on any problem. ``--strict`` also
checks cross-field consistency (counts add up, ratios match their parts, one ``ok`` record per resume key)
and the method-specific and system fields.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

NUMBER = (int, float)
COMMON_FIELDS: dict[str, tuple] = {
    "run_id": (str,),
    "resume_key": (str,),
    "status": (str,),
    "method": (str,),
    "dataset": (str,),
    "prompt_id": (str,),
    "category": (str,),
    "turn": (int,),
    "params": (dict,),
    "target": (dict,),
    "system": (dict,),
}
OK_FIELDS: dict[str, tuple] = {
    "new_tokens": (int,),
    "prefill_s": NUMBER,
    "decode_s": NUMBER,
    "wall_s": NUMBER,
    "tokens_per_s": NUMBER + (type(None),),
    "target_calls": (int,),
    "draft_calls": (int,),
    "tokens_per_target_call": NUMBER + (type(None),),
    "drafted_tokens": (int,),
    "accepted_tokens": (int,),
    "acceptance_rate": NUMBER + (type(None),),
    "accepted_per_position": (list,),
    "speedup": NUMBER + (type(None),),
    "matches_baseline": (bool, type(None)),
    "first_divergence": (int, type(None)),
    "text": (str,),
}
SYSTEM_FIELDS = ("git_sha", "hostname", "python", "torch", "transformers", "lightning", "device", "gpu_name",
                 "gpu_driver", "cuda", "cpu", "num_threads", "timestamp")
METHOD_FIELDS = {
    "specexec": ("tree_size_mean", "tree_depth_mean", "max_active_branches", "branch_prune_rate",
                 "effective_parallelism"),
    "autojudge": ("judge_accepted", "exact_accepted_tokens", "answer", "answer_correct"),
}


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
        elif isinstance(record[name], bool) and bool not in types:
            problems.append(f"{name}={record[name]!r} should be {_type_names(types)}")
        elif not isinstance(record[name], types):
            problems.append(f"{name}={record[name]!r} should be {_type_names(types)}")
    if problems:
        return problems
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


def _check_consistency(record: dict[str, Any]) -> list[str]:
    problems = []
    if record["accepted_tokens"] > record["drafted_tokens"]:
        problems.append(f"accepted_tokens={record['accepted_tokens']} exceeds drafted_tokens={record['drafted_tokens']}")
    expected = record["new_tokens"] / record["target_calls"]
    if record["tokens_per_target_call"] is None or abs(record["tokens_per_target_call"] - expected) > 1e-6:
        problems.append(f"tokens_per_target_call={record['tokens_per_target_call']} != new_tokens/target_calls={expected:.6g}")
    if abs(record["prefill_s"] + record["decode_s"] - record["wall_s"]) > 1e-3 * max(1.0, record["wall_s"]):
        problems.append(f"wall_s={record['wall_s']} != prefill_s + decode_s")
    if record["matches_baseline"] is False and record["first_divergence"] is None:
        problems.append("matches_baseline is false but first_divergence is null")
    missing_system = [k for k in SYSTEM_FIELDS if k not in record["system"]]
    if missing_system:
        problems.append(f"system lacks {missing_system}")
    for name in METHOD_FIELDS.get(record["method"].split("[")[0], ()):
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


def check_file(path: Path, strict: bool) -> tuple[list[str], dict[str, dict[str, int]]]:
    problems: list[str] = []
    summary: dict[str, dict[str, int]] = defaultdict(lambda: {"ok": 0, "error": 0})
    ok_keys: dict[str, int] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        problems.append(f"{path}: the file is empty")
    for line_number, line in enumerate(lines, start=1):
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
        method = record.get("method", "?")
        status = record.get("status")
        summary[method]["ok" if status == "ok" else "error"] += 1
        if strict and status == "ok" and isinstance(record.get("resume_key"), str):
            key = record["resume_key"]
            if key in ok_keys:
                problems.append(f"{path}:{line_number}: resume_key {key!r} already ok on line {ok_keys[key]}")
            ok_keys[key] = line_number
    return problems, dict(summary)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.tools.check_results", description=__doc__.split("\n")[1])
    parser.add_argument("path", type=Path, help="a results JSONL file")
    parser.add_argument("--strict", action="store_true", help="also check cross-field consistency")
    args = parser.parse_args(argv)
    if not args.path.is_file():
        print(f"error: results file {args.path} does not exist", file=sys.stderr)
        return 1
    problems, summary = check_file(args.path, args.strict)
    for problem in problems:
        print(problem)
    for method, counts in sorted(summary.items()):
        print(f"{method}: {counts['ok']} ok, {counts['error']} error")
    print(f"{len(problems)} problem(s) in {args.path}" if problems else f"{args.path}: valid")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
