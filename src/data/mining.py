"""AutoJudge label mining (Garipov et al. 2025, Algorithm 1) and the label store it writes.

For one prompt with a checkable final answer::

    R <- the target's greedy answer;  reference <- answer(R);  left_border <- 0
    repeat:
        teacher-force the draft over prompt + R;  pos <- first i >= left_border with draft_argmax_i != R_i
        (none: stop)
        R' <- R[:pos] + [draft token] + the target's greedy continuation
        answer(R') == reference  ->  the mismatch is UNIMPORTANT (label 0), and R <- R'
        otherwise                ->  IMPORTANT (label 1), R unchanged
        left_border <- pos + 1
    until no mismatch remains, or the per-prompt mismatch limit / wall-time budget is hit

Features of a mismatch (the paper's default): the final-layer hidden states (after the final norm) of the
draft and of the target at the draft token's position, on the sequence ``prompt + R[:pos] + [draft token]``.

The target's continuation is the costly part. It is computed exactly (greedy), but guessed from R: while it
still equals R's tail the whole tail is verified in one forward, and after a divergence the tokens that
follow the output's latest n-gram inside R are proposed (prompt-lookup decoding), since a swapped word often
leaves the rest of the reasoning unchanged but shifted.

Store layout (``store_dir``): ``meta.json`` (models and settings), ``shards/<prompt>.safetensors`` (features
of one prompt), ``labels.jsonl`` (one row per mismatch) and ``prompts.jsonl`` (one row per finished prompt,
written last: a prompt without it is mined again, so a killed run resumes where it stopped).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from src.decoding.base import input_device, model_logits_and_hidden, vocab_width
from src.decoding.chain import chain_cycle, greedy_rule
from src.decoding.drafters import Drafter, Proposal
from src.decoding.kv import new_cache, truncate_cache
from src.errors import IncompatibleModelsError, MalformedInputError

log = logging.getLogger(__name__)

IMPORTANT, UNIMPORTANT = 1, 0


@dataclass
class Mismatch:
    position: int  # index in the answer R (0 = first generated token)
    draft_token: int
    target_token: int
    label: int  # IMPORTANT or UNIMPORTANT
    draft_hidden: torch.Tensor  # (Hd,)
    target_hidden: torch.Tensor  # (Ht,)


@dataclass
class MinedPrompt:
    reference_answer: str | None
    initial_answer_tokens: list[int]
    final_answer_tokens: list[int]
    mismatches: list[Mismatch] = field(default_factory=list)
    stopped_by: str = "no_mismatch"  # or "max_mismatches", "deadline", "no_answer", "unfinished"
    target_forwards: int = 0  # target forwards of the greedy decodes (each first one also encodes its prefix)


# ---------------------------------------------------------------- target side


LOOKUP_NGRAM = (3, 2)  # n-gram lengths tried, longest first, to re-find the output inside the guess
LOOKUP_CHUNK = 16  # guessed tokens verified per forward once the output has left the aligned guess


def lookup_chunk(tokens: list[int], guess: list[int], budget: int) -> list[int]:
    """The tokens to propose next: the guess's rest while the output still equals it; afterwards, what follows
    the latest n-gram of the output inside the guess, nearest to the aligned position (prompt-lookup decoding).
    """
    if len(guess) > len(tokens) and tokens == guess[: len(tokens)]:
        return guess[len(tokens) : len(tokens) + budget]
    for n in LOOKUP_NGRAM:
        if len(tokens) < n:
            continue
        tail = tokens[-n:]
        starts = [j for j in range(len(guess) - n) if guess[j : j + n] == tail]
        if starts:
            j = min(starts, key=lambda start: abs(start + n - len(tokens)))
            return guess[j + n : j + n + min(budget, LOOKUP_CHUNK)]
    return []


class GuessLookup(Drafter):
    """A drafter that proposes from a guessed text (:func:`lookup_chunk`): no model, deterministic."""

    name = "guess_lookup"

    def __init__(self, guess: list[int], prefix_len: int) -> None:
        self.guess, self.prefix_len = list(guess), prefix_len

    def begin(self, draft_model, vocab: int, device: torch.device, target=None) -> None:
        self.vocab, self.device = vocab, device

    def propose(self, sequence, k, sampling, generator, stop_below=0.0) -> Proposal:
        chunk = [t for t in lookup_chunk(sequence[self.prefix_len :], self.guess, k)[:k] if t < self.vocab]
        return Proposal(torch.tensor(chunk, dtype=torch.long, device=self.device), q=None, forwards=0)


@torch.inference_mode()
def greedy_continue(
    model, prefix: list[int], max_new_tokens: int, eos_token_ids: set[int], guess: list[int] = ()
) -> tuple[list[int], torch.Tensor, int]:
    """Greedy continuation of ``prefix``: (new tokens, hidden state (H,) at the last prefix token, target forwards).

    Chain cycles (:mod:`src.decoding.chain`) whose drafts are guessed from ``guess`` (:func:`lookup_chunk`); a
    guessed token is kept only while it equals the argmax, so the output is exactly the greedy one. The first
    forward encodes the prefix and already verifies the guess's head: a right guess costs one forward.
    """
    device = input_device(model)
    cache = new_cache()
    sequence = list(prefix)
    drafter = GuessLookup(guess, len(prefix))
    vocab = vocab_width(model)
    drafter.begin(None, vocab, device)
    forwards = 0
    prefix_hidden = None
    while len(sequence) - len(prefix) < max_new_tokens and (forwards == 0 or sequence[-1] not in eos_token_ids):
        budget = max_new_tokens - (len(sequence) - len(prefix)) - 1
        done = chain_cycle(model, cache, drafter, sequence, budget, vocab, greedy_rule, eos_token_ids,
                           with_hidden=forwards == 0)
        if forwards == 0:
            prefix_hidden = done.verified.hidden[0]  # row 0: the state reading the last prefix token
        forwards += 1
    return sequence[len(prefix) :], prefix_hidden, forwards


# ---------------------------------------------------------------- draft side


@torch.inference_mode()
def draft_disagreements(
    draft, prompt: list[int], answer: list[int], vocab: int | None = None
) -> tuple[list[int], object]:
    """Teacher-force the draft over prompt + answer: its argmax for every answer position (len(answer),), among the
    ids ``[0, vocab)`` the target can also read (None: all of the draft's), and the cache holding prompt + answer."""
    cache = new_cache()
    device = input_device(draft)
    logits, _ = model_logits_and_hidden(draft, torch.tensor([prompt + answer], device=device), cache)
    # The logit row at prompt position len(prompt) - 1 + i predicts answer[i].
    rows = logits[0, len(prompt) - 1 : len(prompt) - 1 + len(answer), :vocab]
    return rows.argmax(-1).tolist(), cache


@torch.inference_mode()
def draft_hidden_at(draft, cache, prompt_len: int, position: int, token: int) -> torch.Tensor:
    """The draft's hidden state (Hd,) reading ``token`` at answer ``position`` (cache cut back to before it)."""
    truncate_cache(cache, prompt_len + position)
    _, hidden = model_logits_and_hidden(draft, torch.tensor([[token]], device=input_device(draft)), cache)
    return hidden[0, -1]


# ---------------------------------------------------------------- Algorithm 1


def mine_prompt(
    target,
    draft,
    prompt: list[int],
    max_new_tokens: int,
    eos_token_ids: set[int],
    answer_of: Callable[[list[int]], str | None],
    max_mismatches: int = 16,
    deadline: float | None = None,
    skip_unfinished: bool = False,
) -> MinedPrompt:
    """Label the draft/target mismatches of one prompt (module docstring). ``answer_of`` maps answer tokens to
    the final answer (None when there is none); ``deadline`` is a ``time.monotonic()`` value.

    ``skip_unfinished``: give up on a prompt whose answer R is cut by ``max_new_tokens`` before an EOS: the last
    number of a cut answer is a reasoning step, not a final answer, and would make every mismatch look important.
    """
    # Step 1: R = the target's greedy answer; its final answer is the reference.
    answer, _, forwards = greedy_continue(target, prompt, max_new_tokens, eos_token_ids)
    result = MinedPrompt(answer_of(answer), list(answer), list(answer), target_forwards=forwards)
    if skip_unfinished and (not answer or answer[-1] not in eos_token_ids):
        result.stopped_by = "unfinished"
        return result
    if result.reference_answer is None:
        result.stopped_by = "no_answer"
        return result
    left_border = 0
    shared_vocab = min(vocab_width(target), vocab_width(draft))  # a padded draft id must never reach the target
    while True:
        if len(result.mismatches) >= max_mismatches:
            result.stopped_by = "max_mismatches"
            break
        if deadline is not None and time.monotonic() > deadline:
            result.stopped_by = "deadline"
            break
        # Step 2: the first position >= left_border where the teacher-forced draft disagrees with R.
        predicted, draft_cache = draft_disagreements(draft, prompt, answer, shared_vocab)
        pos = next((i for i in range(left_border, len(answer)) if predicted[i] != answer[i]), None)
        if pos is None:
            result.stopped_by = "no_mismatch"
            break
        draft_token = predicted[pos]
        # Step 3: R' = R[:pos] + draft token + the target's greedy continuation (guessing R's own tail).
        budget = max_new_tokens - pos - 1
        if budget > 0 and draft_token not in eos_token_ids:
            tail, target_hidden, forwards = greedy_continue(
                target, prompt + answer[:pos] + [draft_token], budget, eos_token_ids, guess=answer[pos + 1 :]
            )
        else:  # nothing may follow: still need the target's hidden state at the draft token
            tail, target_hidden, forwards = [], _hidden_at_end(target, prompt + answer[:pos] + [draft_token]), 0
        result.target_forwards += forwards
        candidate = answer[:pos] + [draft_token] + tail
        # Step 4: same final answer -> unimportant, and R follows the draft; else important.
        label = UNIMPORTANT if answer_of(candidate) == result.reference_answer else IMPORTANT
        result.mismatches.append(Mismatch(
            pos, draft_token, answer[pos], label,
            draft_hidden_at(draft, draft_cache, len(prompt), pos, draft_token).float().cpu(),
            target_hidden.float().cpu(),
        ))
        if label == UNIMPORTANT:
            answer = candidate
        left_border = pos + 1
    result.final_answer_tokens = list(answer)
    return result


@torch.inference_mode()
def _hidden_at_end(model, ids: list[int]) -> torch.Tensor:
    _, hidden = model_logits_and_hidden(model, torch.tensor([ids], device=input_device(model)), new_cache())
    return hidden[0, -1]


# ---------------------------------------------------------------- the store


@dataclass
class LabelSet:
    """All mined mismatches: features (n, Hd) and (n, Ht), labels (n,), and the prompt of each row."""

    draft_hidden: torch.Tensor
    target_hidden: torch.Tensor
    labels: torch.Tensor
    prompt_ids: list[str]
    rows: list[dict[str, Any]]

    def __len__(self) -> int:
        return self.labels.numel()


class LabelStore:
    """Append-only store of mined labels (module docstring); safetensors for tensors, JSONL for the rest."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def meta_path(self) -> Path:
        return self.root / "meta.json"

    def exists(self) -> bool:
        return self.meta_path.is_file() and bool(self.finished_prompts())

    def open(self, meta: dict[str, Any]) -> None:
        """Create the store, or check that an existing one was mined with the same models and settings."""
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        if self.meta_path.is_file():
            existing = json.loads(self.meta_path.read_text())
            if existing != json.loads(json.dumps(meta)):
                differing = sorted(k for k in set(existing) | set(meta) if existing.get(k) != meta.get(k))
                raise IncompatibleModelsError(
                    f"label store {self.root} was mined with other settings ({', '.join(differing)} differ): "
                    "delete it or choose another store_dir"
                )
        else:
            self.meta_path.write_text(json.dumps(meta, indent=2) + "\n")

    def meta(self) -> dict[str, Any]:
        return json.loads(self.meta_path.read_text()) if self.meta_path.is_file() else {}

    def finished_prompts(self) -> dict[str, dict[str, Any]]:
        return {row["prompt_id"]: row for row in read_jsonl_rows(self.root / "prompts.jsonl")}

    def add(self, prompt_id: str, mined: MinedPrompt, seconds: float) -> None:
        """Write one prompt: features shard, label rows, then the prompt row that marks it finished."""
        from safetensors.torch import save_file

        shard = f"shards/{hashlib.sha1(prompt_id.encode()).hexdigest()[:16]}.safetensors"
        if mined.mismatches:
            save_file({
                "draft_hidden": torch.stack([m.draft_hidden for m in mined.mismatches]).contiguous(),
                "target_hidden": torch.stack([m.target_hidden for m in mined.mismatches]).contiguous(),
            }, str(self.root / shard))
        with (self.root / "labels.jsonl").open("a", encoding="utf-8") as handle:
            for row, m in enumerate(mined.mismatches):
                handle.write(json.dumps({
                    "prompt_id": prompt_id, "position": m.position, "draft_token": m.draft_token,
                    "target_token": m.target_token, "label": m.label, "shard": shard, "row": row,
                }) + "\n")
        with (self.root / "prompts.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({
                "prompt_id": prompt_id, "reference_answer": mined.reference_answer, "stopped_by": mined.stopped_by,
                "mismatches": len(mined.mismatches), "important": sum(m.label for m in mined.mismatches),
                "answer_tokens": len(mined.initial_answer_tokens), "seconds": round(seconds, 3),
            }) + "\n")

    def load(self) -> LabelSet:
        """Every label of a finished prompt (rows of an unfinished prompt, from a killed run, are ignored)."""
        from safetensors.torch import load_file

        finished = self.finished_prompts()
        rows = [r for r in read_jsonl_rows(self.root / "labels.jsonl") if r["prompt_id"] in finished]
        # A prompt mined twice (killed after its shard, before its prompt row) keeps its last rows only.
        latest = {(r["prompt_id"], r["row"]): r for r in rows}
        rows = list(latest.values())
        shards: dict[str, dict[str, torch.Tensor]] = {}
        draft, target = [], []
        for r in rows:
            if r["shard"] not in shards:
                shards[r["shard"]] = load_file(str(self.root / r["shard"]))
            draft.append(shards[r["shard"]]["draft_hidden"][r["row"]])
            target.append(shards[r["shard"]]["target_hidden"][r["row"]])
        if not rows:
            return LabelSet(torch.empty(0, 0), torch.empty(0, 0), torch.empty(0), [], [])
        return LabelSet(
            torch.stack(draft), torch.stack(target), torch.tensor([r["label"] for r in rows], dtype=torch.float32),
            [r["prompt_id"] for r in rows], rows,
        )


def read_jsonl_rows(path: Path, fix: str = "delete the label store and mine again") -> list[dict[str, Any]]:
    """The rows of an append-only JSONL store file ([] when absent); a last line cut by a killed run is
    skipped, any other bad line is a one-line error ending with ``fix``."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                continue  # a line cut by a killed run
            raise MalformedInputError(f"{path}:{number} is not valid JSON: {fix}") from error
    return rows
