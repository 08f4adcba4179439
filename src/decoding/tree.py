"""Token trees for tree-based speculative decoding: best-first bookkeeping, tree attention masks, and the
protocol of what grows a tree (:class:`TreeGrowth`).

A :class:`DraftTree` numbers its nodes in creation order. Node 0 is the root: the last committed token, not
yet in any KV cache. Every other node is a drafted token created after its parent, so creation order is a
topological order (parents before children).

Tree attention: a node attends to the committed prefix, to its ancestors and to itself. With the prefix in a
KV cache of length ``cached_len``, the 4D mask of a forward over ``n`` new tokens has shape
``(1, 1, n, cached_len + n)`` (True = attend) and a node's position id is ``root_position + depth``, so its
logits equal those of a sequential forward over its root-to-node path.

Cost model: a growth round touches at most ``max_beams * max_branch_width`` candidates, so the scalar node
attributes live in Python lists and heaps (well under a microsecond per candidate, where a CPU torch op on a
tiny tensor costs ~5-10 us). The one per-node structure a forward needs, the ancestor matrix, is a torch
tensor updated with one gather per round, and every mask is sliced out of it with tensor ops.

Growth: SpecExec grows a tree best-first from the q of a :class:`TreeGrowth`: the draft model's
(:class:`src.decoding.drafters.ModelGrowth`) or a trained EAGLE head's (:class:`src.decoding.eagle.EagleDrafter`).
"""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod

import torch

from src.errors import InvalidParameterError


class DraftTree:
    """A token tree grown best-first by cumulative draft log-probability.

    ``capacity`` is the initial size of the ancestor matrix (it doubles when more nodes are created).

    Per node (lists indexed by node id): ``tokens``, ``parents`` (-1 for the root), ``depths`` (root 0),
    ``scores`` = log q(path from the root to the node) (Python floats, i.e. float64), ``alive`` (False once
    pruned; pruned ids are never reused within an iteration). ``ancestors`` (capacity, capacity) bool:
    ``ancestors[i, j]`` = node j is on the root-to-i path, i itself included.

    Two heaps: ``_kept`` holds the alive non-root nodes, worst first ((score, -id): among equal scores the
    newer node is worse), so pruning to a budget pops its top; ``_open`` holds nodes that may still be
    expanded, best first ((-score, id)); pruned nodes are skipped lazily when popped.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise InvalidParameterError(
                f"capacity={capacity} is invalid: a tree needs room for its root (>= 1)"
            )
        self.capacity = capacity
        self.ancestors = torch.zeros(capacity, capacity, dtype=torch.bool)
        # Row 0 (the root) never changes: only rows of node ids >= 1 are rewritten, in full, at creation.
        self.ancestors[0, 0] = True
        self.reset(0, depth_cap=0)

    def reset(
        self, root_token: int, depth_cap: int, stop_tokens: set[int] | frozenset[int] = frozenset()
    ) -> None:
        """Start a new tree holding only the root. Nodes deeper than ``depth_cap`` are never created and nodes
        whose token is in ``stop_tokens`` (EOS) are never expanded. The storage is reused: a node's ancestor
        row is written in full when it is created."""
        self.depth_cap = depth_cap
        self.stop_tokens = stop_tokens
        self.tokens: list[int] = [root_token]
        self.parents: list[int] = [-1]
        self.depths: list[int] = [0]
        self.scores: list[float] = [0.0]
        self.alive: list[bool] = [True]
        self._kept: list[tuple[float, int]] = []
        self._open: list[tuple[float, int]] = [(-0.0, 0)] if depth_cap > 0 else []

    @property
    def size(self) -> int:
        """Nodes created so far (root and pruned nodes included)."""
        return len(self.tokens)

    # ----------------------------------------------------------------------------------- growing
    def pop_frontier(self, max_beams: int) -> list[int]:
        """Remove and return the (at most) ``max_beams`` best alive open nodes, best first: the caller expands
        them. Open = alive, not yet expanded, below the depth cap and not a stop token."""
        batch: list[int] = []
        while self._open and len(batch) < max_beams:
            _, node = heapq.heappop(self._open)
            if self.alive[node]:
                batch.append(node)
        return batch

    def can_improve(self, budget: int) -> bool:
        """Whether expanding open nodes could still change the best ``budget`` nodes: False when the tree is
        full and the best open node scores no higher than the worst kept node (a child scores at most its
        parent and loses ties, being newer)."""
        while self._open and not self.alive[self._open[0][1]]:
            heapq.heappop(self._open)  # drop pruned nodes
        if not self._open:
            return False
        if len(self._kept) < budget:
            return True
        return -self._open[0][0] > self._kept[0][0]

    def add_children(
        self,
        parents: list[int],
        child_tokens: list[list[int]],
        child_logq: list[list[float]],
        budget: int | None = None,
        min_prob: float = 0.0,
    ) -> tuple[list[int], int]:
        """Add the proposed children of ``parents`` (b nodes): ``child_tokens[i]`` / ``child_logq[i]`` are node
        i's top draft tokens and their log q (distinct tokens), and keep the best ``budget`` non-root nodes
        (None: no limit). Children with q = 0, whose cumulative probability exp(score) is below ``min_prob``,
        or that would rank last in a full tree are never created. Returns (ids of the new children still in
        the tree, number of proposals with q > 0)."""
        log_min = math.log(min_prob) if min_prob > 0 else -math.inf
        limit = budget if budget is not None else math.inf
        start = self.size
        proposed = 0
        for parent, tokens, logqs in zip(parents, child_tokens, child_logq):
            # Step 1: score(child) = score(parent) + log q(child | path) <= score(parent), since log q <= 0.
            base, depth = self.scores[parent], self.depths[parent] + 1
            for token, logq in zip(tokens, logqs):
                if logq == -math.inf:
                    continue
                proposed += 1
                score = base + logq
                node = self.size
                if score < log_min or (len(self._kept) >= limit and (score, -node) < self._kept[0]):
                    continue
                # Step 2: create the child, then drop the worst node if the tree is over budget.
                self.tokens.append(token)
                self.parents.append(parent)
                self.depths.append(depth)
                self.scores.append(score)
                self.alive.append(True)
                heapq.heappush(self._kept, (score, -node))
                if depth < self.depth_cap and token not in self.stop_tokens:
                    heapq.heappush(self._open, (-score, node))
                if len(self._kept) > limit:
                    self.alive[-heapq.heappop(self._kept)[1]] = False
        end = self.size
        if end > start:
            # Step 3: ancestors[child] = ancestors[parent] + itself (one gather for the whole round).
            self._reserve(end)
            self.ancestors[start:end] = self.ancestors[torch.tensor(self.parents[start:end])]
            self.ancestors[start:end, start:end].fill_diagonal_(True)
        return [node for node in range(start, end) if self.alive[node]], proposed

    def _reserve(self, size: int) -> None:
        """Grow the ancestor matrix (doubling) so that it holds ``size`` nodes."""
        if size <= self.capacity:
            return
        capacity = max(size, 2 * self.capacity)
        grown = torch.zeros(capacity, capacity, dtype=torch.bool)
        grown[: self.capacity, : self.capacity] = self.ancestors
        self.ancestors, self.capacity = grown, capacity

    def prune_to_budget(self, budget: int) -> None:
        """Keep the ``budget`` best non-root nodes by score (ties: the older node wins).

        The kept set stays closed under ancestors: a node's descendants score no higher and are newer, so
        they always rank below it and the worst node never has a kept descendant.
        """
        while len(self._kept) > budget:
            _, negative_id = heapq.heappop(self._kept)
            self.alive[-negative_id] = False

    # ----------------------------------------------------------------------------------- reading
    def node_ids(self) -> list[int]:
        """Alive non-root nodes in creation (= topological) order."""
        return sorted(-negative_id for _, negative_id in self._kept)

    def depth(self, nodes: list[int] | None = None) -> int:
        """Depth of the deepest alive node (0 for a bare root); ``nodes`` = :meth:`node_ids` if known."""
        nodes = self.node_ids() if nodes is None else nodes
        return max((self.depths[node] for node in nodes), default=0)

    def leaves(self, nodes: list[int] | None = None) -> int:
        """Number of alive non-root nodes without an alive child (the tree's active branches)."""
        nodes = self.node_ids() if nodes is None else nodes
        return len(nodes) - len({self.parents[node] for node in nodes} - {0})

    def child_index(self, nodes: list[int]) -> dict[tuple[int, int], int]:
        """{(parent id, token): child id} over ``nodes``; tokens are unique among siblings (top-k proposals)."""
        return {(self.parents[node], self.tokens[node]): node for node in nodes}

    def path(self, node: int) -> list[int]:
        """Tokens from the root to ``node``, both included."""
        tokens = []
        while node >= 0:
            tokens.append(self.tokens[node])
            node = self.parents[node]
        return tokens[::-1]


def growth_mask(tree: DraftTree, batch: list[int], slots: list[int], prefix_len: int) -> torch.Tensor:
    """4D mask (1, 1, b, prefix_len + s + b) of a growth round over the nodes ``batch`` (True = attend).

    The draft cache holds the committed prefix (root included) then the already expanded nodes ``slots`` (s)
    in expansion order. A batch node sees the whole prefix, the slots that are its ancestors, and itself:
    nodes of one batch are never related (a node is only created after its parent was expanded).
    """
    b, s = len(batch), len(slots)
    mask = torch.ones(1, 1, b, prefix_len + s + b, dtype=torch.bool)
    tree_part = mask[0, 0, :, prefix_len:]  # (b, s + b) view
    if s:
        rows, cols = torch.tensor(batch).unsqueeze(1), torch.tensor(slots)
        tree_part[:, :s] = tree.ancestors[rows, cols]  # (b, s): slot is an ancestor of the batch node
    tree_part[:, s:].fill_(False).fill_diagonal_(True)  # (b, b): itself only
    return mask


def verify_mask(tree: DraftTree, nodes: list[int], chain_len: int, cached_len: int) -> torch.Tensor:
    """4D mask (1, 1, m + n, cached_len + m + n) of a verification forward (True = attend).

    Inputs: a chain of m = ``chain_len`` committed tokens not yet in the cache (ending at the root), causal,
    blind to the tree; then the tree ``nodes`` (n) in creation order, each seeing the whole cache, the whole
    chain (root included) and its ancestors among the nodes.
    """
    m, n = chain_len, len(nodes)
    mask = torch.ones(1, 1, m + n, cached_len + m + n, dtype=torch.bool)
    new_part = mask[0, 0, :, cached_len:]  # (m + n, m + n) view
    if m > 1:
        new_part[:m, :m].tril_()
    new_part[:m, m:] = False
    if n:
        index = torch.tensor(nodes)
        new_part[m:, m:] = tree.ancestors[index.unsqueeze(1), index]  # (n, n): ancestor-or-self
    return mask


def tree_position_ids(tree: DraftTree, nodes: list[int], root_position: int) -> list[int]:
    """Position ids of tree nodes: root_position + depth (where a sequential decode would put them)."""
    return [root_position + tree.depths[node] for node in nodes]


class TreeGrowth(ABC):
    """What SpecExec's best-first growth asks of the model that drafts the tree (a drafter with ``grows_trees``
    hands one out: :meth:`src.decoding.drafters.Drafter.tree_growth`).

    Its cache holds the committed prefix (root included), then the expanded nodes (``slots``) in expansion order.
    """

    @abstractmethod
    def root_logits(self, committed: list[int]) -> torch.Tensor | None:
        """q(. | committed) (1, V) over the shared ids, from one forward over the committed tokens it has not read
        (the root, plus accepted tokens it never ran on); None when there is nothing to draft from yet (a head
        before the target's prefill): the root is then verified alone."""

    @abstractmethod
    def expand_logits(self, tree: DraftTree, batch: list[int], slots: list[int], root_position: int) -> torch.Tensor:
        """q(. | path to node) (b, V) for the b nodes of ``batch``, in one forward with a :func:`growth_mask`
        (each node sees the prefix, its expanded ancestors among ``slots`` and itself) at :func:`tree_position_ids`."""

    def keep_path(self, prefix_len: int, kept_slots: list[int]) -> None:
        """After the verification: keep the cached prefix (``prefix_len`` entries) and the entries of the accepted
        path's expanded nodes (``kept_slots``: their indices in ``slots``, root to leaf), in that order. Default:
        nothing (a grower that rolls its cache back when the drafter is committed, as the EAGLE head)."""
        return None
