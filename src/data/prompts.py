"""Prompt files (MT-Bench / Spec-Bench JSONL) and chat formatting.

An MT-Bench line: ``{"question_id": 81, "category": "writing", "turns": ["...", "..."]}``; Spec-Bench adds
an optional ``"reference": [...]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from src.errors import InvalidParameterError, MalformedInputError, MissingInputError

MT_BENCH_HINT = "`make setup` puts MT-Bench into datasets/mt_bench.jsonl"


@dataclass
class Prompt:
    prompt_id: str
    category: str
    turns: list[str]
    dataset: str
    reference: list[str] = field(default_factory=list)


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """Read a MT-Bench-format JSONL file; a bad line raises an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"prompt file {path} does not exist ({MT_BENCH_HINT}, or pass --data.path FILE)")
    prompts = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                turns = row["turns"]
                if isinstance(turns, str):
                    turns = [turns]
                if not turns or not all(isinstance(t, str) for t in turns):
                    raise ValueError("'turns' must be a non-empty list of strings")
                prompts.append(
                    Prompt(
                        prompt_id=str(row["question_id"]),
                        category=str(row.get("category", "default")),
                        turns=list(turns),
                        dataset=path.stem,
                        reference=list(row.get("reference") or []),
                    )
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise MalformedInputError(
                    f"{path}:{line_number}: malformed prompt line ({type(error).__name__}: {error}); "
                    "expected {\"question_id\", \"category\", \"turns\": [...]}"
                ) from error
    return prompts


def select_prompts(prompts: list[Prompt], categories: list[str] | None, limit: int | None, source: str) -> list[Prompt]:
    if categories:
        present = sorted({p.category for p in prompts})
        unknown = [c for c in categories if c not in present]
        if unknown:
            raise InvalidParameterError(f"unknown categories {unknown} in {source}: present are {present}")
        prompts = [p for p in prompts if p.category in categories]
    if limit is not None:
        if limit < 1:
            raise InvalidParameterError(f"limit={limit} is invalid: use a positive number of prompts, or null for all")
        prompts = prompts[:limit]
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
