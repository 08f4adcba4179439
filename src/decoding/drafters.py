"""Drafters: what proposes tokens, apart from what verifies them (a chain for speculative sampling, a tree for
SpecExec). Plain torch, no Lightning.

A drafter proposes; the verifier scores the proposal with one target forward and keeps a prefix of it; the
drafter is then told how much of the sequence was committed and rolls its own state back (a draft model's KV
cache; prompt lookup has none). Neither reaches into the other's state.

What a drafter can do is declared on its class (:class:`Drafter`'s capability attributes), and the verifiers
read those declarations, never the drafter's type:

    proposes_chains       propose(): a chain x_1..x_n with its q (SpeculativeSampling, AutoJudge)
    offers_continuations  continuations(): deterministic branches, merged into a trie (SpecExec)
    grows_trees           tree_growth(): a TreeGrowth whose q SpecExec's best-first growth ranks children by
    needs_draft_model     every method's generate must be given a draft model

Probability convention: ``q`` is the distribution a proposed token was drawn from. A deterministic proposal
(prompt lookup, a greedy draft) has a one-hot ``q``; the chain verifier's rule then reads "accept x with
probability p(x), else sample from p with x removed, renormalized", which is still exact.

Implementations:

- :class:`ModelDrafter`: a draft LM with its KV cache (the default of every draft method); its tree form is
  :class:`ModelGrowth`;
- :class:`PromptLookup`: n-gram lookup in the prompt and the text generated so far (Saxena 2023; HF's
  ``prompt_lookup_num_tokens`` / ``max_matching_ngram_size``): free, and strong where the output copies its
  input (summaries, retrieval-augmented answers, code edits). Its tree form offers several matches as sibling
  branches for SpecExec's tree verification;
- :class:`src.decoding.eagle.EagleDrafter`: a trained head on the target's features (chains and trees).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from src.decoding.base import _cache_keyword, input_device, model_logits, model_logits_and_hidden
from src.decoding.kv import cache_length, keep_after_prefix, new_cache, truncate_cache
from src.decoding.sampling import SamplingConfig, logits_to_probs, sample
from src.decoding.tree import DraftTree, TreeGrowth, growth_mask, tree_position_ids
from src.errors import InvalidParameterError, check_positive_int

if TYPE_CHECKING:
    from src.decoding.token_map import TokenMap

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
    """Proposes tokens for a verifier. One instance serves one method; ``begin`` starts each generation.

    The capability attributes below say what the drafter can do (see the module docstring); a drafter that
    declares one implements the matching method, the others raise NotImplementedError naming the capability.
    """

    name: str = "drafter"
    # ---- capabilities, read by the verifiers
    proposes_chains: bool = True  # propose()
    offers_continuations: bool = False  # continuations()
    grows_trees: bool = False  # tree_growth()
    needs_draft_model: bool = False
    max_branches: int = 1  # sibling branches its continuations offer: a tree option (a chain takes one)
    needs_target_features: bool = False  # commit() then gets the target's features of the committed positions
    # which features: None = the final-norm last hidden state (EAGLE-1/2); target layer ids = the concatenated
    # inputs of those layers (EAGLE-3's aux layers). A drafter that reads them sets it by the end of begin().
    feature_layers: tuple[int, ...] | None = None

    def params(self) -> dict[str, Any]:
        """Every parameter that shapes the drafts, defaults included (src.results.keys decides what a record
        carries)."""
        return {}

    def prepare(self, target_info: dict[str, Any] | None) -> None:
        """Called once the models are loaded, with the target's identity (a trained head checks it)."""
        return None

    def input_files(self) -> list[str]:
        """Files the drafter reads (a token map, a trained head): hashed into the run fingerprint."""
        return []

    @abstractmethod
    def begin(self, draft_model, vocab: int, device: torch.device, target=None) -> None:
        """Start a generation: fresh state (cache, index) for a new prompt. ``target``: the verifier's model, for
        drafters that read it (a trained head uses its embeddings and lm_head)."""

    def propose(
        self,
        sequence: list[int],
        k: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        stop_below: float = 0.0,
    ) -> Proposal:
        """Up to ``k`` tokens to follow ``sequence`` (prompt + committed tokens). ``stop_below``: a drafter with
        a confidence stops once its confidence in its own token falls below it (0: never). (``proposes_chains``)"""
        raise NotImplementedError(f"drafter {self.name!r} proposes no chain (proposes_chains is False)")

    def commit(self, length: int, features: torch.Tensor | None = None) -> None:
        """The verifier kept ``sequence[:length]``: forget state about anything after it. ``features`` (only for
        drafters with ``needs_target_features``): the target's final-norm hidden states (m, H) of the positions it
        read and kept in this cycle, i.e. up to ``length - 1``."""
        return None

    def continuations(self, sequence: list[int], depth: int, limit: int | None = None) -> list[list[int]]:
        """Distinct continuations of ``sequence``, up to ``depth`` tokens each and at most ``limit`` (None:
        ``max_branches``) of them, best first (``offers_continuations``)."""
        raise NotImplementedError(f"drafter {self.name!r} offers no continuations (offers_continuations is False)")

    def tree_growth(self, draft_model, vocab: int, device: torch.device, target=None) -> TreeGrowth:
        """Start a generation of SpecExec's best-first growth: what scores the tree's children (``grows_trees``)."""
        raise NotImplementedError(f"drafter {self.name!r} grows no tree (grows_trees is False)")

    def tree_refusal(self) -> str | None:
        """Why SpecExec cannot use this drafter as configured, as a one-line message naming the fix (None: it can)."""
        if self.grows_trees or self.offers_continuations:
            return None
        return (f"drafter {self.name!r} has no tree form: use it with speculative sampling, or use PromptLookup, "
                "EagleDrafter or the draft model with SpecExec")


def greedy_token(logits: torch.Tensor, vocab: int, ids: torch.Tensor | None) -> torch.Tensor:
    """The greedy draft token (1,) from logits (V_draft,), or (N,) over the subset ``ids`` (N,): the argmax over the
    shared ids [0, vocab), or over the subset (its ids ascend, so a tie goes to the smaller id as in a full
    argmax)."""
    if ids is None:
        return logits[:vocab].argmax(-1, keepdim=True)
    return ids[logits.argmax(-1, keepdim=True)]


def widen(logits: torch.Tensor, vocab: int, ids: torch.Tensor | None) -> torch.Tensor:
    """Logits (..., V_draft) or (..., N) over the subset ``ids`` -> (..., vocab) over the shared ids: -inf outside
    the subset, so that ``logits_to_probs`` warps them the one shared way and q is exactly 0 there."""
    if ids is None:
        return logits[..., :vocab]
    return logits.new_full((*logits.shape[:-1], vocab), float("-inf")).index_copy_(-1, ids, logits)


class ModelDrafter(Drafter):
    """A draft LM with its own KV cache: x_i ~ q_i, one draft forward per proposed token.

    The first forward of a proposal also feeds every committed token the draft cache has not seen yet (the whole
    prompt in the first cycle, then the newest token, plus the last draft token after a fully accepted chain).

    Args:
        hidden_states: also return the draft's hidden state reading each drafted token. The state of x_i comes
            out of the forward that reads x_i, so a chain of n tokens costs n + 1 forwards (AutoJudge).
        top_tokens: score only this many token ids (FR-Spec, Zhao et al. 2025): the draft's output layer is cut
            to the rows of the most frequent ids of ``token_map`` plus the draft's EOS ids, so a draft forward
            skips most of its lm_head matmul (~20% of SmolLM2-135M's forward, most of a 128k-vocabulary draft's).
            q is then zero outside those ids and a greedy draft is the argmax among them; the verifier is exact
            for any q, so the output is unchanged, only the acceptance may drop. None: every id. Chains only.
        token_map: the JSON map ranking the ids (:mod:`src.decoding.token_map` builds it); set with top_tokens.
    """

    name = "draft_model"
    needs_draft_model = True
    grows_trees = True  # the full draft (ModelGrowth); a restricted one drafts chains only (set in __init__)

    def __init__(self, hidden_states: bool = False, *, top_tokens: int | None = None,
                 token_map: str | None = None) -> None:
        self.hidden_states = hidden_states
        self.top_tokens, self.token_map = top_tokens, token_map
        self.table: TokenMap | None = _read_subset_map(top_tokens, token_map)  # a bad file fails before any load
        self.head: RestrictedHead | None = None  # built by begin, reused while the draft model stays the same
        self.grows_trees = top_tokens is None  # SpecExec ranks children over the full draft vocabulary

    def params(self) -> dict[str, Any]:
        return {"top_tokens": self.top_tokens, "token_map": Path(self.token_map).name if self.token_map else None}

    def input_files(self) -> list[str]:
        """The token map, when set: a run fingerprint hashes it (a rebuilt map changes the drafts)."""
        return [str(self.token_map)] if self.token_map is not None else []

    def begin(self, draft_model, vocab: int, device: torch.device, target=None) -> None:
        if draft_model is None:
            raise InvalidParameterError("the draft-model drafter needs a draft model: set model.draft in the config")
        self.model, self.vocab, self.device = draft_model, vocab, device
        self.cache = new_cache()
        if self.table is not None and not (self.head is not None and self.head.fits(draft_model, vocab)):
            self.head = restrict_head(draft_model, self.table, self.top_tokens, vocab)

    def propose(self, sequence, k, sampling, generator, stop_below=0.0) -> Proposal:
        """k draft forwards (fewer when the confidence falls below ``stop_below``); q (n, vocab) when sampling."""
        drafts: list[torch.Tensor] = []  # (1,) each, left on the device: no host sync per draft token on a GPU
        q_rows: list[torch.Tensor] = []
        hidden_rows: list[torch.Tensor] = []
        ids = self.head.ids if self.head is not None else None  # (N,) the subset, or None: every id
        step_input = torch.tensor([sequence[cache_length(self.cache) :]], device=self.device)  # (1, m >= 1)
        for _ in range(k):
            logits = self._forward(step_input, hidden_rows)  # (V_draft,), or (N,) over the subset ids
            if sampling.greedy:  # q is one-hot: the acceptance rule only needs the tokens
                q_i = None
                token = greedy_token(logits, self.vocab, ids)  # (1,)
            else:
                q_i = logits_to_probs(widen(logits, self.vocab, ids), sampling)  # (V,), zero outside a subset
                token = sample(q_i[None], generator)  # (1,)
                q_rows.append(q_i)
            drafts.append(token)
            step_input = token[None]  # (1, 1)
            if stop_below and _confidence(widen(logits, self.vocab, ids), q_i, token, sampling) < stop_below:
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
        """One draft forward; returns the last row's logits, (V_draft,) or (N,) when restricted, and records its
        hidden state if asked."""
        if self.head is not None:
            hidden = self.head.body(step_input, self.cache)  # (1, H)
            if self.hidden_states:
                hidden_rows.append(hidden[0])
            return self.head.logits(hidden)[0]  # (N,)
        if not self.hidden_states:
            return model_logits(self.model, step_input, self.cache, logits_to_keep=1)[0, -1]
        logits, hidden = model_logits_and_hidden(self.model, step_input, self.cache, logits_to_keep=1)
        hidden_rows.append(hidden[0, -1])
        return logits[0, -1]

    def commit(self, length: int, features: torch.Tensor | None = None) -> None:
        truncate_cache(self.cache, length)

    def tree_growth(self, draft_model, vocab: int, device: torch.device, target=None) -> ModelGrowth:
        """The draft model grows SpecExec's tree from a fresh cache of its own (this drafter's chain state is
        not used)."""
        return ModelGrowth(draft_model, new_cache(), vocab, device)

    def tree_refusal(self) -> str | None:
        if self.top_tokens is not None:
            return ("top_tokens restricts a chain drafter, but SpecExec grows its tree from the full draft: drop "
                    "top_tokens / token_map, or use SpeculativeSampling")
        return super().tree_refusal()


class ModelGrowth(TreeGrowth):
    """Tree growth on a draft model: its cache holds the committed prefix (root included) then the expanded
    nodes (``slots``) in expansion order."""

    def __init__(self, draft, cache, vocab: int, device: torch.device) -> None:
        self.draft, self.cache, self.vocab, self.device = draft, cache, vocab, device

    def root_logits(self, committed: list[int]) -> torch.Tensor:
        """One causal forward over the committed tokens the draft has not cached (the root, plus the last
        accepted node when the draft never ran on it): q(. | root) is the last row, (1, V)."""
        chain = torch.tensor([committed[cache_length(self.cache) :]], device=self.device)  # (1, m)
        return model_logits(self.draft, chain, self.cache, logits_to_keep=1)[0, -1:, : self.vocab]

    def expand_logits(self, tree: DraftTree, batch: list[int], slots: list[int], root_position: int) -> torch.Tensor:
        """q(. | path to node) for the b nodes of ``batch``, in one forward with a growth mask: (b, V)."""
        mask = growth_mask(tree, batch, slots, root_position + 1).to(self.device)  # (1, 1, b, prefix + s + b)
        positions = torch.tensor([tree_position_ids(tree, batch, root_position)], device=self.device)  # (1, b)
        tokens = torch.tensor([[tree.tokens[node] for node in batch]], device=self.device)  # (1, b)
        return model_logits(self.draft, tokens, self.cache, positions, mask)[0, :, : self.vocab]

    def keep_path(self, prefix_len: int, kept_slots: list[int]) -> None:
        keep_after_prefix(self.cache, prefix_len, kept_slots)


def _read_subset_map(top_tokens: int | None, token_map: str | None) -> TokenMap | None:
    """The token map of a restricted drafter (None when unrestricted), checked against ``top_tokens``."""
    if (top_tokens is None) != (token_map is None):
        given, missing = ("top_tokens", "token_map") if token_map is None else ("token_map", "top_tokens")
        raise InvalidParameterError(
            f"{given} is set without {missing}: set both (e.g. top_tokens: 16384, token_map: "
            "artifacts/token_map.json) or neither"
        )
    if top_tokens is None:
        return None
    check_positive_int("top_tokens", top_tokens, "use an integer >= 1 (e.g. 16384)")
    # Imported here, not at the top: `python -m src.decoding.token_map` (its CLI) must find the module not yet
    # imported by the package (src.decoding -> speculative -> drafters), or runpy warns and runs it twice.
    from src.decoding.token_map import read_token_map

    table = read_token_map(token_map)
    if top_tokens > table.vocab_size:
        raise InvalidParameterError(
            f"top_tokens={top_tokens} exceeds the {table.vocab_size} ids of token map {token_map}: "
            f"use top_tokens <= {table.vocab_size}"
        )
    return table


@dataclass
class RestrictedHead:
    """A draft's output layer cut to a token subset: ``ids`` (N,) ascending, ``weight`` (N, H) and ``bias`` (N,)
    their rows (copies: the model is never modified, tied input embeddings included), ``decoder`` the body
    whose last hidden state (after the final norm) the output layer reads."""

    model: Any
    source: torch.Tensor  # the full output weight the rows were cut from
    version: int  # its version counter then: an in-place edit of the weights means a new cut
    vocab: int
    decoder: Any
    ids: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None

    def fits(self, model, vocab: int) -> bool:
        """Still valid for ``model`` and the shared vocabulary (same weights, unmodified)?"""
        source = _output_layer(model).weight
        return self.model is model and self.vocab == vocab and self.source is source and self.version == source._version

    def body(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        """The draft without its output layer: the last position's final hidden state (1, H)."""
        out = self.decoder(input_ids=input_ids, **{_cache_keyword(type(self.decoder)): cache}, use_cache=True)
        # (1, H) with unit row stride: a (1, 1, H) slice of (1, m, H) keeps the batch stride m * H, and bfloat16
        # CPU matmuls run ~25x slower on it (32768 x 576 rows: 27 ms instead of 1 ms).
        return out.last_hidden_state[0, -1:]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., N): the output layer on the subset rows only."""
        return torch.nn.functional.linear(hidden.to(self.weight.device), self.weight, self.bias)


def restrict_head(model, table: TokenMap, top_tokens: int, vocab: int) -> RestrictedHead:
    """Cut ``model``'s output layer to the subset's rows and check, on one token, that body + cut rows give the
    model's own logits on those ids."""
    head, decoder = _output_layer(model), model.get_decoder()
    ids = table.select(top_tokens, vocab, include=draft_eos_ids(model, vocab))  # (N,) ascending
    with torch.no_grad():
        rows = ids.to(head.weight.device)
        weight = head.weight.detach().index_select(0, rows)  # (N, H), a contiguous copy
        bias = head.bias.detach().index_select(0, rows) if getattr(head, "bias", None) is not None else None
    cut = RestrictedHead(model, head.weight, head.weight._version, vocab, decoder, rows, weight, bias)
    _check_cut(model, cut, top_tokens)
    return cut


def _output_layer(model):
    """The draft's output layer, refusing a model that cannot run without it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or not hasattr(model, "get_decoder"):
        raise InvalidParameterError(
            f"top_tokens needs a draft whose output layer can be cut (a transformers causal LM with get_decoder() "
            f"and get_output_embeddings()), but {type(model).__name__} has none: drop top_tokens / token_map"
        )
    return head


def _check_cut(model, cut: RestrictedHead, top_tokens: int) -> None:
    """One token through both paths. A model whose logits are not its output layer applied to its decoder's
    final hidden state (soft-capped, scaled: Gemma 2, Cohere, Granite) would draft from another q: still exact,
    but the acceptance would collapse silently, so it is refused here instead."""
    probe = cut.ids[:1].view(1, 1).to(input_device(model))  # (1, 1)
    with torch.no_grad():
        full = model(input_ids=probe, use_cache=False).logits[0, -1].float()  # (V_draft,)
        out = cut.decoder(input_ids=probe, use_cache=False)
        hidden = getattr(out, "last_hidden_state", None)
        sub = cut.logits(hidden[0, -1:])[0].float() if isinstance(hidden, torch.Tensor) else None  # (N,)
    expected = full[cut.ids.to(full.device)]
    # Both paths round the same products: bfloat16 drafts differ by ~0.4% of a logit at most.
    fits = sub is not None and sub.shape == expected.shape
    gap = float((sub.to(expected.device) - expected).abs().max()) if fits else None
    if gap is None or gap > 1e-2 * float(expected.abs().max()) + 1e-4:
        raise InvalidParameterError(
            f"top_tokens={top_tokens}: {type(model).__name__}'s logits are not its output layer applied to its "
            f"decoder's last hidden state (largest difference {gap}): drop top_tokens / token_map for this draft"
        )


def draft_eos_ids(model, vocab: int) -> list[int]:
    """The draft's EOS ids below ``vocab`` (generation config and model config): a restricted draft keeps them,
    so it can still propose the end of a generation."""
    found: set[int] = set()
    for holder in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(holder, "eos_token_id", None)
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(token, int) and not isinstance(token, bool) and 0 <= token < vocab:
                found.add(token)
    return sorted(found)


def _confidence(logits: torch.Tensor, q_i: torch.Tensor | None, token: torch.Tensor, sampling: SamplingConfig) -> float:
    """The draft's probability of its own token: q_i(x_i), or the raw softmax's under greedy decoding (over the
    subset when the drafter is restricted)."""
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
    offers_continuations = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_branches: int = 1) -> None:
        for label, value in (("max_ngram", max_ngram), ("min_ngram", min_ngram), ("max_branches", max_branches)):
            check_positive_int(label, value)
        if min_ngram > max_ngram:
            raise InvalidParameterError(
                f"min_ngram={min_ngram} > max_ngram={max_ngram}: use min_ngram <= max_ngram (e.g. 1 and 3)"
            )
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.max_branches = max_branches

    def params(self) -> dict[str, Any]:
        return {"max_ngram": self.max_ngram, "min_ngram": self.min_ngram, "max_branches": self.max_branches}

    def begin(self, draft_model, vocab: int, device: torch.device, target=None) -> None:
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
