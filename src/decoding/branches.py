"""Greedy decoding of many branches side by side: forks of shared prefixes, continued in one batch.

Label mining (:mod:`src.data.mining`) needs many independent greedy continuations: the target's answers to
several prompts, then, for every draft/target mismatch inside an answer, the continuation that follows the
draft's token. On a CPU a forward over 64 tokens costs about three times one over 1 token, so decoding them
one after another wastes most of each forward. :class:`BranchDecoder` runs them as a batch in three stages:

1. :meth:`~BranchDecoder.prefill` encodes the prefix sequences once, as one right-padded batch;
2. the first step feeds every fork's token at once: row s of the batch holds sequence s's forks as queries
   over its prefill (4D mask (S, 1, Q, L + Q), True = attend: fork q sees the first ``length`` slots and
   itself; the tree attention of :mod:`src.decoding.tree`), which gives each fork's hidden state and its
   first token without copying any prefix;
3. forks that go on get one batch row each: the row's cache is gathered from its sequence's prefill and its
   first-step slot (:func:`src.decoding.kv.cache_from_entries`), left-padded to a common length (a 2D padding
   mask hides the pad), and one forward per step feeds every live row's last token at its own position.
   Finished rows are dropped (:func:`src.decoding.kv.select_cache_rows`) once they are a quarter of the batch.

Every row attends to its own keys only. (A first version kept all branches in one cache row as a tree: its
attention over every branch's slots grew to 2 s per step at 100 live branches and 12k slots.) Results equal
sequential greedy decoding up to floating-point reassociation of the wider matmuls (a tie within ~1e-6 in
float32 may break the other way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from src.decoding.base import input_device, model_logits_and_hidden, vocab_width
from src.decoding.kv import cache_entries, cache_from_entries, new_cache, select_cache_rows
from src.errors import InvalidParameterError

DROP_SHARE = 0.25  # finished rows are dropped from the batch once they are this share of it


@dataclass
class Branch:
    """One greedy continuation: reads ``pending`` at ``position`` next; emits ``tokens`` (the fork token is not
    one of them); stops after an EOS or ``max_new_tokens`` tokens. ``hidden`` (H,): the final-norm hidden state
    reading the fork token (set by the first step)."""

    sequence: int
    pending: int
    position: int
    max_new_tokens: int
    tokens: list[int] = field(default_factory=list)
    hidden: torch.Tensor | None = None
    done: bool = False
    looped: bool = False  # stopped because its last ``loop_window`` tokens already occurred in it
    _seen: set = field(default_factory=set, repr=False)  # its earlier loop_window-grams


class BranchDecoder:
    """Prefill sequences, fork branches off their prefixes, then :meth:`run` every branch greedily to its end.

    ``loop_window``: stop a branch whose last ``loop_window`` tokens already occurred, in that order, earlier in
    its own output (0: never). A small model's greedy output that repeats a 32-token window has entered a loop
    it practically never leaves; decoding it to the length limit would hold every other branch's step count.
    """

    def __init__(self, model, eos_token_ids: set[int], loop_window: int = 0) -> None:
        self.model, self.eos_token_ids, self.loop_window = model, set(eos_token_ids), loop_window
        self.device = input_device(model)
        self.vocab = vocab_width(model)
        self.lengths: list[int] = []  # of the prefilled sequences
        self.entries: list[tuple[torch.Tensor, torch.Tensor]] = []  # prefill keys / values (S, kv_heads, L, d)
        self.branches: list[Branch] = []
        self._started = False

    # ---- building -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``sequences`` as one right-padded batch; returns logits (sum len, vocab) and hidden states
        (sum len, H), rows in sequence order (row j of sequence s reads its token j)."""
        if self.lengths:
            raise InvalidParameterError("prefill once, before any fork: build a new BranchDecoder per batch")
        if not sequences or any(not s for s in sequences):
            raise InvalidParameterError("prefill needs non-empty sequences")
        self.lengths = [len(s) for s in sequences]
        width = max(self.lengths)
        ids = torch.zeros(len(sequences), width, dtype=torch.long)
        mask = torch.zeros(len(sequences), width, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        cache = new_cache()
        logits, hidden = model_logits_and_hidden(self.model, ids.to(self.device), cache,
                                                 attention_mask=mask.to(self.device))
        self.entries = cache_entries(cache)
        keep = mask.bool().to(logits.device)
        return logits[..., : self.vocab][keep], hidden[keep]

    def fork(self, sequence: int, length: int, token: int, max_new_tokens: int) -> Branch:
        """A branch reading the first ``length`` tokens of prefilled ``sequence``, then ``token`` at position
        ``length``; it continues for up to ``max_new_tokens`` tokens (0: only the hidden state at ``token``)."""
        if self._started:
            raise InvalidParameterError("fork before run(): the prefill is released once the branches start")
        if not 0 <= sequence < len(self.lengths) or not 0 <= length <= self.lengths[sequence]:
            raise InvalidParameterError(f"fork at sequence {sequence}, length {length}: outside the prefill "
                                        f"(lengths {self.lengths})")
        branch = Branch(sequence, pending=token, position=length, max_new_tokens=max_new_tokens)
        self.branches.append(branch)
        return branch

    # ---- decoding -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self) -> list[Branch]:
        self._started = True
        if self.branches:
            placed, entries = self._first_step()
            self._continue(placed, entries)
        self.entries = []
        return self.branches

    def _first_step(self):
        """Stage 2: every fork reads its token over its sequence's prefill; returns, for each fork, the batch row
        and cache slot of that token, and the keys / values after the step."""
        sequences = sorted({b.sequence for b in self.branches})
        row_of = {s: r for r, s in enumerate(sequences)}
        by_row: list[list[Branch]] = [[] for _ in sequences]
        for branch in self.branches:
            by_row[row_of[branch.sequence]].append(branch)
        queries = max(len(forks) for forks in by_row)
        width = self.entries[0][0].shape[-2]
        index = torch.tensor(sequences, device=self.entries[0][0].device)
        cache = cache_from_entries([(k.index_select(0, index), v.index_select(0, index)) for k, v in self.entries],
                                   width + queries)
        ids = torch.zeros(len(sequences), queries, dtype=torch.long)
        positions = torch.zeros(len(sequences), queries, dtype=torch.long)
        mask = torch.zeros(len(sequences), 1, queries, width + queries, dtype=torch.bool)
        mask[:, 0, torch.arange(queries), width + torch.arange(queries)] = True  # every query sees itself
        for row, forks in enumerate(by_row):
            for q, branch in enumerate(forks):
                ids[row, q], positions[row, q] = branch.pending, branch.position
                mask[row, 0, q, : branch.position] = True
        logits, hidden = model_logits_and_hidden(self.model, ids.to(self.device), cache, positions.to(self.device),
                                                 mask.to(self.device))
        following = logits[..., : self.vocab].argmax(-1).tolist()
        for row, forks in enumerate(by_row):
            for q, branch in enumerate(forks):
                branch.hidden = hidden[row, q].float().cpu()
                if branch.max_new_tokens == 0:
                    branch.done = True
                else:
                    self._emit(branch, following[row][q])
        placed = {id(b): (row, width + q) for row, forks in enumerate(by_row) for q, b in enumerate(forks)}
        return [placed[id(b)] for b in self.branches], cache_entries(cache)

    def _continue(self, placed: list[tuple[int, int]], entries: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Stage 3: one batch row per branch still running, until every one is done."""
        live = [i for i, b in enumerate(self.branches) if not b.done]
        if not live:
            return
        prefix = max(self.branches[i].position for i in live)  # slots before the next token's
        capacity = prefix + max(self.branches[i].max_new_tokens - len(self.branches[i].tokens) for i in live) + 1
        # Gather each row's cache: left pad, its sequence's first `position - 1` prefill slots, its fork slot.
        source_rows = torch.tensor([placed[i][0] for i in live])
        slot_index = torch.zeros(len(live), prefix, dtype=torch.long)
        attention = torch.zeros(len(live), capacity, dtype=torch.long)
        for row, i in enumerate(live):
            branch, (_, fork_slot) = self.branches[i], placed[i]
            read = branch.position - 1  # prefill tokens the fork token follows
            pad = prefix - read - 1
            slot_index[row, pad : pad + read] = torch.arange(read)
            slot_index[row, prefix - 1] = fork_slot
            attention[row, pad:prefix] = 1
        device = entries[0][0].device
        gathered = [(_gather(k, source_rows.to(device), slot_index.to(device)),
                     _gather(v, source_rows.to(device), slot_index.to(device))) for k, v in entries]
        cache = cache_from_entries(gathered, capacity)
        del gathered, entries
        length = prefix
        while live:
            # One token per live row, each at its own position; the pad stays masked.
            ids = torch.tensor([[self.branches[i].pending] for i in live], device=self.device)
            positions = torch.tensor([[self.branches[i].position] for i in live], device=self.device)
            attention[:, length] = 1
            logits, _ = model_logits_and_hidden(self.model, ids, cache, positions,
                                                attention[:, : length + 1].to(self.device))
            length += 1
            following = logits[:, -1, : self.vocab].argmax(-1).tolist()
            for row, i in enumerate(live):
                self._emit(self.branches[i], following[row])
            finished = [row for row, i in enumerate(live) if self.branches[i].done]
            if len(finished) == len(live):
                break
            if finished and len(finished) >= DROP_SHARE * len(live):
                keep = torch.tensor([row for row, i in enumerate(live) if not self.branches[i].done])
                select_cache_rows(cache, keep)
                attention = attention[keep]
                live = [live[row] for row in keep.tolist()]

    def _emit(self, branch: Branch, token: int) -> None:
        """Append the token a step produced for ``branch`` (a finished branch in a batch row ignores it)."""
        if branch.done:
            return
        branch.tokens.append(token)
        branch.pending, branch.position = token, branch.position + 1
        branch.done = token in self.eos_token_ids or len(branch.tokens) >= branch.max_new_tokens
        if self.loop_window and len(branch.tokens) > self.loop_window:
            branch._seen.add(tuple(branch.tokens[-self.loop_window - 1 : -1]))  # the window one token back
            branch.looped = tuple(branch.tokens[-self.loop_window :]) in branch._seen
            branch.done = branch.done or branch.looped


def _gather(entries: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(S, kv_heads, L, d) -> (B, kv_heads, n, d): row b takes source row rows[b] at the slots slots[b]."""
    by_slot = entries.transpose(1, 2)  # (S, L, kv_heads, d)
    return by_slot[rows[:, None], slots].transpose(1, 2).contiguous()


@torch.inference_mode()
def greedy_answers(
    model, prompts: list[list[int]], max_new_tokens: int, eos_token_ids: set[int], loop_window: int = 0
) -> list[list[int]]:
    """The greedy answer (new tokens, up to and with an EOS) of every prompt, decoded side by side; one that
    loops (see :class:`BranchDecoder`) comes back cut, without an EOS."""
    decoder = BranchDecoder(model, eos_token_ids, loop_window)
    logits, _ = decoder.prefill(prompts)
    ends = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    firsts = logits[ends.to(logits.device)].argmax(-1).tolist()  # the token after each prompt
    branches = [decoder.fork(s, len(p), first, max_new_tokens - 1 if first not in eos_token_ids else 0)
                for s, (p, first) in enumerate(zip(prompts, firsts))]
    decoder.run()
    return [[first] + b.tokens for first, b in zip(firsts, branches)]
