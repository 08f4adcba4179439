"""Greedy decoding of many branches at once in one KV cache: a token tree grown one level per forward.

Label mining (:mod:`src.data.mining`) needs many independent greedy continuations: the target's answers to
several prompts, then, for every draft/target mismatch inside an answer, the continuation that follows the
draft's token. On a CPU a forward over 16 tokens costs about twice one over 1 token, so decoding them one
after another wastes most of each forward. Here every branch lives in the same cache (batch row 0):

- :meth:`BranchDecoder.prefill` encodes independent sequences in one forward (block-diagonal causal mask,
  positions restarting at 0 for each), so forks of one answer share its prefix instead of re-encoding it;
- a branch sees a set of cache slots (its prefix) plus the slots of its own tokens; one :meth:`step` feeds the
  pending token of every live branch, with a 4D mask (1, 1, n, slots + n) (True = attend) and each branch's
  own position ids, exactly the tree attention of :mod:`src.decoding.tree`;
- finished branches stop; once most slots belong to no live branch the cache is compacted
  (:func:`src.decoding.kv.keep_cache_positions`: rotary positions were applied when the keys were written,
  so moving a slot changes nothing).

Results equal sequential greedy decoding up to floating-point reassociation of the wider matmuls (a tie
within ~1e-6 in float32 may break the other way).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from src.decoding.base import input_device, model_logits_and_hidden, vocab_width
from src.decoding.kv import keep_cache_positions, new_cache
from src.errors import InvalidParameterError

COMPACT_MIN_SLOTS = 512  # below this the dead slots cost less than the gather that drops them


@dataclass
class Branch:
    """One greedy continuation: reads ``pending`` at ``position`` next; emits ``tokens`` (the fork token is not
    one of them); stops after an EOS or ``max_new_tokens`` tokens. ``hidden`` (H,): the final-norm hidden state
    reading the fork token (set by the first step)."""

    pending: int
    position: int
    max_new_tokens: int
    tokens: list[int] = field(default_factory=list)
    hidden: torch.Tensor | None = None
    done: bool = False


class BranchDecoder:
    """Prefill sequences, fork branches off their prefixes, then :meth:`run` every branch greedily to its end."""

    def __init__(self, model, eos_token_ids: set[int]) -> None:
        self.model, self.eos_token_ids = model, set(eos_token_ids)
        self.device = input_device(model)
        self.vocab = vocab_width(model)
        self.cache = new_cache()
        self.slots = 0  # cache entries written so far
        self.starts: list[int] = []  # first slot of each prefilled sequence
        self.branches: list[Branch] = []
        self._visible = torch.zeros(0, 0, dtype=torch.bool)  # (branches, capacity): slots each branch attends to
        self._started = False

    # ---- building -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``sequences`` side by side in one forward; returns logits (sum len, vocab) and hidden states
        (sum len, H), rows in sequence order (row j of sequence s reads its token j)."""
        if self._started or self.slots:
            raise InvalidParameterError("prefill once, before any fork: build a new BranchDecoder per batch")
        if not sequences or any(not s for s in sequences):
            raise InvalidParameterError("prefill needs non-empty sequences")
        lengths = [len(s) for s in sequences]
        total = sum(lengths)
        mask = torch.zeros(total, total, dtype=torch.bool)
        positions, start = [], 0
        for length in lengths:
            mask[start : start + length, start : start + length] = torch.ones(length, length).tril().bool()
            positions.extend(range(length))
            self.starts.append(start)
            start += length
        ids = torch.tensor([[t for s in sequences for t in s]], device=self.device)
        logits, hidden = model_logits_and_hidden(
            self.model, ids, self.cache, torch.tensor([positions], device=self.device), mask[None, None].to(self.device)
        )
        self.slots = total
        return logits[0, :, : self.vocab], hidden[0]

    def fork(self, sequence: int, length: int, token: int, max_new_tokens: int) -> Branch:
        """A branch reading the first ``length`` tokens of prefilled ``sequence``, then ``token`` at position
        ``length``; it continues for up to ``max_new_tokens`` tokens (0: only the hidden state at ``token``)."""
        if self._started:
            raise InvalidParameterError("fork before run(): a running decoder may already have dropped the slots")
        row = torch.zeros(max(self.slots, 1), dtype=torch.bool)
        row[self.starts[sequence] : self.starts[sequence] + length] = True
        self._visible = torch.cat([_pad_columns(self._visible, row.numel()), row[None]])
        branch = Branch(pending=token, position=length, max_new_tokens=max_new_tokens)
        self.branches.append(branch)
        return branch

    # ---- decoding -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self) -> list[Branch]:
        self._started = True
        while self.step():
            pass
        return self.branches

    @torch.inference_mode()
    def step(self) -> bool:
        """One forward over the pending token of every live branch; False when none is left."""
        live = [i for i, b in enumerate(self.branches) if not b.done]
        if not live:
            return False
        self._started = True
        self._maybe_compact(live)
        n = len(live)
        # Step 1: each live branch attends to its visible slots and to its own new token (appended at the end).
        self._visible = _pad_columns(self._visible, self.slots + n)
        index = torch.tensor(live)
        new_slots = torch.arange(self.slots, self.slots + n)
        self._visible[index, new_slots] = True
        mask = self._visible[index][:, : self.slots + n]  # (n, slots + n)
        ids = torch.tensor([[self.branches[i].pending for i in live]], device=self.device)
        positions = torch.tensor([[self.branches[i].position for i in live]], device=self.device)
        logits, hidden = model_logits_and_hidden(self.model, ids, self.cache, positions,
                                                 mask[None, None].to(self.device))
        self.slots += n
        # Step 2: the argmax is each branch's next token.
        nxt = logits[0, :, : self.vocab].argmax(-1).tolist()
        for j, i in enumerate(live):
            branch = self.branches[i]
            if branch.hidden is None:
                branch.hidden = hidden[0, j].float().cpu()
            if branch.max_new_tokens == 0:
                branch.done = True
                continue
            branch.tokens.append(nxt[j])
            branch.pending, branch.position = nxt[j], branch.position + 1
            branch.done = nxt[j] in self.eos_token_ids or len(branch.tokens) >= branch.max_new_tokens
        return True

    def _maybe_compact(self, live: list[int]) -> None:
        """Drop the slots no live branch attends to once they are most of the cache."""
        if self.slots < COMPACT_MIN_SLOTS:
            return
        needed = self._visible[torch.tensor(live), : self.slots].any(0)
        kept = int(needed.sum())
        if kept * 2 > self.slots:
            return
        keep = needed.nonzero().squeeze(-1)
        keep_cache_positions(self.cache, 0, keep.to(self.device))
        self._visible = self._visible[:, keep]
        self.slots = kept


def _pad_columns(matrix: torch.Tensor, width: int) -> torch.Tensor:
    """``matrix`` with at least ``width`` columns (False-filled; capacity doubles to amortize the copies)."""
    if matrix.shape[1] >= width:
        return matrix
    grown = torch.zeros(matrix.shape[0], max(width, 2 * matrix.shape[1]), dtype=torch.bool)
    grown[:, : matrix.shape[1]] = matrix
    return grown


@torch.inference_mode()
def greedy_answers(model, prompts: list[list[int]], max_new_tokens: int, eos_token_ids: set[int]) -> list[list[int]]:
    """The greedy answer (new tokens, up to and with an EOS) of every prompt, decoded side by side."""
    decoder = BranchDecoder(model, eos_token_ids)
    logits, _ = decoder.prefill(prompts)
    ends = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    firsts = logits[ends].argmax(-1).tolist()  # the token after each prompt
    branches = [decoder.fork(s, len(p), first, max_new_tokens - 1 if first not in eos_token_ids else 0)
                for s, (p, first) in enumerate(zip(prompts, firsts))]
    decoder.run()
    return [[first] + b.tokens if max_new_tokens > 1 else [first] for first, b in zip(firsts, branches)]
