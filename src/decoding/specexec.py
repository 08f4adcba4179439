"""SpecExec (Svirschevski et al., NeurIPS 2024): a best-first draft tree, verified in one target forward.

Each iteration (``p`` = target, ``q`` = draft, both through :func:`logits_to_probs`):

a. **Grow** a token tree from the root (the last committed token) by best-first search on the draft.
   score(node) = log q(path from the root to the node) = sum of log q along the path. Each round runs ONE
   batched draft forward over the ``max_beams`` best unexpanded nodes (4D tree mask, position = prefix length
   + depth), every expanded node proposes its top ``max_branch_width`` children, and only the ``budget`` best
   nodes of the whole tree are kept. Growth stops after ``max_depth`` rounds or when a round's children all
   fall outside the best ``budget``.
b. **Verify** the whole tree in ONE target forward with the same kind of mask: p at every node.
c. **Sample exactly from p**: draw t ~ p(. | root); while t is a child of the current node, descend to it and
   draw again from p there. The first draw that leaves the tree is emitted too and ends the iteration.
   Every emitted token is a draw from the target's conditional distribution given the tokens before it,
   whatever the tree: the method is lossless at any temperature / top-k / top-p, and greedy reproduces the
   target's greedy output. The tree only decides how many draws one target forward pays for.
d. **Compact** both KV caches to prefix + accepted path with :func:`keep_cache_positions`.

What grows the tree is declared by the drafter (:mod:`src.decoding.drafters`): one that ``grows_trees`` hands out a
:class:`~src.decoding.tree.TreeGrowth` (the draft model's, or an EAGLE head's: EAGLE-2) grown best-first as in a;
one that ``offers_continuations`` (prompt lookup) gives deterministic branches merged into a trie instead.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from src.decoding.base import (
    AUTO,
    DecodingMethod,
    GenerationState,
    input_device,
    model_logits,
    model_logits_and_hidden,
    shared_vocab,
)
from src.decoding.drafters import Drafter, ModelDrafter
from src.decoding.kv import cache_length, keep_after_prefix
from src.decoding.sampling import SamplingConfig, logits_to_probs, next_token
from src.decoding.stats import Generation
from src.decoding.timing import drafting
from src.decoding.tree import DraftTree, TreeGrowth, tree_position_ids, verify_mask
from src.errors import InvalidParameterError, check_positive_int

# Tree scoring under greedy decoding (see SpecExec.scoring): a sharpened draft softmax. On the embedded pair
# (fp32 target, bf16 draft; 10 MT-Bench prompts, 64 tokens, budget 16 / depth 8) temperature 1.0 gave 5.8 tokens
# per target call, 0.5 gave 7.4 and 0.3 gave 8.0 (the most depth 8 allows here); with the weaker NF4 draft
# 1.0 / 0.5 / 0.3 gave 3.8 / 3.9 / 3.7.
GREEDY_SCORING_TEMPERATURE = 0.3

# The (budget, max_depth) shapes that ``budget: auto, max_depth: auto`` chooses among, each decoded once on the
# calibration prompt at run start (src.lit.auto): from a near-chain to the shape of the SpecExec paper's CPU runs.
AUTO_SHAPES = ((4, 2), (8, 4), (16, 6), (32, 8))

class SpecExec(DecodingMethod):
    """SpecExec: exact sampling from the target along a best-first draft tree (see the module docstring).

    Args:
        budget: maximum number of drafted tree nodes (root excluded) verified per target forward.
        max_depth: maximum number of growth rounds (draft forwards) per iteration, hence the tree depth.
            ``budget: auto`` with ``max_depth: auto``: the fastest of :data:`AUTO_SHAPES` on a calibration prompt
            at run start (:mod:`src.lit.auto`).
        max_beams: nodes expanded per growth round, in one batched draft forward
            (``parallel_branches`` in the older tool).
        max_branch_width: children proposed by each expanded node (its top tokens under q).
        prune_threshold: children whose cumulative draft probability q(path) is below it are dropped
            (0 keeps every child with q > 0; ``branch_prune_threshold`` in the older tool).
        scoring_temperature: temperature of the draft softmax that ranks tree nodes (how likely each is to be
            accepted). None: the run's own q when sampling; under greedy decoding, where q is one-hot, 0.3
            (a greedy target takes the draft's argmax far more often than the raw softmax says, so a sharper
            score grows the likely path deeper). The tree never changes the output, only its length per call.
        drafter: what proposes the tree: a draft model grown best-first as above (default, ``ModelDrafter``), or a
            drafter with a tree form such as ``PromptLookup`` (its ``max_branches`` continuations become sibling
            branches, capped by ``budget`` nodes and ``max_depth``; no draft model; the method key becomes
            ``specexec+prompt_lookup``).

    Statistics: ``record_step(drafted, accepted)`` once per target verification, with
    ``drafted`` = the tree depth (the positions for which the tree offered some token; the analogue of the
    chain length gamma, independent of which branch got accepted) and ``accepted`` = tree tokens accepted
    (the token drawn after leaving the tree is not counted). ``stats.extra`` holds per-iteration lists
    ``tree_size`` (drafted nodes, root excluded), ``tree_depth``, ``draft_forwards``, ``accepted_length``
    (= accepted), ``leaves`` (active branches), ``candidates_generated`` (children proposed with q > 0) and
    ``candidates_kept`` (of those, the ones in the final tree), and per generation ``max_active_branches``,
    ``branch_prune_rate`` (candidates dropped / generated), ``effective_parallelism`` (tree tokens, root
    included, per verification forward), ``tree_size_mean`` and ``tree_depth_mean``.
    """

    verifies_trees = True  # its forwards carry 4D tree masks

    name = "specexec"

    def __init__(
        self,
        budget: int | Literal["auto"] = 32,
        max_depth: int | Literal["auto"] = 8,
        max_beams: int = 8,
        max_branch_width: int = 8,
        prune_threshold: float = 0.0,
        scoring_temperature: float | None = None,
        drafter: Drafter | None = None,
    ) -> None:
        if (budget == AUTO) != (max_depth == AUTO):
            raise InvalidParameterError(f"budget={budget!r}, max_depth={max_depth!r}: a tree shape is chosen as a "
                                        "whole: set both to 'auto' or give both")
        for label, value in (
            ("budget", budget),
            ("max_depth", max_depth),
            ("max_beams", max_beams),
            ("max_branch_width", max_branch_width),
        ):
            if value != AUTO:
                check_positive_int(label, value)
        if not 0.0 <= prune_threshold < 1.0:
            raise InvalidParameterError(
                f"prune_threshold={prune_threshold!r} is outside [0, 1): use 0.0 to disable pruning or e.g. 1e-4"
            )
        self.budget = budget
        self.max_depth = max_depth
        self.max_beams = max_beams
        self.max_branch_width = max_branch_width
        self.prune_threshold = float(prune_threshold)
        if scoring_temperature is not None and not scoring_temperature > 0:
            raise InvalidParameterError(
                f"scoring_temperature={scoring_temperature!r} is invalid: use a value > 0 (e.g. 0.3), or null"
            )
        self.scoring_temperature = scoring_temperature
        self.drafter = drafter if drafter is not None else ModelDrafter()
        refusal = self.drafter.tree_refusal()  # neither grows trees nor offers continuations (as configured)
        if refusal is not None:
            raise InvalidParameterError(refusal)
        growth = {"max_beams": (max_beams, 8), "max_branch_width": (max_branch_width, 8),
                  "prune_threshold": (prune_threshold, 0.0), "scoring_temperature": (scoring_temperature, None)}
        changed = [f"{name}={value!r}" for name, (value, default) in growth.items() if value != default]
        if not self.drafter.grows_trees and changed:
            raise InvalidParameterError(
                f"{', '.join(changed)} shape a draft model's best-first growth, but the drafter is "
                f"{self.drafter.name!r}: drop them (its tree is set by budget, max_depth and the drafter's own options)"
            )

    @property
    def drafter_name(self) -> str:
        return self.drafter.name

    @property
    def needs_draft(self) -> bool:
        return self.drafter.needs_draft_model

    def verify_width(self) -> int:
        budget = max(b for b, _ in AUTO_SHAPES) if self.budget == AUTO else self.budget
        return budget + 1  # the tree + its root

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "budget": self.budget,
            "max_depth": self.max_depth,
            "max_beams": self.max_beams,
            "max_branch_width": self.max_branch_width,
            "prune_threshold": self.prune_threshold,
            "scoring_temperature": self.scoring_temperature,
        }
        if self.drafter.grows_trees:  # the draft model, or a trained head: best-first growth
            return {**params, "drafter": self.drafter.name, **self.drafter.params()}
        # the tree comes from the drafter's continuations: only these shape it
        return {"budget": self.budget, "max_depth": self.max_depth, "drafter": self.drafter.name,
                **self.drafter.params()}

    def input_files(self) -> list[str]:
        """A trained head's files: hashed into the run fingerprint."""
        return self.drafter.input_files()

    def prepare(self, target_info: dict[str, Any], draft_info: dict[str, Any] | None) -> None:
        """A trained head checks that it was trained for this target."""
        self.drafter.prepare(target_info)

    def scoring(self, sampling: SamplingConfig) -> SamplingConfig:
        """The distribution that ranks tree nodes. Under sampling, the same warped q as everywhere; under greedy,
        q would be one-hot and the tree a single chain (every other child scores log 0), so a tempered draft
        softmax ranks the alternatives instead. Exactness never depends on it, only the acceptance length does."""
        if self.scoring_temperature is not None:
            return SamplingConfig(temperature=self.scoring_temperature)
        return SamplingConfig(temperature=GREEDY_SCORING_TEMPERATURE) if sampling.greedy else sampling

    def tree_capacity(self, vocab: int) -> int:
        """Initial node capacity of the tree: the root, ``budget`` kept nodes and one round of candidates
        (it grows if displaced nodes push the count higher)."""
        return 1 + self.budget + self.max_beams * min(self.max_branch_width, vocab)

    @torch.inference_mode()
    def generate(self, target, draft, input_ids: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig,
                 eos_token_ids: set[int], generator: torch.Generator | None = None) -> Generation:
        state = GenerationState(input_ids, max_new_tokens, eos_token_ids)
        if draft is None and self.needs_draft:
            raise InvalidParameterError(
                "specexec needs a draft model: configure one, or use the baseline method"
            )
        vocab = shared_vocab(target, draft)
        scoring = self.scoring(sampling)
        tree = DraftTree(self.tree_capacity(vocab))
        growth = None  # a drafter with continuations builds its trees without one
        if self.drafter.grows_trees:  # the draft model runs on its own device, a head on the target's
            device = input_device(draft) if self.drafter.needs_draft_model else state.device
            growth = self.drafter.tree_growth(draft, vocab, device, target=target)
        state.stats.extra.update({key: [] for key in _PER_ITERATION})  # one entry per iteration

        # Prefill: the first iteration; the draft reads the prompt as it grows the first tree, the target as it
        # verifies it (no separate prefill forward).
        with state.prefill():
            self.iteration(state, target, tree, growth, vocab, scoring, sampling, generator)

        # Decode: grow, verify, walk, compact until EOS or max_new_tokens.
        with state.decode():
            while not state.done:
                self.iteration(state, target, tree, growth, vocab, scoring, sampling, generator)
        state.stats.extra.update(_summarize(state.stats.extra))
        return state.result()

    def iteration(
        self,
        state: GenerationState,
        target,
        tree: DraftTree,
        growth: TreeGrowth | None,
        vocab: int,
        scoring: SamplingConfig,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> list[int]:
        """Steps a-d once; returns the accepted tree nodes (the token drawn after leaving the tree is emitted too)."""
        committed = state.sequence  # prompt + emitted tokens; the last one (the root) is in no cache
        # A tree path of depth d yields at most d + 1 tokens: cap d by what may still be emitted.
        depth_cap = min(self.max_depth, state.room - 1)
        tree.reset(committed[-1], depth_cap, frozenset(state.eos_token_ids))

        # Step a: grow the tree (best-first on the grower's q, or the drafter's continuations as a trie).
        with drafting():
            if growth is not None:
                slots, draft_forwards, generated = self._grow_tree(growth, tree, committed, scoring)
            else:
                slots, draft_forwards, generated = [], 0, self._branch_tree(tree, committed, depth_cap, vocab)
        nodes = tree.node_ids()  # n drafted nodes, in creation order

        # Step b: one target forward verifies the whole tree: p at the root and at every node.
        cached = cache_length(state.target_cache)
        with_features = self.drafter.needs_target_features  # a head reads the target's features of the path
        logits, features = self._verify_tree(target, state.target_cache, tree, nodes, committed, vocab,
                                             state.device, with_features)  # (1 + n, V), (m + n, H) | None

        # Step c: sample exactly from p along the tree; step d: keep prefix + accepted path in the caches.
        emitted, accepted = self._walk_tree(tree, nodes, logits, sampling, generator, state.eos_token_ids)
        prefix_len = len(committed)
        self._compact_caches(state.target_cache, growth, nodes, slots, accepted, prefix_len)
        if with_features:  # the target's features of the chain and the accepted path, in position order
            m, row_of = prefix_len - cached, {node: i for i, node in enumerate(nodes)}
            rows = list(range(m)) + [m + row_of[node] for node in accepted]
            with drafting():
                self.drafter.commit(prefix_len + len(accepted), features[rows])
        state.emit(emitted)

        tree_depth = tree.depth(nodes)
        state.record_cycle(draft_forwards, drafted=tree_depth, accepted=len(accepted))
        for key, value in (
            ("tree_size", len(nodes)),
            ("tree_depth", tree_depth),
            ("draft_forwards", draft_forwards),
            ("accepted_length", len(accepted)),
            ("leaves", tree.leaves(nodes)),
            ("candidates_generated", generated),
            ("candidates_kept", len(nodes)),
        ):
            state.stats.extra[key].append(value)
        return accepted

    # ----------------------------------------------------------------------------------- stage a: grow
    def _grow_tree(
        self, grower: TreeGrowth, tree: DraftTree, committed: list[int], scoring: SamplingConfig
    ) -> tuple[list[int], int, int]:
        """Best-first growth. ``grower`` scores children: the draft model's (``ModelGrowth``) or a trained head's
        (``EagleDrafter``). Returns (slots, draft forwards, candidates generated), where ``slots`` lists the
        expanded non-root nodes in the order their KV entries follow the prefix in the grower's cache."""
        slots: list[int] = []
        if not tree.pop_frontier(1):
            return slots, 0, 0  # depth cap 0: the root alone is verified
        root_position = len(committed) - 1

        # Step 1: expand the root: q(. | committed) from one forward over what the grower has not read yet.
        logits = grower.root_logits(committed)  # (1, V), or None: nothing to draft from yet (a head's prefill)
        if logits is None:
            return slots, 0, 0
        generated, _ = self._expand(tree, [0], logits, scoring)
        forwards = 1

        # Step 2: each further round expands the max_beams best open nodes in one batched forward; a node sees
        # the prefix, its expanded ancestors and itself.
        for _ in range(self.max_depth - 1):
            if not tree.can_improve(self.budget):
                break  # the tree is full and no open node's children could outrank its worst node
            batch = tree.pop_frontier(self.max_beams)  # b node ids, best first
            if not batch:
                break
            logits = grower.expand_logits(tree, batch, slots, root_position)  # (b, V)
            slots.extend(batch)
            forwards += 1
            proposed, entered = self._expand(tree, batch, logits, scoring)
            generated += proposed
            if not entered:
                break  # every child of this round fell outside the best `budget`
        return slots, forwards, generated

    def _branch_tree(self, tree: DraftTree, committed: list[int], depth_cap: int, vocab: int) -> int:
        """The tree form of a deterministic drafter: its continuations of ``committed`` (best first) merged into a
        trie under the root, at most ``budget`` nodes, cut after a stop token. Returns the nodes proposed.

        Scores only order the branches (the k-th branch's first node scores log 1/k, deeper nodes follow it): a
        later branch never displaces an earlier one's nodes, and exactness never depends on them.
        """
        children: dict[tuple[int, int], int] = {}
        proposed = 0
        for rank, branch in enumerate(self.drafter.continuations(committed, depth_cap)):
            node = 0
            for depth, token in enumerate(branch):
                if token >= vocab or (node and tree.tokens[node] in tree.stop_tokens):
                    break  # a token the target cannot score, or a path past an EOS
                child = children.get((node, token))
                if child is None:
                    if proposed >= self.budget:  # nothing is pruned here: every proposed node is in the tree
                        return proposed
                    logq = -math.log(rank + 1) if depth == 0 else 0.0
                    (child,), _ = tree.add_children([node], [[token]], [[logq]])
                    children[(node, token)] = child
                    proposed += 1
                node = child
        return proposed

    def _expand(
        self, tree: DraftTree, batch: list[int], logits: torch.Tensor, scoring: SamplingConfig
    ) -> tuple[int, bool]:
        """Add the top-``max_branch_width`` children of ``batch`` (b nodes) from draft logits (b, V), then keep
        the best ``budget`` nodes. Returns (children proposed with q > 0, whether any new child was kept)."""
        # Step 1: q(. | path to node) and each node's most likely children; log q = -inf where q = 0.
        q = logits_to_probs(logits, scoring)  # (b, V)
        top = torch.topk(q, min(self.max_branch_width, q.shape[-1]), dim=-1)  # (b, k) values, indices
        child_logq = top.values.to(torch.float64).log().tolist()
        # Step 2: score(child) = score(node) + log q(child); insert, then keep the best `budget` nodes.
        kept, proposed = tree.add_children(
            batch, top.indices.tolist(), child_logq, self.budget, self.prune_threshold
        )
        return proposed, bool(kept)

    # ----------------------------------------------------------------------------------- stage b: verify
    def _verify_tree(
        self,
        target,
        cache,
        tree: DraftTree,
        nodes: list[int],
        committed: list[int],
        vocab: int,
        device: torch.device,
        with_hidden: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One target forward over (uncached committed chain ending at the root) + tree nodes.
        Returns logits (1 + n, V): row 0 = p(. | root), row 1 + i = p(. | path to nodes[i]); and, when asked,
        the final-norm hidden states (m + n, H) of every input (the m chain tokens, then the nodes)."""
        cached = cache_length(cache)
        chain = committed[cached:]  # m tokens, normally just the root
        root_position = len(committed) - 1
        input_ids = torch.tensor([chain + [tree.tokens[node] for node in nodes]], device=device)  # (1, m + n)
        keep = len(nodes) + 1  # the rows of the root and the nodes (the chain's earlier rows are not needed)
        positions_t = mask = None
        if nodes:
            positions = list(range(cached, root_position + 1)) + tree_position_ids(tree, nodes, root_position)
            mask = verify_mask(tree, nodes, len(chain), cached).to(device)  # (1, 1, m + n, cached + m + n)
            positions_t = torch.tensor([positions], device=device)
        if with_hidden:
            layers = self.drafter.feature_layers  # EAGLE-3: its aux layers' states, from the same forward
            out = model_logits_and_hidden(target, input_ids, cache, positions_t, mask, logits_to_keep=keep,
                                          feature_layers=layers)
            return out[0][0, -keep:, :vocab], out[-1][0]
        logits = model_logits(target, input_ids, cache, positions_t, mask, logits_to_keep=keep)
        return logits[0, -keep:, :vocab], None

    # ----------------------------------------------------------------------------------- stage c: walk
    @staticmethod
    def _walk_tree(
        tree: DraftTree,
        nodes: list[int],
        logits: torch.Tensor,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        eos_token_ids: set[int],
    ) -> tuple[list[int], list[int]]:
        """Draw t ~ p(. | node) from the root down while t is a child of the node in the tree.
        Returns (emitted tokens, accepted node ids); emitted = accepted tokens + the draw that left the tree
        (absent when an accepted token is EOS)."""
        row_of = {node: row for row, node in enumerate(nodes, start=1)}
        child_of = tree.child_index(nodes)
        emitted: list[int] = []
        accepted: list[int] = []
        node, row = 0, 0
        while True:
            # Step 1: t ~ p(. | path to node), the exact target conditional (its argmax when greedy: p is
            # one-hot). Rows are warped one at a time: a big tree times a big vocabulary would not fit at once.
            token = next_token(logits[row], sampling, generator)
            emitted.append(token)
            # Step 2: descend when t was drafted under this node; otherwise t ends the iteration.
            child = child_of.get((node, token))
            if child is None:
                break
            accepted.append(child)
            if token in eos_token_ids:
                break
            node, row = child, row_of[child]
        return emitted, accepted

    # ----------------------------------------------------------------------------------- stage d: compact
    @staticmethod
    def _compact_caches(
        target_cache, growth: TreeGrowth | None, nodes: list[int], slots: list[int], accepted: list[int],
        prefix_len: int,
    ) -> None:
        """Keep prefix + accepted path in both caches (the last emitted token stays uncached: the next root).

        Target: it holds ``prefix_len`` committed entries (root included) then one entry per node of ``nodes``
        in creation order, so ``nodes[i]`` sits at prefix_len + i. :func:`keep_cache_positions` gathers the
        accepted nodes' entries in root-to-leaf order with ``index_select`` and writes them right after the
        prefix, where a sequential decode would have put them: the d-th accepted node (depth d) was computed at
        position root_position + d = prefix_len - 1 + d and lands at index prefix_len + d - 1, so the cache is
        contiguous again and its rotary encodings stay valid.
        Grower: its cache holds the prefix then ``slots`` (expanded nodes, in expansion order). Only expanded
        nodes have entries, and on an accepted path they form a prefix of it (a node exists only once its parent
        was expanded): the grower keeps that prefix (:meth:`TreeGrowth.keep_path`) and is fed the remaining
        committed tokens at the next root.
        """
        if nodes:
            index_of = {node: i for i, node in enumerate(nodes)}
            keep_after_prefix(target_cache, prefix_len, [index_of[node] for node in accepted])
        if slots:
            slot_of = {node: i for i, node in enumerate(slots)}
            kept: list[int] = []
            for node in accepted:
                if node not in slot_of:
                    break
                kept.append(slot_of[node])
            growth.keep_path(prefix_len, kept)


_PER_ITERATION = (
    "tree_size",
    "tree_depth",
    "draft_forwards",
    "accepted_length",
    "leaves",
    "candidates_generated",
    "candidates_kept",
)


def _summarize(log: dict[str, list[int]]) -> dict[str, float | int | None]:
    """Per-generation tree statistics from the per-iteration lists (``stats.extra``, keys ``_PER_ITERATION``)."""
    iterations = len(log["tree_size"])
    generated = sum(log["candidates_generated"])
    kept = sum(log["candidates_kept"])
    return {
        "max_active_branches": max(log["leaves"], default=0),
        "branch_prune_rate": (generated - kept) / generated if generated else 0.0,
        "effective_parallelism": (sum(log["tree_size"]) + iterations) / iterations if iterations else None,
        "tree_size_mean": sum(log["tree_size"]) / iterations if iterations else None,
        "tree_depth_mean": sum(log["tree_depth"]) / iterations if iterations else None,
    }
