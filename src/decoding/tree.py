"""Token trees for tree-based speculative decoding: storage, best-first bookkeeping and tree attention masks.

A :class:`DraftTree` stores its nodes in flat tensors indexed by creation order. Node 0 is the root: the last
committed token, which is not yet in any KV cache. Every other node is a drafted token whose parent was
created before it, so creation order is a topological order (parents before children).

Tree attention: a node attends to the committed prefix, to its ancestors and to itself. With the prefix in
a KV cache of length ``cached_len``, the 4D mask of a forward over ``n`` new tokens has shape
``(1, 1, n, cached_len + n)`` (True = attend) and each node's position id is ``root_position + depth``, so
its logits equal those of a sequential forward over its root-to-node path.
"""

from __future__ import annotations

import math

import torch

from src.errors import InvalidParameterError


class DraftTree:
    """A token tree grown best-first by cumulative draft log-probability.

    Arrays (capacity ``C``, CPU):
        tokens, parents, depths (C,) long; scores (C,) float64 = log q(path from root to node);
        alive (C,) bool: node is in the tree (pruned nodes stay stored, dead);
        expanded (C,) bool: the draft has run on the node (its children were proposed, its KV is cached);
        expandable (C,) bool: the node may get children (not a stop token, below the depth cap);
        ancestors (C, C) bool: ancestors[i, j] = node j is on the root-to-i path (i itself included).

    Rows are written in full when a node is created, so one tree is reused across iterations via :meth:`reset`.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise InvalidParameterError(f"capacity={capacity} is invalid: a tree needs room for its root (>= 1)")
        self.capacity = capacity
        self.tokens = torch.zeros(capacity, dtype=torch.long)
        self.parents = torch.full((capacity,), -1, dtype=torch.long)
        self.depths = torch.zeros(capacity, dtype=torch.long)
        self.scores = torch.zeros(capacity, dtype=torch.float64)
        self.alive = torch.zeros(capacity, dtype=torch.bool)
        self.expanded = torch.zeros(capacity, dtype=torch.bool)
        self.expandable = torch.zeros(capacity, dtype=torch.bool)
        self.ancestors = torch.zeros(capacity, capacity, dtype=torch.bool)
        self.size = 0
        self.depth_cap = 0
        self.stop_tokens = torch.zeros(0, dtype=torch.long)

    def reset(self, root_token: int, depth_cap: int, stop_tokens: torch.Tensor | None = None) -> None:
        """Start a new tree holding only the root; nodes deeper than ``depth_cap`` are never created and
        nodes whose token is in ``stop_tokens`` (EOS) never get children."""
        self.size = 1
        self.depth_cap = depth_cap
        self.stop_tokens = stop_tokens if stop_tokens is not None else torch.zeros(0, dtype=torch.long)
        self.tokens[0] = root_token
        self.parents[0] = -1
        self.depths[0] = 0
        self.scores[0] = 0.0
        self.alive[0] = True
        self.expanded[0] = False
        self.expandable[0] = depth_cap > 0
        self.ancestors[0] = False
        self.ancestors[0, 0] = True

    # ----------------------------------------------------------------------------------- growing
    def add_children(
        self, parent_ids: torch.Tensor, child_tokens: torch.Tensor, child_logq: torch.Tensor, min_prob: float = 0.0
    ) -> tuple[torch.Tensor, int]:
        """Add the proposed children of ``parent_ids`` (b,): ``child_tokens`` / ``child_logq`` (b, k) hold each
        parent's top-k draft tokens and their log q. Children with q = 0, or whose cumulative probability
        exp(score) is below ``min_prob``, are not added. Returns (new node ids, number of candidates with q > 0).
        """
        # Step 1: score(child) = score(parent) + log q(child | path), flattened parent-major (b * k,).
        # float64, and log q <= 0 rounds to score(child) <= score(parent) (pruning relies on it).
        k = child_logq.shape[1]
        scores = (self.scores[parent_ids].unsqueeze(1) + child_logq.to(torch.float64)).view(-1)
        keep = scores > -math.inf  # q > 0
        proposed = int(keep.sum())
        if min_prob > 0:
            keep &= scores >= math.log(min_prob)
        kept = keep.nonzero().squeeze(1)  # flat indices of the added children
        start, end = self.size, self.size + kept.numel()
        if end > self.capacity:
            raise RuntimeError(f"tree capacity {self.capacity} exceeded by {end} nodes (a sizing bug)")
        # Step 2: write rows start..end; ancestors[child] = ancestors[parent] + itself.
        parents = parent_ids[kept // k]
        tokens = child_tokens.reshape(-1)[kept]
        depths = self.depths[parents] + 1
        expandable = depths < self.depth_cap
        if self.stop_tokens.numel():
            expandable &= ~torch.isin(tokens, self.stop_tokens)
        self.tokens[start:end] = tokens
        self.parents[start:end] = parents
        self.depths[start:end] = depths
        self.scores[start:end] = scores[kept]
        self.alive[start:end] = True
        self.expanded[start:end] = False
        self.expandable[start:end] = expandable
        self.ancestors[start:end] = self.ancestors[parents]
        self.ancestors[start:end, start:end].fill_diagonal_(True)
        self.size = end
        return torch.arange(start, end), proposed

    def prune_to_budget(self, budget: int) -> None:
        """Keep the ``budget`` best non-root nodes by score (ties: the older node wins).

        The kept set is closed under ancestors: a child never scores higher than its parent and is newer,
        so it always ranks after it.
        """
        candidates = self.node_ids()
        if candidates.numel() <= budget:
            return
        # Step 1: rank by score descending; the stable sort keeps creation order among equal scores.
        order = torch.sort(self.scores[candidates], descending=True, stable=True).indices
        self.alive[candidates[order[budget:]]] = False

    def frontier(self, max_beams: int) -> torch.Tensor:
        """The (at most) ``max_beams`` best alive, expandable, not yet expanded nodes (ids, best first)."""
        open_nodes = (self.alive[: self.size] & self.expandable[: self.size] & ~self.expanded[: self.size]).nonzero()
        open_nodes = open_nodes.squeeze(1)
        order = torch.sort(self.scores[open_nodes], descending=True, stable=True).indices[:max_beams]
        return open_nodes[order]

    # ----------------------------------------------------------------------------------- reading
    def node_ids(self) -> torch.Tensor:
        """Alive non-root nodes in creation (= topological) order, (n,) long."""
        return self.alive[1 : self.size].nonzero().squeeze(1) + 1

    def depth(self, nodes: torch.Tensor | None = None) -> int:
        """Depth of the deepest alive node (0 for a bare root); ``nodes`` = :meth:`node_ids` if known."""
        nodes = self.node_ids() if nodes is None else nodes
        return int(self.depths[nodes].max()) if nodes.numel() else 0

    def leaves(self, nodes: torch.Tensor | None = None) -> int:
        """Number of alive non-root nodes without an alive child (the tree's active branches)."""
        nodes = self.node_ids() if nodes is None else nodes
        if nodes.numel() == 0:
            return 0
        has_child = torch.zeros(self.size, dtype=torch.bool)
        has_child[self.parents[nodes]] = True
        return int((~has_child[nodes]).sum())

    def child_index(self, nodes: torch.Tensor) -> dict[tuple[int, int], int]:
        """{(parent id, token): child id} over ``nodes``; tokens are unique among siblings (top-k proposals)."""
        return dict(zip(zip(self.parents[nodes].tolist(), self.tokens[nodes].tolist()), nodes.tolist()))


def attention_mask(cached_len: int, visible: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """4D mask (1, 1, n, cached_len + m) for n new tokens: every cached position is visible, then ``visible``
    (n, m) says which of the m new-or-tree positions each row sees (True = attend)."""
    n = visible.shape[0]
    cached = torch.ones(n, cached_len, dtype=torch.bool, device=device)
    return torch.cat([cached, visible.to(device)], dim=1)[None, None]


def draft_round_visibility(tree: DraftTree, batch: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """What a batch of nodes sees besides the prefix during tree growth, (b, s + b) bool.

    The draft cache holds the prefix then the already expanded nodes ``slots`` (s,) in expansion order; the
    batch rows see those that are their ancestors, then themselves (nodes of one batch are never related:
    a node is only created after its parent was expanded).
    """
    b = batch.numel()
    return torch.cat([tree.ancestors[batch][:, slots], torch.eye(b, dtype=torch.bool)], dim=1)


def verify_visibility(tree: DraftTree, nodes: torch.Tensor, chain_len: int) -> torch.Tensor:
    """Visibility (chain_len + n, chain_len + n) of a verification forward over a chain then tree nodes.

    The chain is the committed tokens not yet in the cache, ending at the root; it is causal. The tree
    nodes (n,) follow in creation order: each sees the whole chain (root included) and its ancestors.
    """
    n = nodes.numel()
    chain = torch.cat([torch.ones(chain_len, chain_len, dtype=torch.bool).tril(), torch.zeros(chain_len, n, dtype=torch.bool)], 1)
    tree_rows = torch.cat([torch.ones(n, chain_len, dtype=torch.bool), tree.ancestors[nodes][:, nodes]], 1)
    return torch.cat([chain, tree_rows], 0)


def tree_position_ids(tree: DraftTree, nodes: torch.Tensor, root_position: int) -> torch.Tensor:
    """Position ids (n,) of tree nodes: root_position + depth (where a sequential decode would put them)."""
    return tree.depths[nodes] + root_position
