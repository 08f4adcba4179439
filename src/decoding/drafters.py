"""Drafters: what proposes tokens, apart from what verifies them (a chain for speculative sampling, a tree for
SpecExec). Plain torch, no Lightning.

A drafter proposes; the verifier scores the proposal with one target forward and keeps a prefix of it; the
drafter is then told how much of the sequence was committed and rolls its own state back (a draft model's KV
cache; prompt lookup has none). Neither reaches into the other's state.

Probability convention: ``q`` is the distribution a proposed token was drawn from. A deterministic proposal
(prompt lookup, a greedy draft) has a one-hot ``q``; the chain verifier's rule then reads "accept x with
probability p(x), else sample from p with x removed, renormalized", which is still exact.

Implementations:

- :class:`ModelDrafter`: a draft LM with its KV cache (the default of every draft method);
- :class:`PromptLookup`: n-gram lookup in the prompt and the text generated so far (Saxena 2023; HF's
  ``prompt_lookup_num_tokens`` / ``max_matching_ngram_size``): free, and strong where the output copies its
  input (summaries, retrieval-augmented answers, code edits). Its tree form offers several matches as sibling
  branches for SpecExec's tree verification.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from src.decoding.base import model_logits, model_logits_and_hidden
from src.decoding.kv import cache_length, new_cache, truncate_cache
from src.decoding.sampling import SamplingConfig, logits_to_probs, sample
from src.errors import InvalidParameterError

# Draft confidence under greedy decoding: the raw draft softmax (q itself is one-hot there).
_GREEDY_CONFIDENCE = SamplingConfig(temperature=1.0)


@dataclass
class Proposal:
    """A drafted chain: ``tokens`` (n,) long; ``q`` (n, vocab) the distribution each was drawn from, or None for a
    deterministic proposal (one-hot q; also under greedy decoding, where no verifier reads q); ``forwards``: draft
    model forwards spent on it (0 for a lookup); ``hidden`` (n, H): the draft's final-norm hidden state reading
    each drafted token, when the drafter was asked for them (AutoJudge's features)."""

    tokens: torch.Tensor
    q: torch.Tensor | None
    forwards: int
    hidden: torch.Tensor | None = None


class Drafter(ABC):
    """Proposes tokens for a verifier. One instance serves one method; ``begin`` starts each generation."""

    name: str = "drafter"
    needs_draft_model: bool = False

    def params(self) -> dict[str, Any]:
        """Parameters that identify the drafter (go into records and resume keys)."""
        return {}

    @abstractmethod
    def begin(self, draft_model, vocab: int, device: torch.device) -> None:
        """Start a generation: fresh state (cache, index) for a new prompt."""

    @abstractmethod
    def propose(
        self,
        sequence: list[int],
        k: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        stop_below: float = 0.0,
    ) -> Proposal:
        """Up to ``k`` tokens to follow ``sequence`` (prompt + committed tokens). ``stop_below``: a drafter with
        a confidence stops once its confidence in its own token falls below it (0: never)."""

    def commit(self, length: int) -> None:
        """The verifier kept ``sequence[:length]``: forget state about anything after it."""
        return None


class ModelDrafter(Drafter):
    """A draft LM with its own KV cache: x_i ~ q_i, one draft forward per proposed token.

    The first forward of a proposal also feeds every committed token the draft cache has not seen yet (the whole
    prompt in the first cycle, then the newest token, plus the last draft token after a fully accepted chain).

    Args:
        hidden_states: also return the draft's hidden state reading each drafted token. The state of x_i comes
            out of the forward that reads x_i, so a chain of n tokens costs n + 1 forwards (AutoJudge).
    """

    name = "draft_model"
    needs_draft_model = True

    def __init__(self, hidden_states: bool = False) -> None:
        self.hidden_states = hidden_states

    def begin(self, draft_model, vocab: int, device: torch.device) -> None:
        if draft_model is None:
            raise InvalidParameterError("the draft-model drafter needs a draft model: set model.draft in the config")
        self.model, self.vocab, self.device = draft_model, vocab, device
        self.cache = new_cache()

    def propose(self, sequence, k, sampling, generator, stop_below=0.0) -> Proposal:
        """k draft forwards (fewer when the confidence falls below ``stop_below``); q (n, vocab) when sampling."""
        drafts: list[torch.Tensor] = []  # (1,) each, left on the device: no host sync per draft token on a GPU
        q_rows: list[torch.Tensor] = []
        hidden_rows: list[torch.Tensor] = []
        step_input = torch.tensor([sequence[cache_length(self.cache) :]], device=self.device)  # (1, m >= 1)
        for _ in range(k):
            logits = self._forward(step_input, hidden_rows)[: self.vocab]  # (V,)
            if sampling.greedy:  # q is one-hot: the acceptance rule only needs the tokens
                q_i = None
                token = logits.argmax(-1, keepdim=True)  # (1,)
            else:
                q_i = logits_to_probs(logits, sampling)  # (V,)
                token = sample(q_i[None], generator)  # (1,)
                q_rows.append(q_i)
            drafts.append(token)
            step_input = token[None]  # (1, 1)
            if stop_below and _confidence(logits, q_i, token, sampling) < stop_below:
                break  # the only per-token host sync, and only with a threshold
        forwards = len(drafts)
        hidden = None
        if self.hidden_states:
            if drafts:  # the state reading the last draft token needs one more forward
                self._forward(step_input, hidden_rows)
                forwards += 1
            hidden = torch.stack(hidden_rows[1:]) if drafts else torch.empty(0, 0)  # (n, H)
        tokens = torch.cat(drafts) if drafts else torch.empty(0, dtype=torch.long, device=self.device)  # (n,)
        q = torch.stack(q_rows) if q_rows else None  # (n, V)
        return Proposal(tokens, q, forwards, hidden)

    def _forward(self, step_input: torch.Tensor, hidden_rows: list[torch.Tensor]) -> torch.Tensor:
        """One draft forward; returns the last row's logits (V_draft,) and records its hidden state if asked."""
        if not self.hidden_states:
            return model_logits(self.model, step_input, self.cache, logits_to_keep=1)[0, -1]
        logits, hidden = model_logits_and_hidden(self.model, step_input, self.cache, logits_to_keep=1)
        hidden_rows.append(hidden[0, -1])
        return logits[0, -1]

    def commit(self, length: int) -> None:
        truncate_cache(self.cache, length)


def _confidence(logits: torch.Tensor, q_i: torch.Tensor | None, token: torch.Tensor, sampling: SamplingConfig) -> float:
    """The draft's probability of its own token: q_i(x_i), or the raw softmax's under greedy decoding."""
    if sampling.greedy:
        return float(logits_to_probs(logits, _GREEDY_CONFIDENCE)[token])
    return float(q_i[token])


class PromptLookup(Drafter):
    """Propose the tokens that followed an earlier occurrence of the sequence's last n-gram (no model, no cost).

    For n from ``max_ngram`` down to ``min_ngram``: find the earliest earlier occurrence of the last n tokens in
    the prompt + generated text, and propose up to k tokens that followed it (never past the end of the
    sequence). No match proposes nothing: the cycle is then a plain target step, no verification is wasted. With
    ``min_ngram`` 1 this is exactly HF's ``prompt_lookup_num_tokens=k, max_matching_ngram_size=max_ngram``.

    Args:
        max_ngram: the longest suffix n-gram looked up (HF's ``max_matching_ngram_size``, default 2 there).
        min_ngram: the shortest one (1 matches a single token: more proposals, more of them rejected).
        max_branches: tree verifiers only (SpecExec): up to this many distinct continuations, all from the
            matches of the longest n-gram that matches at all (earliest first), become sibling branches verified
            in one target forward.
    """

    name = "prompt_lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_branches: int = 1) -> None:
        for label, value in (("max_ngram", max_ngram), ("min_ngram", min_ngram), ("max_branches", max_branches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(f"{label}={value!r} is invalid: use an integer >= 1")
        if min_ngram > max_ngram:
            raise InvalidParameterError(
                f"min_ngram={min_ngram} > max_ngram={max_ngram}: use min_ngram <= max_ngram (e.g. 1 and 3)"
            )
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.max_branches = max_branches

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"max_ngram": self.max_ngram, "min_ngram": self.min_ngram}
        if self.max_branches != 1:
            params["max_branches"] = self.max_branches
        return params

    def begin(self, draft_model, vocab: int, device: torch.device) -> None:
        self.vocab, self.device = vocab, device

    def propose(self, sequence, k, sampling, generator, stop_below=0.0) -> Proposal:
        found = self.continuations(sequence, k, limit=1)
        tokens = found[0] if found else []
        cut = next((i for i, t in enumerate(tokens) if t >= self.vocab), len(tokens))
        tokens = tokens[:cut]  # never a token the target cannot score (nor what followed it)
        return Proposal(torch.tensor(tokens, dtype=torch.long, device=self.device), q=None, forwards=0)

    def continuations(self, sequence: list[int], depth: int, limit: int | None = None) -> list[list[int]]:
        """Distinct continuations (up to ``depth`` tokens each, at most ``limit`` or ``max_branches`` of them) of
        the earlier occurrences of the last n-gram: longest n first, then left to right (earliest first, as HF)."""
        limit = self.max_branches if limit is None else limit
        found: list[list[int]] = []
        if depth < 1:
            return found
        end = len(sequence)
        for n in range(min(self.max_ngram, end - 1), self.min_ngram - 1, -1):
            for start in occurrences(sequence, sequence[end - n :], end - n):
                continuation = sequence[start + n : start + n + depth]
                if continuation and continuation not in found:
                    found.append(continuation)
                    if len(found) >= limit:
                        return found
            if found:
                return found  # a shorter n-gram matches more loosely: only when the longer ones found nothing
        return found


def occurrences(sequence: list[int], ngram: list[int], stop: int):
    """Start positions i < ``stop`` with ``sequence[i:i+n] == ngram``, left to right (lazy: callers stop early)."""
    if not ngram:
        return
    first, n, i = ngram[0], len(ngram), -1
    while True:
        try:
            i = sequence.index(first, i + 1, stop)  # C-speed scan for the first token, then compare the rest
        except ValueError:
            return
        if sequence[i : i + n] == ngram:
            yield i
