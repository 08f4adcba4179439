"""Speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling").

Each cycle the draft proposes a chain of up to ``k`` tokens x_1..x_k ~ q, the target scores all k + 1
positions in one forward, and the chain is accepted left to right:

    accept x_i with probability min(1, p_i(x_i) / q_i(x_i))
    at the first rejection i:  emit x ~ normalize(max(0, p_i - q_i))   (the residual distribution)
    if all k are accepted:     emit a bonus x ~ p_{k+1}

which makes every emitted token distributed exactly as under plain sampling from p (lossless). In greedy mode
(temperature 0) p and q are one-hot, so this is "accept while draft token == target argmax, then emit the
target argmax", done without random draws.

How many tokens a cycle drafts may depend on anything the draft computed, never on p, and the rule above stays
exact. Two such rules, as in HF assisted generation:

- ``schedule="heuristic"``: k grows by 2 after a cycle that accepted every draft and shrinks by 1 otherwise
  (between 1 and ``max_k``), following the measured acceptance;
- ``confidence_threshold``: drafting stops early once the draft's probability of its own token falls below it
  (the token is still proposed). Under greedy decoding q is one-hot, so the confidence is read from the raw
  draft softmax (temperature 1).

The prompt is not prefilled on its own: the first cycle feeds it to both models, the draft proposes the first
chain right after it and the target's first forward both encodes the prompt and verifies that chain (as HF
assisted generation does), which saves one target forward per generation.

:meth:`SpeculativeSampling.cycle` is one cycle (propose, verify, decide, commit); its stages other than the
acceptance rule are :mod:`src.decoding.chain`'s, shared with AutoJudge. What proposes the chain is a drafter
(:mod:`src.decoding.drafters`): a draft model by default, prompt lookup (whose deterministic proposals have a
one-hot q) or an EAGLE head.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from src.decoding.base import AUTO, DecodingMethod, GenerationState, input_device, shared_vocab
from src.decoding.chain import check_chain_length, commit_chain, verify_chain
from src.decoding.drafters import Drafter, ModelDrafter
from src.decoding.sampling import SamplingConfig, logits_to_probs, residual_distribution, sample
from src.decoding.stats import Generation
from src.decoding.timing import drafting
from src.errors import InvalidParameterError, check_positive_int


class SpeculativeSampling(DecodingMethod):
    """Draft a chain of up to ``k`` tokens, verify it with one target forward, keep the accepted prefix + one token.

    Args:
        k: draft tokens proposed per target forward (the starting value under the heuristic schedule; never more
            than ``max_new_tokens`` still allows); ``auto``: chosen at run start from the cost model and a short
            calibration (:mod:`src.lit.auto`), at most ``max_k``.
        schedule: ``"constant"`` keeps ``k``; ``"heuristic"`` adds 2 after a fully accepted chain and removes 1
            otherwise, within [1, max_k] (HF's ``num_assistant_tokens_schedule="heuristic"``).
        max_k: the largest chain the heuristic schedule may reach.
        confidence_threshold: stop a chain once the draft's probability of its token is below this (0 never
            stops early; HF's ``assistant_confidence_threshold``). Draft-model drafters only.
        drafter: what proposes the chain (:mod:`src.decoding.drafters`): a draft model (default,
            ``ModelDrafter``) or ``PromptLookup`` (no draft model; the method key becomes
            ``speculative+prompt_lookup``), or ``EagleDrafter`` (a trained head on the target's features,
            :mod:`src.decoding.eagle`; ``speculative+eagle``).

    Statistics: ``record_step(drafted, accepted)`` once per target verification, with ``drafted`` = the chain
    length of that cycle (0 for a plain target step) and ``accepted`` = how many of them the rule accepted (also
    counted when an EOS among them ends the output early). Without EOS:
    ``len(tokens) == accepted_tokens + len(accepted_per_step)``, ``target_calls == len(accepted_per_step)`` and
    ``draft_calls == drafted_tokens`` (the prompt goes into the first draft and target forwards).
    """

    name = "speculative"

    def __init__(
        self,
        k: int | Literal["auto"] = 4,
        schedule: Literal["constant", "heuristic"] = "constant",
        max_k: int = 16,
        confidence_threshold: float = 0.0,
        drafter: Drafter | None = None,
    ) -> None:
        if k != AUTO:
            check_chain_length(k)
        if schedule not in ("constant", "heuristic"):
            raise InvalidParameterError(f"schedule={schedule!r} is unknown: use 'constant' or 'heuristic'")
        if k == AUTO and schedule != "constant":
            raise InvalidParameterError("k='auto' chooses one constant chain length: use schedule 'constant' with it, "
                                        "or a number k with the heuristic schedule")
        check_positive_int("max_k", max_k, f"use an integer >= k ({k})", minimum=1 if k == AUTO else k)
        if not 0.0 <= confidence_threshold < 1.0:
            raise InvalidParameterError(
                f"confidence_threshold={confidence_threshold!r} is outside [0, 1): use 0 to disable it or e.g. 0.4"
            )
        self.drafter = drafter if drafter is not None else ModelDrafter()
        if not self.drafter.proposes_chains:
            raise InvalidParameterError(
                f"drafter {self.drafter.name!r} proposes no chain: use it with src.decoding.specexec.SpecExec"
            )
        if confidence_threshold and not self.drafter.needs_draft_model:
            raise InvalidParameterError(
                f"confidence_threshold={confidence_threshold} reads a draft model's probabilities, but the drafter is "
                f"{self.drafter.name!r}: drop confidence_threshold"
            )
        if self.drafter.max_branches != 1:
            raise InvalidParameterError(
                f"max_branches={self.drafter.max_branches} is a tree option, but speculative sampling verifies a "
                "chain: drop max_branches, or use src.decoding.specexec.SpecExec with this drafter"
            )
        self.k = k
        self.schedule = schedule
        self.max_k = max_k
        self.confidence_threshold = float(confidence_threshold)

    @property
    def drafter_name(self) -> str:
        return self.drafter.name

    @property
    def needs_draft(self) -> bool:
        return self.drafter.needs_draft_model

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "schedule": self.schedule, "max_k": self.max_k,
                "confidence_threshold": self.confidence_threshold, "drafter": self.drafter.name,
                **self.drafter.params()}

    def verify_width(self) -> int:
        longest = self.max_k if self.schedule != "constant" or self.k == AUTO else self.k
        return longest + 1  # the chain + the last committed token

    def input_files(self) -> list[str]:
        """A restricted draft vocabulary's token map: hashed into the run fingerprint."""
        return self.drafter.input_files()

    def prepare(self, target_info: dict[str, Any], draft_info: dict[str, Any] | None) -> None:
        """A trained head checks that it was trained for this target."""
        self.drafter.prepare(target_info)

    def next_k(self, k: int, drafted: int, accepted: int) -> int:
        """The chain length of the next cycle: HF's heuristic (+2 after a full acceptance, else -1)."""
        if self.schedule == "constant":
            return self.k
        return min(self.max_k, k + 2) if drafted and accepted == drafted else max(1, k - 1)

    @torch.inference_mode()
    def generate(self, target, draft, input_ids: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig,
                 eos_token_ids: set[int], generator: torch.Generator | None = None) -> Generation:
        state = GenerationState(input_ids, max_new_tokens, eos_token_ids)
        if draft is None and self.drafter.needs_draft_model:
            raise InvalidParameterError("draft=None: speculative sampling needs a draft model (set one in the model pair)")
        # p and q live on the shared ids [0, vocab): draft models of one family may pad their output differently
        vocab = shared_vocab(target, draft)
        self.drafter.begin(draft, vocab, input_device(draft) if draft is not None else state.device, target=target)
        k = self.k  # this cycle's chain length (the schedule may change it)

        # Prefill: the first cycle; the draft reads the prompt as it proposes the first chain, and the target's
        # first forward both encodes the prompt and verifies that chain (one target forward saved).
        with state.prefill():
            drafted, accepted = self.cycle(state, target, k, vocab, sampling, generator)

        # Decode: one cycle per target forward until EOS or max_new_tokens; the schedule sets each cycle's k.
        with state.decode():
            while not state.done:
                k = self.next_k(k, drafted, accepted)
                drafted, accepted = self.cycle(state, target, k, vocab, sampling, generator)
        return state.result()

    def cycle(
        self,
        state: GenerationState,
        target,
        k: int,
        vocab: int,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> tuple[int, int]:
        """Propose, verify, accept, commit once; returns (drafts proposed, drafts accepted)."""
        committed = len(state.sequence)
        # A cycle emits at most k + 1 tokens: never draft what could not be emitted.
        k = min(k, state.room - 1)
        # Step 1: the drafter proposes x_1..x_n ~ q (n <= k; fewer when its confidence drops below the threshold).
        with drafting():
            proposal = self.drafter.propose(state.sequence, k, sampling, generator, self.confidence_threshold)
        # Step 2: one target forward scores every drafted position (and encodes what it has not read yet).
        verified = verify_chain(target, state.target_cache, state.sequence, proposal.tokens, vocab,
                                self.drafter.needs_target_features, self.drafter.feature_layers)
        # Step 3: the acceptance rule keeps a prefix x_1..x_a and draws the token that follows it.
        p = logits_to_probs(verified.logits, sampling)  # (n + 1, vocab)
        accepted, token = self.accept(proposal.tokens, p, proposal.q, sampling, generator)
        # Step 4: emit x_1..x_a + token; cut the target cache and the drafter back to what was kept.
        state.emit([*proposal.tokens[:accepted].tolist(), token])
        commit_chain(state.target_cache, self.drafter, committed, verified, accepted)
        drafted = proposal.tokens.numel()
        state.record_cycle(proposal.forwards, drafted, accepted)
        return drafted, accepted

    # ---------------------------------------------------------------- stages

    def accept(
        self,
        drafts: torch.Tensor,
        p: torch.Tensor,
        q: torch.Tensor | None,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> tuple[int, int]:
        """The acceptance rule: (number of drafts accepted, the token emitted after them).

        drafts (k,), p (k + 1, vocab), q (k, vocab) (not read under greedy decoding; None: a deterministic
        proposal, q one-hot at each draft, so x_i is accepted with probability p_i(x_i) and a rejection samples
        from p_i with x_i removed).
        """
        k = drafts.numel()
        p = p.to(drafts.device)
        if q is None and not sampling.greedy:
            q = torch.nn.functional.one_hot(drafts, p.shape[-1]).to(p.dtype)  # (k, vocab)
        q = q.to(drafts.device) if q is not None else None
        if sampling.greedy:
            # Step 1 (greedy): p and q are one-hot, min(1, p/q) is 1 iff x_i == argmax p_i, and the residual
            # of a rejection (and the bonus) is the target argmax itself.
            target_choice = p.argmax(-1)  # (k + 1,)
            accepted = int((drafts == target_choice[:k]).long().cumprod(0).sum())
            return accepted, int(target_choice[accepted])
        # Step 1: accept x_i iff u_i < p_i(x_i) / q_i(x_i), u_i ~ U[0, 1)  (written u_i * q_i < p_i: no division).
        p_x = p[:k].gather(-1, drafts[:, None]).squeeze(-1)  # (k,)
        q_x = q.gather(-1, drafts[:, None]).squeeze(-1)  # (k,)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(k, generator=generator, device=gen_device).to(drafts.device)  # (k,)
        accepted = int((u * q_x < p_x).long().cumprod(0).sum())
        # Step 2: first rejection at i -> x ~ normalize(max(0, p_i - q_i)); all accepted -> bonus x ~ p_{k+1}.
        if accepted < k:
            return accepted, int(sample(residual_distribution(p[accepted], q[accepted]), generator))
        return accepted, int(sample(p[k], generator))
