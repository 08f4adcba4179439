"""Spec-Bench answer files from results records: what ``evaluation/speed.py`` and ``evaluation/equal.py`` of
Spec-Bench (github.com/hemingkx/Spec-Bench) read, written from ``python -m src predict`` records.

    python -m src.tools.spec_bench_export RESULTS.jsonl [MORE.jsonl ...] --out DIR [--dataset NAME]

One file per method, the baseline included, and per configuration: ``DIR/<model_id>.jsonl``, where
``model_id`` is ``<target>-<method>-<dtype>-temp-<temperature>`` the way Spec-Bench names its answer files
(``vicuna-7b-v1.3-sps-68m-float16-temp-0.0``): ``<target>`` is the last part of the target's name, ``<method>``
the method key with every run of other characters than letters, digits, ``.`` and ``_`` spelt ``-``
(``speculative[k=4]`` -> ``speculative-k-4``), ``<dtype>`` the target's dtype (and its quantization, if any),
``<temperature>`` the sampling temperature. A method whose records hold several configurations (fingerprints)
gets one file per configuration, ``<method>-config<n>``, numbered as ``python -m src.report`` numbers its rows
``<method> #<n>`` (the same split: :func:`src.results.report.sections.split_configs`). A file of the same name in
DIR is replaced; other files are left alone.

Each line is one question (one ``prompt_id``), as Spec-Bench's ``gen_model_answer`` scripts write it::

    {"question_id", "category", "answer_id", "model_id", "tstamp",
     "choices": [{"index": 0, "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"}]}

- ``turns``, ``decoding_steps``, ``new_tokens``, ``wall_time``: one entry per turn, in turn order: the record's
  ``text``, ``target_calls`` (target forwards, the prefill included), ``new_tokens`` and ``wall_s`` (prefill +
  decode, the whole generate call as Spec-Bench times it);
- ``accept_lengths``: the tokens each verification cycle emitted (accepted drafts + the target's own token), all
  turns one after another: ``acceptance_histogram`` expanded, ``i + 1`` repeated ``h[i]`` times in ascending
  order. The records keep counts, not the per-cycle sequence; neither script depends on the order (speed.py takes
  the mean, equal.py does not read the field). A record without cycles (the baseline) gets ``[1] * new_tokens``,
  Spec-Bench's own baseline convention; a draft method's record written before records carried the histogram
  gets ``[]`` (a warning says so);
- ``question_id``: the prompt id, an int when every prompt id is a decimal number (as in Spec-Bench's
  question.jsonl); ``answer_id``: a hash of the records' resume keys (the same input gives the same files);
  ``tstamp``: the last turn's ``system.timestamp`` in seconds (null without one).

Which questions: those where every exported method has an ok record for every turn recorded for the question (the
last ok record of a turn wins), in Spec-Bench's order (sorted by question id). Every file thus lists the same
questions in the same order: equal.py compares two files line by line, and speed.py's speedup compares the same
questions. The others are left out with a warning naming them.

What speed.py computes from these files: per question, tokens/s = sum ``new_tokens`` / sum ``wall_time`` over its
turns; per method the mean over questions, and the speedup = that mean over the baseline file's mean. With one
turn per question the method's figure is our ``tokens_per_s_mean``. For the baseline file speed.py counts tokens
by re-tokenizing ``turns`` (``len(tokenizer(text).input_ids) - 1`` per turn: one BOS assumed), not by
``new_tokens``: our text is decoded without special tokens, so an EOS is not counted, and a tokenizer without BOS
counts one token less per turn. Its "mean accepted tokens" = the mean of all ``accept_lengths`` = sum((i + 1) h[i])
/ sum(h[i]) over the file's records: vLLM's ``mean_acceptance_length``, pooled over cycles.

No torch, no Lightning (the results layer): :func:`export` is what the tool calls.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from src.errors import (
    InvalidParameterError,
    MalformedInputError,
    MissingInputError,
    OutputNotWritableError,
    is_positive_int,
)
from src.results.report.reading import read_results
from src.results.report.sections import make_section
from src.results.report.stats import method_of, method_order, natural_key

MAX_NAMED = 10  # question ids named one by one in a warning; the rest is counted


@dataclass
class AnswerFile:
    """One Spec-Bench answer file: a method (or one configuration of it) over the exported questions."""

    model_id: str  # the file stem, also every line's model_id
    label: str  # the row label of src.report: the method key, or "<method> #<n>"
    lines: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Export:
    files: list[AnswerFile]
    warnings: list[str]


def slug(text: str) -> str:
    """``speculative[k=4]+prompt_lookup`` -> ``speculative-k-4-prompt_lookup``: safe in a file name and a shell."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-")


def model_id(label: str, record: dict[str, Any]) -> str:
    """``<target>-<method>[-config<n>]-<dtype>-temp-<temperature>`` (see the module docstring)."""
    target = record.get("target") if isinstance(record.get("target"), dict) else {}
    name = str(target.get("name") or "model").rstrip("/").split("/")[-1]
    method, _, config = label.partition(" #")
    parts = [slug(name), slug(method)] + ([f"config{config}"] if config else [])
    if target.get("dtype"):
        parts.append(slug(str(target["dtype"])))
    if target.get("quantization") not in (None, "none"):
        parts.append(slug(str(target["quantization"])))
    params = record.get("params") if isinstance(record.get("params"), dict) else {}
    temperature = params.get("temperature")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        parts.append(f"temp-{float(temperature)}")
    return "-".join(parts)


def accept_lengths(record: dict[str, Any]) -> list[int] | None:
    """Tokens emitted per verification cycle (see the module docstring); None: an older draft record without the
    histogram."""
    histogram = record.get("acceptance_histogram")
    if isinstance(histogram, list) and histogram:
        return [accepted + 1 for accepted, cycles in enumerate(histogram) for _ in range(int(cycles))]
    if not record.get("drafted_tokens"):
        return [1] * int(record.get("new_tokens") or 0)  # one token per target step
    return None


def _timestamp(record: dict[str, Any]) -> float | None:
    system = record.get("system") if isinstance(record.get("system"), dict) else {}
    try:
        return datetime.fromisoformat(str(system.get("timestamp"))).timestamp()
    except ValueError:
        return None


def _answer_line(question_id: Any, turns: list[dict[str, Any]], file_model_id: str) -> tuple[dict[str, Any], bool]:
    """One Spec-Bench line from a question's ok records in turn order; and whether an accept_lengths is missing."""
    lengths, missing = [], False
    for record in turns:
        found = accept_lengths(record)
        missing |= found is None
        lengths += found or []
    keys = "\n".join(str(r.get("resume_key") or f"{r.get('_file')}:{r.get('_line')}") for r in turns)
    line = {
        "question_id": question_id,
        "category": turns[0].get("category"),
        "answer_id": hashlib.sha1(keys.encode()).hexdigest()[:22],
        "model_id": file_model_id,
        "choices": [{
            "index": 0,
            "turns": [r.get("text") for r in turns],
            "decoding_steps": [r.get("target_calls") for r in turns],
            "new_tokens": [r.get("new_tokens") for r in turns],
            "wall_time": [r.get("wall_s") for r in turns],
            "accept_lengths": lengths,
        }],
        "tstamp": _timestamp(turns[-1]),
    }
    return line, missing


def _named(ids: list[str]) -> str:
    more = len(ids) - MAX_NAMED
    return ", ".join(ids[:MAX_NAMED]) + (f" and {more} more" if more > 0 else "")


def _pick_dataset(records: list[dict[str, Any]], dataset: str | None, paths: str) -> str:
    found = sorted({str(r.get("dataset")) for r in records if r["status"] == "ok"}, key=natural_key)
    if not found:
        raise MalformedInputError(f"{paths} holds no ok record: nothing to export; pass a results JSONL written "
                                  "by python -m src predict (python -m src.tools.check_results lists its records)")
    if dataset is None and len(found) > 1:
        raise InvalidParameterError(f"{paths} holds {len(found)} datasets ({', '.join(found)}): Spec-Bench keeps "
                                    "one question set per folder; pass --dataset NAME to export one")
    if dataset is not None and dataset not in found:
        raise InvalidParameterError(f"--dataset {dataset} has no ok record in {paths}: use one of {', '.join(found)}")
    return dataset if dataset is not None else found[0]


Answers = dict[str, dict[str, dict[int, dict[str, Any]]]]  # row label -> prompt id -> turn -> its ok record


def _collect(records: list[dict[str, Any]]) -> tuple[Answers, dict[str, set[int]]]:
    """The ok records by label, prompt and turn (the last ok record of a turn wins), and every turn recorded for
    each prompt, ok or not."""
    answers: Answers = defaultdict(lambda: defaultdict(dict))
    turns_of: dict[str, set[int]] = defaultdict(set)
    for record in records:
        question, turn = str(record.get("prompt_id")), record["turn"]
        turns_of[question].add(turn)
        if record["status"] == "ok":
            answers[record["method"]][question][turn] = record
    return answers, turns_of


def _common_questions(answers: Answers, turns_of: dict[str, set[int]], labels: list[str]) -> tuple[list[str], str]:
    """The prompts every label has all turns of, in Spec-Bench's order; and a warning naming the others ("")."""
    complete = {label: {q for q, turns in answers[label].items() if set(turns) == turns_of[q]} for label in labels}
    common = set.intersection(*complete.values())
    questions = sorted(common, key=int if all(q.isdecimal() for q in common) else natural_key)
    lacking = [f"{label} lacks {_named(sorted(set(turns_of) - complete[label], key=natural_key))}"
               for label in labels if set(turns_of) - complete[label]]
    if not lacking:
        return questions, ""
    return questions, (f"warning: {len(set(turns_of) - common)} question(s) left out of every file (not every "
                       f"method has all their turns ok; equal.py compares files line by line): {'; '.join(lacking)}")


def build(paths: list[Path], dataset: str | None = None) -> Export:
    """The answer files of the results files ``paths`` (one dataset of them), without writing anything."""
    for path in paths:
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise MissingInputError(f"results file {path} {what}: pass the path of a results JSONL written by "
                                    "python -m src predict")
    loaded = [read_results(path) for path in paths]  # duplicates dropped and configurations split as the report
    section = make_section(loaded, merge=False)
    names = ", ".join(map(str, paths))
    chosen = _pick_dataset(section.records, dataset, names)
    mine = [r for r in section.records if str(r.get("dataset")) == chosen]
    records = [r for r in mine if is_positive_int(r.get("turn"))]
    warnings = [f"warning: {len(mine) - len(records)} record(s) without a turn number left out"
                ] if len(records) < len(mine) else []
    answers, turns_of = _collect(records)
    labels = [label for label in method_order(records) if label in answers]
    failed = [label for label in method_order(records) if label not in answers]
    if failed:
        warnings.append(f"warning: no ok record of {', '.join(failed)} in {chosen}: no answer file for it")
    questions, left_out = _common_questions(answers, turns_of, labels)
    if not questions:
        raise MalformedInputError(f"no question of {chosen} in {names} has every turn ok for every method "
                                  f"({', '.join(labels)}): nothing to compare; export records of methods that "
                                  "ran the same prompts")
    warnings += [left_out] if left_out else []
    if not any(method_of(label) == "baseline" for label in labels):
        warnings.append("warning: no baseline record: speed.py needs a baseline answer file (--base-path)")
    numeric = all(q.isdecimal() for q in questions)
    files: list[AnswerFile] = []
    for label in labels:
        base = stem = model_id(label, next(iter(answers[label][questions[0]].values())))
        while stem in {f.model_id for f in files}:  # two keys that differ only in punctuation
            stem = f"{base}-{len(files)}"
        answer_file, without = AnswerFile(stem, label), 0
        for question in questions:
            turns = [answers[label][question][turn] for turn in sorted(answers[label][question])]
            line, missing = _answer_line(int(question) if numeric else question, turns, stem)
            answer_file.lines.append(line)
            without += missing
        if without:
            warnings.append(f"warning: {label}: {without} question(s) with records written before sp-samp recorded "
                            "acceptance_histogram: their accept_lengths are empty (speed.py's mean accepted "
                            "tokens leaves them out)")
        files.append(answer_file)
    return Export(files, warnings)


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputNotWritableError(f"--out {out} is a file: give a folder for the answer files, e.g. "
                                     f"{out.parent / 'spec_bench'}")


def write(export: Export, out: Path) -> list[Path]:
    """Write each answer file into ``out`` (created if needed); returns their paths."""
    check_out(out)
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for answer_file in export.files:
            path = out / f"{answer_file.model_id}.jsonl"
            path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in answer_file.lines),
                            encoding="utf-8")
            written.append(path)
    except OSError as error:
        raise OutputNotWritableError(f"cannot write the answer files to {out} ({error.strerror}): choose another "
                                     "--out") from error
    return written


def export(paths: list[Path], out: Path, dataset: str | None = None) -> tuple[Export, list[Path]]:
    """Read ``paths``, build the answer files, write them into ``out``."""
    check_out(out)  # before reading: a wrong --out fails at once
    built = build(paths, dataset)
    return built, write(built, out)
