"""The EAGLE drafter (Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty"): a
one-layer head trained on the target's own features proposes the chain, instead of a separate draft LM.

Convention: the *feature* f_j is the target's last hidden state at position j after its final norm (the lm_head
input); it predicts token x_{j+1}. The head reads the pair (f_j, embedding of x_{j+1}) at position j and
outputs f̂_{j+1}; the target's frozen lm_head on f̂_{j+1} gives q for x_{j+2} (over the head's vocabulary subset
when it has one: q is 0 elsewhere, and the verifier stays exact).

State of one generation, for a committed sequence x_0..x_{S-1}:

- ``features``: the target's exact features f_0..f_{F-1}, F = S - 1 after every cycle (the verifier hands them
  over in ``commit``; the newest token's feature comes with the next verification);
- the head's own KV cache over exact pairs j < ``exact_pairs``. A proposal first feeds the exact pairs
  ``exact_pairs``..S-2 in one head forward (its last output is f̂_{S-1}, hence the first draft token), then one
  forward per further draft token on (f̂, the draft token): EAGLE's chain. ``commit`` cuts the cache back to the
  exact pairs, so drafted pairs never outlive their cycle.

The first cycle proposes nothing: the target has not encoded the prompt yet, so its forward is a plain prefill
that returns the prompt's features (as in EAGLE).

The head's file formats (:mod:`src.models.eagle`, :mod:`src.models.eagle_formats`) are imported inside the methods
that read files: they load transformers' Llama modeling (seconds), which building the drafter from a config does
not need.
"""

from __future__ import annotations

from typing import Any

import torch

from src.decoding.drafters import Drafter, Proposal, greedy_token, widen
from src.decoding.kv import cache_length, new_cache, truncate_cache
from src.decoding.sampling import logits_to_probs, sample
from src.decoding.tree import DraftTree, TreeGrowth, growth_mask, tree_position_ids
from src.errors import InvalidParameterError, MissingInputError


class EagleDrafter(Drafter, TreeGrowth):
    """Propose a chain with a trained EAGLE head (``python -m src fit --config configs/eagle1.yaml`` trains one).

    Args:
        head_path: the exported head, ``<path>.safetensors`` + ``<path>.json`` (:mod:`src.models.eagle`); or a
            head folder in any published layout (:mod:`src.models.eagle_formats`: the EAGLE repository's EAGLE-1/2
            and EAGLE-3 releases, SpecForge exports, speculators folders); or ``hub:<owner>/<name>`` for such a
            folder on the Hugging Face hub (e.g. ``hub:yuhuili/EAGLE3-LLaMA3.1-Instruct-8B``). None: the
            ``head_path`` of the ``EagleModule`` that runs it (``configs/eagle1.yaml``).
    """

    name = "eagle"
    needs_draft_model = False
    needs_target_features = True
    grows_trees = True  # SpecExec grows its tree best-first with root_logits / expand_logits (EAGLE-2)

    def __init__(self, head_path: str | None = None) -> None:
        if head_path is not None and (not isinstance(head_path, str) or not head_path):
            raise InvalidParameterError(f"head_path={head_path!r} is invalid: give the trained head's path")
        self.head_path = head_path
        self.head = None  # a src.models.eagle.EagleHead, loaded at the first begin() (it needs the target)
        self.loaded_for = None  # the target the head was loaded for
        self.target_identity: dict[str, Any] | None = None

    def params(self) -> dict[str, Any]:
        return {"head_path": self.head_path}

    def input_files(self) -> list[str]:
        """The head's files (a run fingerprint hashes them); a head folder (any published layout) counts as its
        files; a ``hub:`` head is downloaded first (once, into the hub cache)."""
        from src.models.eagle import head_files  # heavy (see the module docstring)
        from src.models.eagle_formats import resolve_head_path

        if not self.head_path:
            return []
        path = resolve_head_path(self.head_path)
        if path.is_dir():
            return sorted(str(p) for p in path.iterdir() if p.is_file())
        return [str(file) for file in head_files(path)]

    def prepare(self, target_info: dict[str, Any] | None) -> None:
        """Before any prompt: the head must exist; the target's identity (name, dtype, revision) is kept so that
        a head trained for another target is refused when it loads."""
        from src.models.eagle import TRAIN_HINT, head_files  # heavy (see the module docstring)
        from src.models.eagle_formats import resolve_head_path

        self.target_identity = target_info
        if self.head_path is None:
            return  # refused at begin(), naming the fix
        path = resolve_head_path(self.head_path)
        missing = [str(p) for p in head_files(path) if not p.is_file()]
        if missing and not path.is_dir():
            raise MissingInputError(f"head file {missing[0]} does not exist: {TRAIN_HINT}")

    def load(self, target) -> None:
        from src.models.eagle_formats import load_head, resolve_head_path  # heavy (see the module docstring)

        if self.head_path is None:
            raise InvalidParameterError(
                "the eagle drafter has no head_path: set drafter.init_args.head_path, or run it from EagleModule "
                "(configs/eagle1.yaml), whose head_path it then uses"
            )
        self.head = load_head(resolve_head_path(self.head_path), target.config, self.target_identity).to(
            device=target.get_input_embeddings().weight.device, dtype=target.get_input_embeddings().weight.dtype
        ).eval()
        self.loaded_for = target
        self.feature_layers = self.head.aux_layers  # EAGLE-3: the verifiers hand over these layers' states

    def begin(self, draft_model, vocab: int, device: torch.device, target=None) -> None:
        if target is None:
            raise InvalidParameterError("the eagle drafter reads the target's features: its verifier must pass target")
        if self.head is None or self.loaded_for is not target:
            self.load(target)
        self.vocab, self.device = vocab, device
        self.embed = self.head.embedding(target)  # the target's, unless the head ships its own
        self.lm_head = target.get_output_embeddings()
        self.cache = new_cache()
        self.features: list[torch.Tensor] = []  # (m, H) blocks of exact target features, in position order
        self.known = 0  # F: positions with an exact feature
        self.exact_pairs = 0  # pairs in the head cache fed with exact features
        ids = self.head.top_token_ids  # None: the head scores every id; EAGLE-3: its draft ids mapped by d2t
        self.ids = ids.to(device) if ids is not None else None

    def propose(self, sequence, k, sampling, generator, stop_below=0.0) -> Proposal:
        length = len(sequence)
        if self.known == 0 or k < 1:  # the prompt is not encoded yet: this cycle is the target's prefill
            return Proposal(torch.empty(0, dtype=torch.long, device=self.device), q=None, forwards=0)
        if self.known != length - 1:
            raise RuntimeError(f"eagle drafter holds {self.known} features for a sequence of {length} tokens")
        # Step 1: exact pairs (f_j, x_{j+1}) for j = exact_pairs .. S-2, in one head forward; its last row is f̂_{S-1}.
        predicted = self._read_exact_pairs(sequence)  # (H,)
        drafts: list[torch.Tensor] = []
        q_rows: list[torch.Tensor] = []
        # Step 2: k draft tokens; each further one reads (f̂, the previous draft token).
        for i in range(k):
            logits = self._head_logits(predicted[None])[0]  # (V_target,), or (N,) over the subset ids
            if sampling.greedy:
                token = greedy_token(logits, self.vocab, self.ids)  # (1,)
            else:
                q_i = logits_to_probs(widen(logits, self.vocab, self.ids), sampling)  # (V,), zero outside the subset
                token = sample(q_i[None], generator)
                q_rows.append(q_i)
            drafts.append(token)
            if i + 1 < k:
                predicted = self._step(predicted[None], token, length - 1 + i)
        q = torch.stack(q_rows) if q_rows else None
        return Proposal(torch.cat(drafts), q, forwards=k)

    # ---------------------------------------------------------------- tree form (SpecExec, EAGLE-2)

    def tree_growth(self, draft_model, vocab: int, device: torch.device, target=None) -> EagleDrafter:
        """The head grows SpecExec's tree itself: a generation starts as for a chain (it reads no draft model)."""
        self.begin(None, vocab, device, target=target)
        return self

    def root_logits(self, sequence: list[int]) -> torch.Tensor | None:
        """q(. | committed) over the shared ids (1, V), from the exact pairs' forward; None in the first
        iteration (the target's prefill). Keeps f̂ of the root for its children."""
        if self.known == 0:
            return None
        self.node_features = {0: self._read_exact_pairs(sequence)}  # node id -> its f̂ (H,)
        return self._widened_logits(self.node_features[0][None])

    def expand_logits(self, tree: DraftTree, batch: list[int], slots: list[int], root_position: int) -> torch.Tensor:
        """q(. | path to node) (b, V) for the b nodes of ``batch`` in one head forward: node n at depth d reads
        (f̂ of its parent, its token) at pair index root_position + d - 1, and sees the exact pairs, its expanded
        ancestors and itself."""
        parents = [self.node_features[int(tree.parents[node])] for node in batch]
        features = torch.stack(parents)[None]  # (1, b, H)
        tokens = torch.tensor([[tree.tokens[node] for node in batch]], device=self.device)  # (1, b)
        mask = growth_mask(tree, batch, slots, self.exact_pairs).to(self.device)  # (1, 1, b, pairs + s + b)
        positions = torch.tensor([tree_position_ids(tree, batch, root_position - 1)], device=self.device)
        out = self.head(features.to(self.embed.weight.dtype), self.embed(tokens), position_ids=positions,
                        cache=self.cache, attention_mask=mask)[0]  # (b, H)
        self.node_features.update(zip(batch, out))
        return self._widened_logits(out)

    def _read_exact_pairs(self, sequence: list[int]) -> torch.Tensor:
        """One head forward over the exact pairs (f_j, x_{j+1}) it has not read, j = exact_pairs .. S-2 (S =
        len(sequence)); returns its last output f̂_{S-1} (H,), which predicts the token after the sequence."""
        start = cache_length(self.cache)
        features = self._unfed_features()  # (m, H): positions start .. S-2
        tokens = torch.tensor(sequence[start + 1 :], device=self.device)  # (m,)
        predicted = self._step(features, tokens, start)  # (H,)
        self.exact_pairs = len(sequence) - 1
        return predicted

    def _unfed_features(self) -> torch.Tensor:
        """The exact features of positions cache_length .. known - 1, (m, H), cut from the newest blocks only (the
        head cache keeps exact pairs, so normally just the blocks committed since the last proposal): no copy of
        the whole history per cycle."""
        needed, blocks = self.known - cache_length(self.cache), []
        for block in reversed(self.features):
            if needed <= 0:
                break
            blocks.append(block[-needed:])
            needed -= block.shape[0]
        blocks.reverse()
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def _head_logits(self, predicted: torch.Tensor) -> torch.Tensor:
        """(b, H) -> (b, V_target), or (b, N) over the head's vocabulary subset: the target's lm_head on f̂."""
        return self.head.logits(predicted, self.lm_head.weight, getattr(self.lm_head, "bias", None))

    def _widened_logits(self, predicted: torch.Tensor) -> torch.Tensor:
        """(b, H) -> (b, V): the head's logits, -inf outside its vocabulary subset."""
        return widen(self._head_logits(predicted), self.vocab, self.ids)

    def _step(self, features: torch.Tensor, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Head forward over pairs at positions ``position``..: features (m, H), tokens (m,) -> f̂ of the last (H,)."""
        m = tokens.numel()
        positions = torch.arange(position, position + m, device=self.device)[None]  # (1, m)
        embeddings = self.embed(tokens[None])  # (1, m, H)
        out = self.head(features[None].to(embeddings.dtype), embeddings, position_ids=positions, cache=self.cache)
        return out[0, -1]

    def commit(self, length: int, features: torch.Tensor | None = None) -> None:
        """Keep exact pairs only, and take the target's features of the newly committed positions."""
        truncate_cache(self.cache, min(self.exact_pairs, length - 1))
        self.exact_pairs = cache_length(self.cache)
        if features is None:
            raise RuntimeError("the eagle drafter needs the target's features at every commit")
        self.features.append(features)
        self.known += features.shape[0]
        if self.known > length:
            raise RuntimeError(f"eagle drafter got features for {self.known} positions of a {length}-token sequence")
