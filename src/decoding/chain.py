"""The stages of one draft-then-verify chain cycle, shared by speculative sampling and AutoJudge.

    Step 1  propose  x_1..x_n (n <= k) from the drafter, with the q they were drawn from (``Drafter.propose``,
                     inside :func:`~src.decoding.timing.drafting`)
    Step 2  verify   one target forward over the committed tokens the target has not cached + x_1..x_n;
                     row 0 of its logits is the target's next-token distribution after the last committed token,
                     row i the one after x_i (n + 1 rows)                                      :func:`verify_chain`
    Step 3  decide   (a = drafts kept, the token emitted after them): speculative sampling's exact rule, or
                     AutoJudge's judge; each method's own ``cycle`` does it
    Step 4  commit   emit x_1..x_a + token (``GenerationState.emit`` stops right after an EOS); the target cache
                     and the drafter keep the committed tokens + x_1..x_a, and the newest token is fed at the next
                     cycle                                                                     :func:`commit_chain`

The first cycle of a generation encodes the prompt in the same forwards (no separate prefill), as HF assisted
generation does. All rows are sliced to the ids both models share, ``[0, vocab)``: models of one family may pad
their output layers differently (Qwen2.5 0.5B: 151936, 7B: 152064), and a token from a padded range must never
be emitted nor fed to the other model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from src.decoding.base import input_device, model_logits, model_logits_and_hidden
from src.decoding.drafters import Drafter
from src.decoding.kv import cache_length, truncate_cache
from src.decoding.timing import drafting
from src.errors import check_positive_int


@dataclass
class Verified:
    """The target's view of a proposal: ``logits`` (n + 1, vocab) after the last committed token and after each
    drafted token; ``unseen`` = m, the committed tokens the forward read before the drafts (>= 1: at least the
    newest); ``hidden`` (n + 1, H) the final-norm hidden states at the n + 1 rows, and ``features`` (m + n, H)
    those of every position the forward read, when asked for; with ``feature_layers`` (an EAGLE-3 head's aux
    layers) ``features`` is (m + n, len(layers) * H) instead."""

    logits: torch.Tensor
    unseen: int
    hidden: torch.Tensor | None = None
    features: torch.Tensor | None = None


def check_chain_length(k: int) -> None:
    """The one check of a chain method's ``k`` (speculative sampling, AutoJudge): an int >= 1, never a bool."""
    check_positive_int("k", k, "use k >= 1 draft tokens per target call")


def verify_chain(
    target, cache, sequence: list[int], drafts: torch.Tensor, vocab: int, with_hidden: bool = False,
    feature_layers: tuple[int, ...] | None = None,
) -> Verified:
    """Step 2: one target forward over the unseen committed tokens + the n drafts; keeps the last n + 1 rows."""
    device = input_device(target)
    unseen = torch.tensor([sequence[cache_length(cache) :]], device=device)  # (1, m >= 1)
    step_input = torch.cat([unseen, drafts.to(device)[None]], dim=1)  # (1, m + n)
    m, keep = unseen.shape[1], drafts.numel() + 1
    if feature_layers is not None:  # EAGLE-3: the aux layers' states of the same forward
        logits, hidden, features = model_logits_and_hidden(target, step_input, cache, logits_to_keep=keep,
                                                           feature_layers=feature_layers)
        return Verified(logits[0, -keep:, :vocab], m, hidden[0, -keep:], features[0])  # ..., (m + n, 3H)
    if with_hidden:
        logits, hidden = model_logits_and_hidden(target, step_input, cache, logits_to_keep=keep)
        # (n + 1, vocab), (n + 1, H), (m + n, H)
        return Verified(logits[0, -keep:, :vocab], m, hidden[0, -keep:], hidden[0])
    logits = model_logits(target, step_input, cache, logits_to_keep=keep)  # (1, n + 1, vocab_p)
    return Verified(logits[0, -keep:, :vocab], m)


def commit_chain(cache, drafter: Drafter, committed: int, verified: Verified, accepted: int) -> None:
    """Step 4 (the caches): the sequence held ``committed`` tokens before this cycle and keeps ``accepted`` drafts;
    the target cache and the drafter are cut back to those (the token emitted after them is read next cycle)."""
    truncate_cache(cache, committed + accepted)
    with drafting():
        if drafter.needs_target_features:  # the features of every position now committed and cached
            drafter.commit(committed + accepted, verified.features[: verified.unseen + accepted])
        else:
            drafter.commit(committed + accepted)
