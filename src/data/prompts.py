"""Prompt sources and chat formatting.

Formats (``format: auto`` detects them line by line):

- ``mt_bench``: MT-Bench / Spec-Bench, ``{"question_id", "category", "turns": [...], "reference": [...]?}``;
- ``gsm8k``: ``{"question", "answer"}`` where the answer ends in ``#### <number>`` (kept as the reference; the
  normalized number becomes the prompt's gold ``answer``);
- ``jsonl``: any JSON object with a text field (``text_field``, default ``prompt``) and optional
  ``id`` / ``category`` / ``answer`` fields.

Sources:

- a JSONL file in one of these formats;
- a hub dataset (``hub:<name>[:<config>]``, split from ``split``), read through the Hugging Face
  ``datasets`` library when it is installed (``pip install -e '.[hub]'``; the repository's own ``datasets/``
  folder does not hide it); its rows go through the same parsers;
- a built-in generated task (``synthetic:arithmetic[:train|test]``, see :mod:`src.data.tasks`): seeded
  arithmetic word problems with known answers, no download needed.

A prompt's ``answer`` is its gold final answer (None when the source has none, e.g. MT-Bench), checked with
:func:`src.data.answers.answers_match`.
"""

from __future__ import annotations

import importlib
import json
import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from src.data.answers import extract_answer, normalize_number
from src.errors import InvalidParameterError, MalformedInputError, MissingInputError

MT_BENCH_HINT = "`make setup` puts MT-Bench into datasets/mt_bench.jsonl"
HUB_PREFIX = "hub:"
PromptFormat = Literal["auto", "mt_bench", "gsm8k", "jsonl"]


@dataclass
class Prompt:
    prompt_id: str
    category: str
    turns: list[str]
    dataset: str
    reference: list[str] = field(default_factory=list)
    answer: str | None = None  # the gold final answer (normalized when numeric), for tasks that have one


def gsm8k_final_answer(answer: str) -> str | None:
    """The normalized number after ``####`` in a GSM8K answer (``#### 1,000`` -> ``1000``)."""
    return extract_answer(answer, "gsm8k")


def gold_answer(value: Any) -> str | None:
    """A row's ``answer`` field: normalized when it is a number, else the stripped text (None when absent)."""
    if value is None or not str(value).strip():
        return None
    return normalize_number(str(value)) or str(value).strip()


def check_turns_have_text(prompt_id: str, turns: list[str]) -> None:
    """An empty (or blank) turn gives the model nothing to answer: its record would be an "ok" made of noise."""
    for number, turn in enumerate(turns, start=1):
        if not turn.strip():
            raise ValueError(f"turn {number} of prompt {prompt_id!r} is empty: give it text or remove it")


def check_unique_ids(prompts: list[Prompt], places: list[str], source: str) -> None:
    """Refuse two prompts with one id: they would share one resume key, so a resume would skip the second as
    already done and the report would drop it as a duplicate. ``places[i]`` says where prompt i was read."""
    first_place: dict[str, str] = {}
    for prompt, place in zip(prompts, places):
        earlier = first_place.setdefault(prompt.prompt_id, place)
        if earlier != place:
            raise MalformedInputError(
                f"{place}: prompt id {prompt.prompt_id!r} is already used at {earlier}: give every prompt of "
                f"{source} its own id"
            )


def parse_row(row: dict[str, Any], index: int, dataset: str, fmt: PromptFormat, text_field: str) -> Prompt:
    if not isinstance(row, dict):
        raise TypeError(f"a prompt line must be a JSON object, got {type(row).__name__}")
    if fmt == "auto":
        fmt = "mt_bench" if "turns" in row else "gsm8k" if {"question", "answer"} <= row.keys() else "jsonl"
    if fmt == "mt_bench":
        turns = row["turns"]
        if isinstance(turns, str):
            turns = [turns]
        if not turns or not all(isinstance(t, str) for t in turns):
            raise ValueError("'turns' must be a non-empty list of strings")
        prompt_id = str(row["question_id"])
        check_turns_have_text(prompt_id, turns)
        return Prompt(
            prompt_id=prompt_id,
            category=str(row.get("category", "default")),
            turns=list(turns),
            dataset=dataset,
            reference=list(row.get("reference") or []),
            answer=gold_answer(row.get("answer")),
        )
    if fmt == "gsm8k":
        prompt_id = str(row.get("id", row.get("question_id", index)))
        check_turns_have_text(prompt_id, [str(row["question"])])
        return Prompt(
            prompt_id=prompt_id,
            category=str(row.get("category", "math")),
            turns=[str(row["question"])],
            dataset=dataset,
            reference=[str(row["answer"])],
            answer=gsm8k_final_answer(str(row["answer"])),
        )
    text = row[text_field]
    if not isinstance(text, str):
        raise ValueError(f"field {text_field!r} must be a string")
    prompt_id = str(row.get("id", row.get("question_id", index)))
    check_turns_have_text(prompt_id, [text])
    return Prompt(
        prompt_id=prompt_id,
        category=str(row.get("category", "default")),
        turns=[text],
        dataset=dataset,
        reference=[str(r) for r in (row.get("reference") or [])] if isinstance(row.get("reference"), list) else [],
        answer=gold_answer(row.get("answer")),
    )


def read_prompt_file(path: str | Path, fmt: PromptFormat = "auto", text_field: str = "prompt") -> list[Prompt]:
    """Read a JSONL prompt file; a bad line raises an error naming file and line.

    UTF-8, with or without a byte order mark (editors on Windows write one; it is read, not refused)."""
    path = Path(path)
    if path.is_dir():
        raise MissingInputError(f"prompt file {path} is a folder: pass the .jsonl file inside it, e.g. "
                                f"--data.path {path / 'prompts.jsonl'}")
    if not path.is_file():
        raise MissingInputError(f"prompt file {path} does not exist ({MT_BENCH_HINT}, or pass --data.path FILE)")
    prompts, places = [], []
    with path.open("rb") as handle:  # bytes: a line that is not UTF-8 is then named by its number
        for line_number, raw in enumerate(handle, start=1):
            line = _decode_line(raw, path, line_number)
            if not line.strip():
                continue
            try:
                prompts.append(parse_row(json.loads(line), line_number, path.stem, fmt, text_field))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                detail = f"missing field {error}" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
                raise MalformedInputError(
                    f"{path}:{line_number}: malformed prompt line ({detail}); expected format {fmt!r} "
                    '(MT-Bench: {"question_id", "category", "turns": [...]}; GSM8K: {"question", "answer"}; '
                    f"jsonl: {{{text_field!r}: ...}})"
                ) from error
            places.append(f"{path}:{line_number}")
    check_unique_ids(prompts, places, str(path))
    return prompts


def _decode_line(raw: bytes, path: Path, line_number: int) -> str:
    try:
        return raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
    except UnicodeDecodeError as error:
        raise MalformedInputError(
            f"{path}:{line_number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1}): "
            "save the file as UTF-8"
        ) from error


def _is_hf_datasets(module: Any) -> bool:
    return callable(getattr(module, "load_dataset", None))


def _shadows_datasets(entry: str) -> bool:
    """A ``sys.path`` entry holding a ``datasets/`` folder without ``__init__.py`` (a namespace package)."""
    folder = Path(entry or ".") / "datasets"  # "" stands for the current directory
    return folder.is_dir() and not (folder / "__init__.py").is_file()


def _try_import_datasets() -> Any:
    try:
        return importlib.import_module("datasets")
    except ImportError:
        return None


def import_hf_datasets(spec: str = "hub:...") -> Any:
    """The Hugging Face ``datasets`` package, also when running from the repository root.

    There the repository's own ``datasets/`` folder (prompt and result files, no ``__init__.py``) imports as
    a namespace package and hides the library; this drops it and imports again without such folders on
    ``sys.path`` (restored afterwards). Raises MissingInputError when the library is not installed.
    """
    module = _try_import_datasets()
    if _is_hf_datasets(module):
        return module
    sys.modules.pop("datasets", None)  # the cached namespace package would be returned again
    saved = list(sys.path)
    sys.path[:] = [entry for entry in saved if not _shadows_datasets(entry)]
    importlib.invalidate_caches()
    try:
        module = _try_import_datasets()
    finally:
        sys.path[:] = saved
    if _is_hf_datasets(module):
        return module
    sys.modules.pop("datasets", None)  # whatever the retry found is not the library either
    raise MissingInputError(f"reading {spec!r} needs the Hugging Face `datasets` package: "
                            "pip install datasets (or pip install -e '.[hub]')")


def read_hub_dataset(spec: str, split: str, fmt: PromptFormat, text_field: str) -> list[Prompt]:
    """``hub:<name>[:<config>]`` through the ``datasets`` library (needs network access to the hub)."""
    datasets = import_hf_datasets(spec)
    name, _, config = spec[len(HUB_PREFIX):].partition(":")
    rows: Iterable[dict[str, Any]] = datasets.load_dataset(name, config or None, split=split)
    dataset = name.split("/")[-1]
    prompts = []
    for index, row in enumerate(rows):
        try:
            prompts.append(parse_row(dict(row), index, dataset, fmt, text_field))
        except (KeyError, TypeError, ValueError) as error:
            raise MalformedInputError(f"{spec} row {index}: malformed ({type(error).__name__}: {error})") from error
    check_unique_ids(prompts, [f"{spec} row {index}" for index in range(len(prompts))], spec)
    return prompts


LIMIT_ORDERS = ("round_robin", "file")


def check_limit_order(limit_order: str) -> None:
    """Refuse an unknown ``limit_order`` before any prompt is read."""
    if limit_order not in LIMIT_ORDERS:
        raise InvalidParameterError(f"limit_order={limit_order!r} is invalid: use one of {list(LIMIT_ORDERS)}")


def round_robin(prompts: list[Prompt]) -> list[Prompt]:
    """The first prompt of each category (categories in order of first appearance), then the second of each, ...

    A small run then samples every category instead of the first one in the file (MT-Bench opens with ten
    ``writing`` prompts). Prompts without a category (read as ``default``) share one group.
    """
    by_category: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        by_category.setdefault(prompt.category, []).append(prompt)
    return [
        group[rank]
        for rank in range(max(map(len, by_category.values()), default=0))
        for group in by_category.values()
        if rank < len(group)
    ]


def select_prompts(
    prompts: list[Prompt],
    categories: list[str] | None,
    limit: int | None,
    source: str,
    shuffle: bool = False,
    seed: int = 0,
    limit_order: str = "round_robin",
) -> list[Prompt]:
    """Filter by category, shuffle (with ``seed``), then keep ``limit`` prompts.

    ``limit_order="round_robin"`` takes them spread over the categories (see :func:`round_robin`) and returns
    them in that order; ``"file"`` takes the first ``limit`` in file (or shuffled) order.
    """
    check_limit_order(limit_order)
    if categories:
        present = sorted({p.category for p in prompts})
        unknown = [c for c in categories if c not in present]
        if unknown:
            raise InvalidParameterError(f"unknown categories {unknown} in {source}: present are {present}")
        prompts = [p for p in prompts if p.category in categories]
    if shuffle:
        prompts = list(prompts)
        random.Random(seed).shuffle(prompts)
    if limit is not None:
        if limit < 1:
            raise InvalidParameterError(f"limit={limit} is invalid: use a positive number of prompts, or null for all")
        prompts = (round_robin(prompts) if limit_order == "round_robin" else prompts)[:limit]
    if not prompts:
        raise InvalidParameterError(f"no prompts left in {source} after filtering (categories={categories}, limit={limit})")
    return prompts


def encode_messages(tokenizer, messages: list[dict[str, str]], use_chat_template: bool) -> torch.Tensor:
    """Token ids (1, prompt_len) of a conversation; with the chat template, ends with the assistant header."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return encoded["input_ids"]
    text = "\n\n".join(m["content"] for m in messages)
    return tokenizer(text, return_tensors="pt")["input_ids"]


def truncate_left(input_ids: torch.Tensor, max_prompt_tokens: int | None) -> tuple[torch.Tensor, int]:
    """Keep the last ``max_prompt_tokens`` tokens (the end of a prompt matters most); returns (ids, dropped)."""
    if max_prompt_tokens is None or input_ids.shape[1] <= max_prompt_tokens:
        return input_ids, 0
    dropped = input_ids.shape[1] - max_prompt_tokens
    return input_ids[:, dropped:], dropped
