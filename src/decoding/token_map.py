"""Token maps: which token ids a restricted draft scores (FR-Spec, Zhao et al. 2025; SGLang's
``--speculative-token-map``).

A draft LM spends a large share of its forward in the output layer (SmolLM2-135M: a 49152 x 576 matmul, ~20%;
most of a 128k-vocabulary Llama-3 draft). Text uses few of those ids often, so the draft may score only the N
most frequent ones (:class:`src.decoding.drafters.ModelDrafter` with ``top_tokens=N, token_map=PATH``); its q is
then zero outside them and the verifier stays exact (it accepts any q).

    Step 1  count    token-id frequencies over texts (tokenized with the draft's tokenizer) and / or over token
                     ids the target produced itself (the ``tokens`` of a results JSONL)
    Step 2  rank     ids by count, most frequent first (ties: smaller id first)
    Step 3  save     a small JSON file: {"tokenizer", "vocab_size", "source", "counts_total", "top_ids",
                     "top_counts"}; ``top_ids`` lists every id seen, ranked
    Step 4  select   the draft's subset: the ids it must be able to propose (EOS), then the top-ranked others,
                     N in all, returned sorted ascending (see :meth:`TokenMap.select`)

Build one from the command line (``--from-prompts`` / ``--from-results`` may repeat)::

    python -m src.decoding.token_map --tokenizer embedded:smollm2-135m-instruct \\
        --from-prompts ../shared/datasets/gsm8k_train.jsonl --from-results datasets/results.jsonl \\
        --out artifacts/token_map.json

The library functions read plain JSONL themselves (every string of the text fields, answers included, unlike
the prompt readers of :mod:`src.data.prompts`) and take tokenizers as arguments; only :func:`main`, the entry
point, loads a tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from src.errors import (
    InvalidParameterError,
    MalformedInputError,
    MissingInputError,
    UserInputError,
    check_positive_int,
    is_positive_int,
)
from src.models import ModelSpec, load_tokenizer

# Fields of a prompt line whose text is counted: MT-Bench / Spec-Bench (turns, reference), GSM8K (question,
# answer), plain prompt files (prompt, text).
TEXT_FIELDS = ("turns", "reference", "question", "answer", "prompt", "text")
BUILD_HINT = "build one with `python -m src.decoding.token_map --tokenizer NAME --from-prompts FILE --out PATH`"
_COUNT_CHUNK = 1 << 20  # ids per bincount: bounds the memory of one flat id list over a large corpus


@dataclass
class TokenMap:
    """Token-id frequencies of one tokenizer: ``top_ids`` every id seen, most frequent first (ties: smaller id
    first), ``top_counts`` their counts; ids never seen are not listed (they rank after all listed ids)."""

    tokenizer: str
    vocab_size: int
    top_ids: list[int]
    top_counts: list[int]
    counts_total: int
    source: list[dict[str, Any]] = field(default_factory=list)
    path: str = "<memory>"

    # ---------------------------------------------------------------- build

    @classmethod
    def from_counts(cls, counts: torch.Tensor, tokenizer: str, source: list[dict[str, Any]]) -> TokenMap:
        """Step 2: rank the ids of ``counts`` (vocab_size,) by count; ids counted 0 are left out."""
        order = torch.sort(-counts, stable=True).indices  # (V,): count descending, stable -> ties by id
        seen = int((counts > 0).sum())
        top_ids = order[:seen]
        return cls(
            tokenizer=tokenizer, vocab_size=counts.numel(), top_ids=top_ids.tolist(),
            top_counts=counts[top_ids].tolist(), counts_total=int(counts.sum()), source=source,
        )

    def save(self, path: str | Path) -> None:
        """Step 3: write the map as JSON (creates the folder)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = {
            "tokenizer": self.tokenizer, "vocab_size": self.vocab_size, "source": self.source,
            "counts_total": self.counts_total, "top_ids": self.top_ids, "top_counts": self.top_counts,
        }
        path.write_text(json.dumps(table, separators=(",", ":")) + "\n", encoding="utf-8")
        self.path = str(path)

    # ---------------------------------------------------------------- use

    def select(self, top_tokens: int, vocab: int, include: Iterable[int] = ()) -> torch.Tensor:
        """Step 4: the subset a draft scores, (top_tokens,) long, **sorted ascending**.

        ``include`` (e.g. the EOS ids) are always in it, so the draft can end a generation; the rest are the
        most frequent ids, then (when ``top_tokens`` exceeds the ids seen) the unseen ids from 0 up. Ascending
        order makes an argmax over the subset break ties toward the smaller id, as an argmax over all ids does.
        ``vocab``: the ids the models share; every selected id is below it.
        """
        check_positive_int("top_tokens", top_tokens, "use an integer >= 1 (e.g. 16384)")
        if self.vocab_size > vocab:
            raise InvalidParameterError(
                f"token map {self.path} covers {self.vocab_size} ids ({self.tokenizer}) but the models share only "
                f"{vocab}: build the map with the draft's own tokenizer"
            )
        if top_tokens > self.vocab_size:
            raise InvalidParameterError(
                f"top_tokens={top_tokens} exceeds the {self.vocab_size} ids of token map {self.path}: "
                f"use top_tokens <= {self.vocab_size}"
            )
        must = sorted({int(i) for i in include})
        bad = [i for i in must if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidParameterError(
                f"ids {bad} to include are outside [0, {self.vocab_size}) of token map {self.path}: pass ids the "
                "tokenizer has (e.g. the draft's EOS ids)"
            )
        if len(must) > top_tokens:
            raise InvalidParameterError(
                f"top_tokens={top_tokens} cannot hold the {len(must)} ids that must be included: use "
                f"top_tokens >= {len(must)}"
            )
        chosen = set(must)
        for token in self._ranked():
            if len(chosen) >= top_tokens:
                break
            chosen.add(token)
        return torch.tensor(sorted(chosen), dtype=torch.long)

    def _ranked(self) -> Iterable[int]:
        """Every id of the vocabulary, most frequent first; the unseen ones last, smallest first."""
        yield from self.top_ids
        seen = set(self.top_ids)
        yield from (token for token in range(self.vocab_size) if token not in seen)

    def coverage(self, n: int) -> float:
        """Share of the counted tokens that fall in the ``n`` most frequent ids (what a draft restricted to
        them could have proposed)."""
        return sum(self.top_counts[:n]) / self.counts_total if self.counts_total else 0.0


# ---------------------------------------------------------------- step 1: count


def count_token_ids(sequences: Iterable[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """Step 1: occurrences of each id over ``sequences`` (lists of token ids) -> (vocab_size,) long counts."""
    check_positive_int("vocab_size", vocab_size, "use the tokenizer's len() (>= 1)")
    counts = torch.zeros(vocab_size, dtype=torch.long)
    pending: list[int] = []

    def flush() -> None:
        ids = torch.tensor(pending, dtype=torch.long)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
            raise MalformedInputError(
                f"token id {bad} is outside [0, {vocab_size}): the ids come from another tokenizer, count them "
                "with the tokenizer that produced them"
            )
        counts.add_(torch.bincount(ids, minlength=vocab_size))
        pending.clear()

    for sequence in sequences:
        pending.extend(int(t) for t in sequence)
        if len(pending) >= _COUNT_CHUNK:
            flush()
    flush()
    return counts


def tokenize_texts(texts: Iterable[str], tokenizer, batch: int = 1000) -> Iterable[list[int]]:
    """Token ids of each text, without special tokens (a chat template adds them, not the text)."""
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) >= batch:
            yield from tokenizer(chunk, add_special_tokens=False)["input_ids"]
            chunk = []
    if chunk:
        yield from tokenizer(chunk, add_special_tokens=False)["input_ids"]


def _json_lines(path: str | Path, what: str) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-empty line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{what} file {path} does not exist: check the path")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise MalformedInputError(f"{path} line {number} is not JSON ({error.msg}): fix or drop it") from None
            if not isinstance(row, dict):
                raise MalformedInputError(f"{path} line {number} is a {type(row).__name__}: use a JSON object")
            yield number, row


def texts_from_jsonl(path: str | Path) -> list[str]:
    """The texts of a prompt file (MT-Bench / Spec-Bench, GSM8K or ``prompt`` / ``text`` lines): every string
    of the fields in ``TEXT_FIELDS``, so a GSM8K line gives its question and its worked answer."""
    texts: list[str] = []
    for number, row in _json_lines(path, "prompt"):
        found = [row[name] for name in TEXT_FIELDS if name in row]
        strings = [t for value in found for t in (value if isinstance(value, list) else [value]) if isinstance(t, str)]
        if not strings:
            raise MalformedInputError(
                f"{path} line {number} has no text: give it a string (or list of strings) in one of {TEXT_FIELDS}"
            )
        texts.extend(strings)
    return texts


def token_lists_from_results(path: str | Path) -> list[list[int]]:
    """The ``tokens`` (generated ids) of each record of a results JSONL; lines without them are skipped."""
    lists: list[list[int]] = []
    for number, row in _json_lines(path, "results"):
        tokens = row.get("tokens")
        if tokens is None:
            continue
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise MalformedInputError(f"{path} line {number}: 'tokens' must be a list of token ids")
        lists.append(tokens)
    if not lists:
        raise MalformedInputError(f"results file {path} has no record with 'tokens': pass a predict results JSONL")
    return lists


# ---------------------------------------------------------------- load


def read_token_map(path: str | Path) -> TokenMap:
    """A saved map, checked: every field present, ids unique and inside [0, vocab_size)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"token map {path} does not exist: {BUILD_HINT}")
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MalformedInputError(f"token map {path} is not JSON ({error}): {BUILD_HINT}") from None
    required = ("tokenizer", "vocab_size", "counts_total", "top_ids")
    missing = [key for key in required if not isinstance(table, dict) or key not in table]
    if missing:
        raise MalformedInputError(f"token map {path} lacks {missing}: {BUILD_HINT}")
    size, top_ids = table["vocab_size"], table["top_ids"]
    if not is_positive_int(size):
        raise MalformedInputError(f"token map {path}: vocab_size={size!r} is not a positive integer: {BUILD_HINT}")
    if not isinstance(top_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in top_ids):
        raise MalformedInputError(f"token map {path}: top_ids must be a list of token ids: {BUILD_HINT}")
    bad = next((t for t in top_ids if not 0 <= t < size), None)
    if bad is not None:
        raise MalformedInputError(f"token map {path}: id {bad} is outside [0, {size}): {BUILD_HINT}")
    if len(set(top_ids)) != len(top_ids):
        raise MalformedInputError(f"token map {path}: top_ids repeats ids: {BUILD_HINT}")
    top_counts = table.get("top_counts", [])
    if top_counts and len(top_counts) != len(top_ids):
        raise MalformedInputError(f"token map {path}: top_counts and top_ids differ in length: {BUILD_HINT}")
    return TokenMap(
        tokenizer=str(table["tokenizer"]), vocab_size=size, top_ids=top_ids, top_counts=list(top_counts),
        counts_total=int(table["counts_total"]), source=list(table.get("source", [])), path=str(path),
    )


# ---------------------------------------------------------------- command line


def build_from_files(
    tokenizer, tokenizer_name: str, prompt_files: Sequence[str | Path], result_files: Sequence[str | Path]
) -> TokenMap:
    """Steps 1-2 over prompt files (tokenized) and results files (ids as generated)."""
    if not prompt_files and not result_files:
        raise InvalidParameterError("nothing to count: pass --from-prompts FILE and / or --from-results FILE")
    vocab_size = len(tokenizer)
    counts = torch.zeros(vocab_size, dtype=torch.long)
    source: list[dict[str, Any]] = []
    for kind, files in (("prompts", prompt_files), ("results", result_files)):
        for path in files:
            if kind == "prompts":
                sequences = tokenize_texts(texts_from_jsonl(path), tokenizer)
            else:
                sequences = token_lists_from_results(path)
            counted = count_token_ids(sequences, vocab_size)
            counts += counted
            source.append({"kind": kind, "path": str(path), "tokens": int(counted.sum())})
    return TokenMap.from_counts(counts, tokenizer_name, source)


def main(argv: Sequence[str] | None = None) -> int:
    """Build, save and summarize a token map; a user's mistake prints one line and returns 2."""
    parser = argparse.ArgumentParser(
        prog="python -m src.decoding.token_map", description="Build a draft token map (FR-Spec) from texts and outputs."
    )
    parser.add_argument("--tokenizer", required=True, help="the draft's model: embedded:..., a folder or a hub id")
    parser.add_argument("--from-prompts", action="append", default=[], metavar="JSONL",
                        help="prompt file whose texts are counted (MT-Bench, GSM8K, prompt/text lines); repeatable")
    parser.add_argument("--from-results", action="append", default=[], metavar="JSONL",
                        help="predict results whose generated 'tokens' are counted; repeatable")
    parser.add_argument("--out", required=True, help="where to write the map (JSON)")
    args = parser.parse_args(argv)
    try:
        tokenizer = load_tokenizer(ModelSpec(name_or_path=args.tokenizer))
        token_map = build_from_files(tokenizer, args.tokenizer, args.from_prompts, args.from_results)
        token_map.save(args.out)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(token_map.top_ids)} of {token_map.vocab_size} ids seen in {token_map.counts_total} tokens")
    for n in (1024, 4096, 8192, 16384, 32768):
        if n < token_map.vocab_size:
            print(f"  top {n:>6}: {token_map.coverage(n):.4%} of the counted tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
