"""A reference language model with a closed-form next-token distribution, for exactness tests.

:class:`ToyLM` is a seeded random *trigram* model over a small vocabulary: the logits at a position depend
only on (the token at that position, the previous token it can see). It has the interface the decoding
methods use on Hugging Face models::

    out = model(input_ids=(1, n), cache=DynamicCache, position_ids=(1, n) | None,
                attention_mask=None | 4D (1, 1, n, cached + n), use_cache=True)
    out.logits  # (1, n, vocab) float32

and it really goes through the cache: the token ids themselves are stored as keys / values (1, 1, seq, 1)
of a one-layer ``DynamicCache``, so :func:`src.decoding.kv.truncate_cache` and
:func:`src.decoding.kv.keep_cache_positions` act on it exactly as on a real model, and a wrong rollback gives
wrong logits. With a 4D tree mask, the "previous token" of a query is the latest position it may attend to
before itself, so a wrong mask, a wrong cache gather or wrong ``position_ids`` (they must equal the number
of visible earlier positions, as a depth-based position does) changes the logits or raises.

Because p(x | context) is known in closed form (:meth:`ToyLM.exact_next_probs`), so is the joint law of the
first few generated tokens (:meth:`ToyLM.exact_joint`), which is what the lossless methods must reproduce.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from transformers import DynamicCache

from src.decoding.sampling import SamplingConfig, logits_to_probs

PAD_LOGIT = -1e4  # logit of the padding columns (``pad_vocab``): probability exactly 0 in float32


@dataclass
class ToyOutput:
    """What a forward returns: ``logits`` (1, n, vocab) float32 and the cache it appended to."""

    logits: torch.Tensor
    cache: DynamicCache


class ToyLM(nn.Module):
    """Seeded random trigram model: ``logits(cur, prev) = table[prev, cur]``, ``prev = vocab_size`` when none.

    Args:
        vocab_size: number of real tokens (ids ``0 .. vocab_size - 1``).
        seed: seeds the logit table (same seed -> same model).
        scale: standard deviation of the logits (larger = peakier distributions).
        pad_vocab: extra logit columns after the real vocabulary with logit ``PAD_LOGIT`` (probability 0),
            like the padded ``lm_head`` of large models (Qwen2.5 0.5B: 151936 columns, 7B: 152064).
        eos_token_id: a token id callers may treat as EOS (exposed as ``generation_config.eos_token_id``).
    """

    def __init__(
        self,
        vocab_size: int = 20,
        seed: int = 0,
        scale: float = 2.0,
        pad_vocab: int = 0,
        eos_token_id: int | None = None,
    ) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size} is invalid: use a vocabulary of at least 2 tokens")
        if pad_vocab < 0:
            raise ValueError(f"pad_vocab={pad_vocab} is negative: use 0 for no padding columns")
        if eos_token_id is not None and not 0 <= eos_token_id < vocab_size:
            raise ValueError(f"eos_token_id={eos_token_id} is outside the vocabulary [0, {vocab_size})")
        generator = torch.Generator().manual_seed(seed)
        # table[prev, cur] = logits of the next token; row prev == vocab_size means "no previous token".
        table = torch.randn(vocab_size + 1, vocab_size, vocab_size, generator=generator) * scale
        self.register_buffer("table", table)  # (vocab + 1, vocab, vocab)
        self.vocab = vocab_size
        self.pad_vocab = pad_vocab
        self.eos_token_id = eos_token_id
        self.config = SimpleNamespace(vocab_size=vocab_size + pad_vocab)
        self.generation_config = SimpleNamespace(eos_token_id=eos_token_id)
        self.calls = 0

    # ---------------------------------------------------------------- variants

    def perturbed(self, noise: float, seed: int) -> ToyLM:
        """A draft-like copy: same vocabulary, table + noise * N(0, 1) (seeded), call counter at 0."""
        other = self.copy()
        generator = torch.Generator().manual_seed(seed)
        other.table += noise * torch.randn(self.table.shape, generator=generator).to(self.table.device)
        return other

    def copy(self) -> ToyLM:
        """An identical model (same table) with its own call counter at 0."""
        other = copy.deepcopy(self)
        other.calls = 0
        return other

    @property
    def device(self) -> torch.device:
        return self.table.device

    @property
    def dtype(self) -> torch.dtype:
        return self.table.dtype

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: DynamicCache | None = None,
        past_key_values: DynamicCache | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
        **kwargs,
    ) -> ToyOutput:
        object.__setattr__(self, "calls", self.calls + 1)  # plain attribute: skips nn.Module's slow __setattr__
        cache = cache if cache is not None else past_key_values
        if cache is None:
            cache = DynamicCache()
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"ToyLM takes input_ids of shape (1, n), got {tuple(input_ids.shape)}")
        n = input_ids.shape[1]

        # Step 1: append the new ids to the cache; keys (1, 1, cached + n, 1) then hold the whole sequence.
        cached = cache.get_seq_length()
        ids = input_ids.to(self.table.dtype).view(1, 1, n, 1)
        keys, _ = cache.update(ids, ids, 0)

        # Step 2: prev[i] = token at the latest position query i may attend to before itself (none: vocab).
        if attention_mask is None or attention_mask.dim() == 2:
            self._check_2d_mask(attention_mask, cached + n)
            prev, positions = self._causal_prev(keys, input_ids, cached)
        else:
            prev, positions = self._tree_prev(keys, attention_mask, n, cached)
        if position_ids is not None and position_ids.view(-1).tolist() != positions:
            raise ValueError(
                f"position_ids {position_ids.view(-1).tolist()} differ from the number of visible earlier "
                f"positions {positions}: a node's position must be prefix length + depth"
            )

        # Step 3: logits = table[prev, cur], padded to the advertised width.
        if n == 1 and isinstance(prev, list):  # basic indexing: the cheap path of one-token decoding
            logits = self.table[prev[0], int(input_ids[0, 0])][None]  # (1, vocab)
        else:
            logits = self.table[prev, input_ids[0]]  # (n, vocab)
        logits = self._pad(logits)  # (n, vocab + pad)
        return ToyOutput(logits=logits[None], cache=cache)

    def _causal_prev(self, keys: torch.Tensor, input_ids: torch.Tensor, cached: int) -> tuple[list[int], list[int]]:
        """Plain causal forward (the fast path): prev = the position right before, read back from the cache."""
        n = input_ids.shape[1]
        window = [round(v) for v in keys.view(-1)[max(cached - 1, 0) : cached + n - 1].tolist()]
        prev = window if cached else [self.vocab, *window]
        return prev, list(range(cached, cached + n))

    def _tree_prev(
        self, keys: torch.Tensor, attention_mask: torch.Tensor, n: int, cached: int
    ) -> tuple[torch.Tensor, list[int]]:
        """4D mask: prev = latest visible earlier position; positions = how many earlier positions are visible."""
        sequence = keys.view(-1).round().long()  # (total,)
        total = sequence.shape[0]
        before = self._visible_before(attention_mask, n, cached, total, sequence.device)  # (n, total)
        index = torch.arange(total, device=sequence.device)
        latest = torch.where(before, index, -1).amax(-1)  # (n,), -1 when nothing is visible
        prev = torch.where(latest >= 0, sequence[latest.clamp_min(0)], self.vocab)  # (n,)
        return prev, before.sum(-1).tolist()

    @staticmethod
    def _check_2d_mask(attention_mask: torch.Tensor | None, total: int) -> None:
        if attention_mask is None:
            return
        if attention_mask.shape[-1] != total or not bool(attention_mask.bool().all()):
            raise ValueError(
                f"2D attention_mask {tuple(attention_mask.shape)} is unsupported by ToyLM: use None, all ones "
                f"over {total} positions, or a 4D mask"
            )

    def _visible_before(
        self, attention_mask: torch.Tensor, n: int, cached: int, total: int, device: torch.device
    ) -> torch.Tensor:
        """(n, total) bool from a 4D mask: query i (at position cached + i) sees earlier position j."""
        index = torch.arange(total, device=device)
        query_pos = cached + torch.arange(n, device=device)  # (n,)
        causal_before = index[None, :] < query_pos[:, None]  # (n, total)
        if attention_mask.dim() != 4 or tuple(attention_mask.shape[-2:]) != (n, total):
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)} is invalid: use (1, 1, {n}, {total})"
            )
        mask = attention_mask[0, 0]
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2  # (n, total)
        future = allowed & (index[None, :] > query_pos[:, None])
        if bool(future.any()):
            i, j = (int(v) for v in future.nonzero()[0])
            raise ValueError(f"attention_mask lets query {i} (position {cached + i}) attend to later position {j}")
        own = allowed[torch.arange(n, device=device), query_pos]
        if not bool(own.all()):
            i = int((~own).nonzero()[0])
            raise ValueError(f"attention_mask hides query {i} from itself: a tree mask must include the diagonal")
        return allowed & causal_before

    def _pad(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.pad_vocab:
            return logits
        padding = logits.new_full((*logits.shape[:-1], self.pad_vocab), PAD_LOGIT)
        return torch.cat([logits, padding], dim=-1)

    # ---------------------------------------------------------------- closed form

    def exact_next_logits(self, context: list[int]) -> torch.Tensor:
        """Logits (vocab + pad,) of the token after ``context`` (a non-empty list of ids)."""
        if not context:
            raise ValueError("context is empty: ToyLM needs at least one token to predict the next one")
        prev = context[-2] if len(context) >= 2 else self.vocab
        return self._pad(self.table[prev, context[-1]])

    def exact_next_probs(self, context: list[int], sampling: SamplingConfig) -> torch.Tensor:
        """p(. | context) (vocab + pad,) as every method computes it: ``logits_to_probs`` of the exact logits."""
        return logits_to_probs(self.exact_next_logits(context), sampling)

    def exact_joint(
        self,
        prompt: list[int],
        n: int,
        sampling: SamplingConfig,
        eos_token_ids: set[int] | frozenset[int] = frozenset(),
    ) -> dict[tuple[int, ...], float]:
        """Exact law of the first ``n`` generated tokens (n <= 3): {token tuple: probability} (float64).

        A sequence stops right after an EOS, so with ``eos_token_ids`` some tuples are shorter than ``n``.
        Tuples of probability 0 are left out; the values sum to 1.
        """
        if not 1 <= n <= 3:
            raise ValueError(f"n={n} is invalid: the exact joint is enumerated for 1 <= n <= 3 tokens")
        joint: dict[tuple[int, ...], float] = {}
        frontier: list[tuple[tuple[int, ...], float]] = [((), 1.0)]
        for _ in range(n):
            grown: list[tuple[tuple[int, ...], float]] = []
            for prefix, mass in frontier:
                probs = self.exact_next_probs(list(prompt) + list(prefix), sampling).double()
                for token in probs.nonzero().view(-1).tolist():
                    seq, seq_mass = (*prefix, token), mass * float(probs[token])
                    if token in eos_token_ids:
                        joint[seq] = seq_mass
                    else:
                        grown.append((seq, seq_mass))
            frontier = grown
        joint.update(frontier)
        total = sum(joint.values())
        return {seq: mass / total for seq, mass in joint.items()}

    def exact_window(
        self, prompt: list[int], start: int, n: int, sampling: SamplingConfig
    ) -> dict[tuple[int, ...], float]:
        """Exact law of generated tokens ``[start, start + n)`` (n <= 3, no EOS): {token tuple: probability}.

        The model is a Markov chain on (previous, current) token pairs, so the law of a later window is the
        pair distribution after ``start`` steps chained through n more steps; ``start=0`` equals
        :meth:`exact_joint`. This lets a test look at the deep positions of a long draft chain.
        """
        if not 1 <= n <= 3 or start < 0:
            raise ValueError(f"start={start}, n={n} is invalid: use start >= 0 and 1 <= n <= 3")
        if not prompt:
            raise ValueError("prompt is empty: ToyLM needs at least one token to predict the next one")
        v = self.vocab
        # Step 1: transition P[prev, cur, x] = p(x | prev, cur) for every pair (prev == v: none), (v + 1, v, v).
        logits = self.table.reshape(-1, v)  # ((v + 1) * v, v)
        transition = logits_to_probs(self._pad(logits), sampling)[:, :v].double().reshape(v + 1, v, v)
        # Step 2: state d[prev, cur] after the prompt, pushed through `start` generated tokens:
        # d'[cur, x] = sum_prev d[prev, cur] * P[prev, cur, x].
        state = torch.zeros(v + 1, v, dtype=torch.float64)
        state[prompt[-2] if len(prompt) >= 2 else v, prompt[-1]] = 1.0
        for _ in range(start):
            state = torch.cat([(state[:, :, None] * transition).sum(0), state.new_zeros(1, v)])
        # Step 3: chain the window: J[x1] or J[x1, x2] marginalize the state, then J[.., a, b, c] *= P[a, b, c].
        joint = (state[:, :, None] * transition).sum(0)  # (v, v) over (token before the window, x1)
        joint = (joint[:, :, None] * transition[:v]).sum(0) if n >= 2 else joint.sum(0)  # (v, v) or (v,)
        if n == 3:
            joint = joint[:, :, None] * transition[:v]  # (v, v, v)
        joint = joint / joint.sum()
        return {tuple(index): float(joint[tuple(index)]) for index in joint.nonzero().tolist()}

