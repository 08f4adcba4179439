"""The interface every decoding method implements, the model call they share, and the state of one generation.

Every method's ``generate`` has the same shape (gpt-fast's ``generate``)::

    state = GenerationState(input_ids, max_new_tokens, eos_token_ids)   # prologue: checks, counters, target cache
    with state.prefill():                                                # Step 1: the prompt's forward(s)
        ...
    with state.decode():                                                 # Step 2: one cycle per target forward
        while not state.done:
            ...
    return state.result()                                                # epilogue: stop reason, Generation

and each cycle is a method of its own that emits what it accepted (:meth:`GenerationState.emit`) and records
its counters (:meth:`GenerationState.record_cycle`).
"""

from __future__ import annotations

import functools
import inspect
import itertools
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any

import torch

from src.decoding.kv import new_cache
from src.decoding.sampling import SamplingConfig
from src.decoding.stats import Generation, GenerationStats
from src.decoding.timing import timed_stage
from src.errors import InvalidParameterError, check_positive_int

AUTO = "auto"  # a parameter value meaning "chosen by measurement at run start" (k, budget, max_depth)


def input_device(model) -> torch.device:
    """Where a model's input ids go: its input embeddings' device (HF models), else ``model.device``."""
    if hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings().weight.device
    if isinstance(getattr(model, "device", None), torch.device):
        return model.device
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def vocab_width(model) -> int:
    """Number of token ids the model can read and score (config.vocab_size, else its output layer's width).

    Models of one family may pad their lm_head differently (Qwen2.5 0.5B: 151936, 7B: 152064): draft methods
    compare p and q on the shared ids [0, min(width_p, width_q)).
    """
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if size is None and hasattr(model, "get_output_embeddings"):
        size = model.get_output_embeddings().weight.shape[0]
    if size is None:
        raise TypeError(f"cannot tell the vocabulary size of {type(model).__name__}: give it config.vocab_size")
    return int(size)


def shared_vocab(target, draft) -> int:
    """The ids p and q are compared on, [0, shared_vocab): both models' when a draft is given, else the target's."""
    return min(vocab_width(target), vocab_width(draft)) if draft is not None else vocab_width(target)


@functools.cache
def _accepts_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def _keep_kwargs(model, logits_to_keep: int | None, input_ids: torch.Tensor) -> dict:
    """Ask for the last ``logits_to_keep`` logit rows only: the lm_head over a long prompt costs ~10% of a prefill.

    The rows are passed as an index tensor, not as a count: transformers slices the hidden states with it, and
    a count gives a strided view that bfloat16 CPU matmuls run ~3x slower on (a 2-token bf16 SmolLM2 forward:
    ~65 ms instead of ~22 ms); indexing with a tensor gives a contiguous copy.
    """
    n = input_ids.shape[-1]
    if logits_to_keep is None or logits_to_keep >= n or not _accepts_logits_to_keep(type(model)):
        return {}
    return {"logits_to_keep": torch.arange(n - logits_to_keep, n, device=input_ids.device)}


@functools.cache
def _cache_keyword(model_class: type) -> str:
    """transformers >= 5.24 renamed ``past_key_values`` to ``cache`` (the old name goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def model_logits(
    model,
    input_ids: torch.Tensor,
    cache,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    logits_to_keep: int | None = None,
) -> torch.Tensor:
    """One forward over ``input_ids`` (1, n) appended to ``cache``; returns logits (1, n, vocab), or only the
    last ``logits_to_keep`` rows (1, logits_to_keep, vocab) when set (models without the option return all n).

    ``attention_mask`` may be a 4D tree mask (1, 1, n, cached + n); ``position_ids`` (1, n) then give each
    node's depth-based position.
    """
    return _forward(model, input_ids, cache, position_ids, attention_mask, logits_to_keep).logits


def model_logits_and_hidden(
    model,
    input_ids: torch.Tensor,
    cache,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    logits_to_keep: int | None = None,
    feature_layers: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like :func:`model_logits`, plus the final-layer hidden states after the final norm: (1, n, vocab), (1, n, H).

    transformers returns the post-norm states as the last entry of ``hidden_states`` (the lm_head input). With
    ``feature_layers`` (target layer ids, EAGLE-3's aux layers) a third tensor (1, n, len(layers) * H) follows:
    :func:`layer_features` of the same forward (no second pass).
    """
    out = _forward(model, input_ids, cache, position_ids, attention_mask, logits_to_keep, output_hidden_states=True)
    if feature_layers is None:
        return out.logits, out.hidden_states[-1]
    return out.logits, out.hidden_states[-1], layer_features(out.hidden_states, feature_layers)


def layer_features(hidden_states: tuple[torch.Tensor, ...], layers: tuple[int, ...]) -> torch.Tensor:
    """cat(hidden_states[i] for i in layers) (B, n, len(layers) * H): entry i of transformers' ``hidden_states`` is
    the *input* of decoder layer i (0: the embeddings), the convention of EAGLE-3's aux layer ids (the EAGLE
    repository and vLLM record the residual stream as layer i starts)."""
    last = len(hidden_states) - 2  # entries 0 .. L - 1 are layer inputs; the last one is the final-norm output
    if any(i < 0 or i > last for i in layers):
        raise InvalidParameterError(f"feature layers {list(layers)} must lie in [0, {last}] for a {last + 1}-layer model")
    return torch.cat([hidden_states[i] for i in layers], dim=-1)


def _forward(model, input_ids, cache, position_ids, attention_mask, logits_to_keep, **extra):
    """The one model call behind :func:`model_logits` and :func:`model_logits_and_hidden`."""
    return model(
        input_ids=input_ids,
        **{_cache_keyword(type(model)): cache},
        position_ids=position_ids,
        attention_mask=attention_mask,
        use_cache=True,
        **extra,
        **_keep_kwargs(model, logits_to_keep, input_ids),
    )


class DecodingMethod(ABC):
    """A decoding method: a plain object with typed ``__init__`` arguments (so configs can build it).

    ``generate`` decodes one prompt and returns the new tokens with statistics; it never writes files or logs.
    Probability convention (see :mod:`src.decoding.sampling`): ``p`` = target, ``q`` = draft.
    """

    name: str = "method"  # the family: baseline, speculative, specexec, autojudge
    drafter_name: str | None = None  # what proposes its tokens (src.decoding.drafters), for methods that draft
    needs_draft: bool = False
    lossless: bool = True  # emits the target's own distribution (greedy: the baseline's tokens); AutoJudge: False
    verifies_trees: bool = False  # its forwards carry a 4D tree mask (SpecExec): the cost profile prices them apart

    def params(self) -> dict[str, Any]:
        """Every parameter that shapes the output, defaults included. The method key and what a record carries
        are decided in src.results.keys (older results files keep their keys there)."""
        return {}

    def auto_params(self) -> list[str]:
        """The parameters configured as ``auto``: chosen by measurement at run start (:mod:`src.lit.auto`), then
        set with :meth:`resolve`."""
        return [name for name, value in self.params().items() if value == AUTO]

    def resolve(self, values: dict[str, int]) -> None:
        """Set the ``auto`` parameters to the values chosen for this machine (each checked as its own option)."""
        unknown = sorted(set(values) - set(self.auto_params()))
        if unknown:
            raise InvalidParameterError(f"{self.name}: {unknown} are not 'auto' parameters of this method")
        for name, value in values.items():
            check_positive_int(name, value)
            setattr(self, name, value)

    def input_files(self) -> list[str]:
        """Files this method reads (a trained judge or head): a run fingerprint hashes them, and no results file
        may be written over them."""
        return []

    def verify_width(self) -> int:
        """The most tokens one target forward of this method scores after the prefill (the cost profile measures
        the target's latency up to it)."""
        return 1

    def prepare(self, target_info: dict[str, Any], draft_info: dict[str, Any] | None) -> None:
        """Called once the models are loaded, before any ``generate`` (AutoJudge loads and checks its judge)."""
        return None  # most methods need nothing

    @abstractmethod
    def generate(self, target, draft, input_ids: torch.Tensor, max_new_tokens: int, sampling: SamplingConfig,
                 eos_token_ids: set[int], generator: torch.Generator | None = None) -> Generation:
        """Decode at most ``max_new_tokens`` after ``input_ids`` (1, prompt_len); stop right after an EOS."""


def check_generate_args(input_ids: torch.Tensor, max_new_tokens: int) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise InvalidParameterError(f"input_ids must have shape (1, prompt_len>0), got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise InvalidParameterError(f"max_new_tokens={max_new_tokens} is invalid: use a value >= 1")


class GenerationState:
    """One generation, as every method's ``generate`` sees it (see the module docstring).

    ``sequence``: prompt + emitted tokens; ``target_cache``: the target's KV cache (the committed tokens it has
    read); ``stats``: the counters. ``device`` is the target's input device (where ``input_ids`` lie).
    """

    def __init__(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_ids: set[int]) -> None:
        check_generate_args(input_ids, max_new_tokens)
        self.device = input_ids.device
        self.sequence: list[int] = input_ids[0].tolist()
        self.prompt_len = len(self.sequence)
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = eos_token_ids
        self.stats = GenerationStats()
        self.target_cache = new_cache()

    @property
    def room(self) -> int:
        """How many tokens may still be emitted."""
        return self.max_new_tokens - (len(self.sequence) - self.prompt_len)

    @property
    def done(self) -> bool:
        """After the prefill: the budget is spent or the last emitted token is an EOS."""
        return self.room <= 0 or self.sequence[-1] in self.eos_token_ids

    def emit(self, tokens: list[int]) -> None:
        """Append ``tokens``, stopping right after an EOS (what follows it was never generated)."""
        for token in tokens:
            self.sequence.append(token)
            if token in self.eos_token_ids:
                break

    def record_cycle(self, draft_forwards: int, drafted: int, accepted: int) -> None:
        """One target verification: ``drafted`` draft tokens offered (along the chosen path), ``accepted`` kept,
        ``draft_forwards`` draft forwards (or head steps) spent on them."""
        self.stats.target_calls += 1
        self.stats.draft_calls += draft_forwards
        self.stats.record_step(drafted=drafted, accepted=accepted)

    def prefill(self) -> AbstractContextManager[None]:
        """Time the block as ``stats.prefill_s`` (:mod:`src.decoding.timing`)."""
        return timed_stage(self.stats, "prefill", self.device)

    def decode(self) -> AbstractContextManager[None]:
        """Time the block as ``stats.decode_s``."""
        return timed_stage(self.stats, "decode", self.device)

    def result(self) -> Generation:
        """The epilogue: the new tokens and why the generation stopped."""
        tokens = self.sequence[self.prompt_len :]
        stopped_by = "eos" if tokens[-1] in self.eos_token_ids else "max_new_tokens"
        return Generation(tokens=tokens, stats=self.stats, stopped_by=stopped_by)
