"""The EAGLE-3 draft head (Li et al. 2025, "EAGLE-3: Scaling up Inference Acceleration of Large Language Models
via Training-Time Test", arXiv 2503.01840) as a plain torch module.

What changed from EAGLE-1/2 (:mod:`src.models.eagle`):

- the input is not the target's last feature but three of its hidden states, low, middle and high (the inputs
  of target layers ``aux_layers``, by default (2, L // 2, L - 3) as in the EAGLE repository and vLLM), fused by
  one fc: g_t = fc(cat(a_t^low, a_t^mid, a_t^high)), (3 H_target) -> H;
- the decoder layer reads the token embedding and that state side by side: its q/k/v projections take 2H;
- the head has its own final norm and lm_head over a reduced *draft vocabulary* of V_d ids: draft id i is target
  id ``i + d2t[i]``; ``t2d`` (V,) bool marks the target ids that have a draft id;
- from the second draft step on, the head reads its own output h (H wide, no fc) in place of g.

One step at position t (x_{t+1} the token that follows position t)::

    g   = fc(aux_t)                  (B, T, 3 H_t) -> (B, T, H)   first step only; later steps read h of t - 1
    e   = embed(x_{t+1})             (B, T, H)                    the target's embedding (frozen) unless the head has one
    r   = hidden_norm(g) if norm_before_residual else g
    a   = attn(cat(input_layernorm(e), hidden_norm(g)))           q/k/v: 2H -> heads
    h   = r + a;  h = h + mlp(post_attention_layernorm(h))       (B, T, H)
    q   = softmax(lm_head(norm(h)))  over the V_d draft ids       predicts x_{t+2}

The module's parameter names follow the EAGLE repository's checkpoints (``fc``, ``midlayer.*``, ``norm``,
``lm_head``, ``d2t``, ``t2d``); :mod:`src.models.eagle3_formats` maps the other published layouts onto them and
writes the speculators format.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from src.decoding.kv import new_cache
from src.errors import IncompatibleModelsError, InvalidParameterError
from src.models.eagle import causal_mask, rope_parameters


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low / middle / high layers of an L-layer target: (2, L // 2, L - 3) (EAGLE repository, vLLM)."""
    if num_layers < 4:
        raise InvalidParameterError(f"EAGLE-3 reads three target layers, but the target has {num_layers}: "
                                    "use a target with at least 4 layers, or give aux_layers")
    return (min(2, num_layers - 1), num_layers // 2, num_layers - 3)


@dataclass
class Eagle3Config:
    """Everything that rebuilds a head: its decoder layer (a Llama layer's sizes), the target's width and vocabulary,
    the draft vocabulary, and which target layers it reads."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    target_hidden_size: int
    vocab_size: int  # the target's
    draft_vocab_size: int
    aux_layers: tuple[int, ...]
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    norm_before_residual: bool = False
    fc_bias: bool = False
    attention_bias: bool = False

    def __post_init__(self) -> None:
        self.aux_layers = tuple(int(layer) for layer in self.aux_layers)
        # >= 2 layers: the head tells fused target states (len * H_t wide) from its own (H wide) by their width
        if len(self.aux_layers) < 2 or any(layer < 0 for layer in self.aux_layers):
            raise InvalidParameterError(f"aux_layers={list(self.aux_layers)} is invalid: give two or more target "
                                        "layer ids >= 0 (EAGLE-3 reads three)")
        if not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise InvalidParameterError(f"draft_vocab_size={self.draft_vocab_size} must lie in [1, {self.vocab_size}] "
                                        "(the target's vocabulary): use a head made for this target")

    @classmethod
    def for_target(cls, target_config: Any, draft_vocab_size: int | None = None,
                   aux_layers: tuple[int, ...] | None = None) -> Eagle3Config:
        """A head shaped like one layer of the target (the EAGLE-3 recipe) for a Llama / Qwen2 / Mistral-like config."""
        heads = target_config.num_attention_heads
        layers = aux_layers if aux_layers is not None else default_aux_layers(target_config.num_hidden_layers)
        return cls(
            hidden_size=target_config.hidden_size, intermediate_size=target_config.intermediate_size,
            num_attention_heads=heads, num_key_value_heads=getattr(target_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(target_config, "head_dim", None) or target_config.hidden_size // heads,
            target_hidden_size=target_config.hidden_size, vocab_size=target_config.vocab_size,
            draft_vocab_size=draft_vocab_size or target_config.vocab_size, aux_layers=tuple(layers),
            rms_norm_eps=getattr(target_config, "rms_norm_eps", None) or 1e-6,
            hidden_act=getattr(target_config, "hidden_act", None) or "silu",
            max_position_embeddings=getattr(target_config, "max_position_embeddings", None) or 2048,
            rope_parameters=rope_parameters(target_config),
        )

    def layer_config(self) -> LlamaConfig:
        """The 1-layer ``LlamaConfig`` of the head's decoder layer (SDPA: bool or additive masks alike)."""
        config = LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=1, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, hidden_act=self.hidden_act,
            rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
            rope_parameters=dict(self.rope_parameters), attention_bias=self.attention_bias, mlp_bias=False,
        )
        config._attn_implementation = "sdpa"
        return config

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["aux_layers"] = list(self.aux_layers)
        return out

    def check_target(self, target_config: Any, what: str) -> None:
        """Refuse a head whose target width, vocabulary or layers are not this target's, in one line naming both."""
        need = {"target_hidden_size": target_config.hidden_size, "vocab_size": target_config.vocab_size}
        for name, value in need.items():
            if getattr(self, name) != value:
                raise IncompatibleModelsError(
                    f"{what} was built for a target with {name.replace('target_', '')}={getattr(self, name)} but this "
                    f"target has {value}: use an EAGLE-3 head trained for this target")
        depth = target_config.num_hidden_layers
        if max(self.aux_layers) >= depth:
            raise IncompatibleModelsError(
                f"{what} reads target layers {list(self.aux_layers)} but this target has {depth} layers (ids 0.."
                f"{depth - 1}): use an EAGLE-3 head trained for this target")


class Eagle3Layer(nn.Module):
    """The EAGLE-3 decoder layer: attention over cat(norm(embedding), norm(hidden)), 2H wide, then a Llama MLP."""

    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        layer = config.layer_config()
        self.norm_before_residual = config.norm_before_residual
        self.self_attn = LlamaAttention(layer, layer_idx=0)
        width, bias = 2 * config.hidden_size, config.attention_bias
        self.self_attn.q_proj = nn.Linear(width, config.num_attention_heads * config.head_dim, bias=bias)
        self.self_attn.k_proj = nn.Linear(width, config.num_key_value_heads * config.head_dim, bias=bias)
        self.self_attn.v_proj = nn.Linear(width, config.num_key_value_heads * config.head_dim, bias=bias)
        self.mlp = LlamaMLP(layer)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)  # on the embedding
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)  # on the fused / own state
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, embeddings, hidden, position_embeddings, attention_mask, cache) -> torch.Tensor:
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        attended, _ = self.self_attn(
            torch.cat((self.input_layernorm(embeddings), normed), dim=-1),  # (B, T, 2H)
            position_embeddings=position_embeddings, attention_mask=attention_mask, cache=cache,
        )
        hidden = residual + attended
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle3Head(nn.Module):
    """fc over three target layers, one EAGLE-3 decoder layer, its own norm and lm_head over the draft vocabulary.

    ``d2t`` (V_d,) int64: draft id i is target id i + d2t[i]; ``t2d`` (V,) bool. Both are buffers and travel with
    the weights. ``embed_tokens`` exists only for heads that ship their own embedding (else the target's is used).
    """

    feature_kind = "eagle-3"

    def __init__(self, config: Eagle3Config, draft_ids: torch.Tensor | None = None, own_embedding: bool = False):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.fc = nn.Linear(len(config.aux_layers) * config.target_hidden_size, hidden, bias=config.fc_bias)
        self.midlayer = Eagle3Layer(config)
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, config.draft_vocab_size, bias=False)
        self.rotary = LlamaRotaryEmbedding(config.layer_config())
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden) if own_embedding else None
        d2t, t2d = draft_vocab_maps(draft_ids, config.draft_vocab_size, config.vocab_size)
        self.register_buffer("d2t", d2t)
        self.register_buffer("t2d", t2d)
        self.metadata: dict[str, Any] = {}

    @property
    def aux_layers(self) -> tuple[int, ...]:
        return self.config.aux_layers

    def _apply(self, fn: Any, recurse: bool = True) -> Eagle3Head:
        """As :meth:`EagleHead._apply`: RoPE frequencies stay float32 under ``.to(bfloat16)``; the id maps stay
        integer / bool (``.to(dtype)`` leaves them alone anyway)."""
        inv_freq = self.rotary.inv_freq.float()
        super()._apply(fn, recurse)
        inv_freq = inv_freq.to(self.rotary.inv_freq.device)
        self.rotary.inv_freq, self.rotary.original_inv_freq = inv_freq, inv_freq.clone()
        return self

    def fuse(self, aux_features: torch.Tensor) -> torch.Tensor:
        """cat(a^low, a^mid, a^high) (..., 3 H_t) -> g (..., H)."""
        return self.fc(aux_features.to(self.fc.weight.dtype))

    def forward(
        self,
        features: torch.Tensor,
        token_embeddings: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: Any | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """features (B, T, 3 H_t) target aux states (fused by fc) or (B, T, H) the head's own earlier outputs;
        token_embeddings of x_{t+1} (B, T, H) -> h (B, T, H). Cache, positions and mask as :meth:`EagleHead.forward`."""
        batch, length, width = features.shape
        hidden = self.fuse(features) if width == self.fc.in_features else features.to(self.fc.weight.dtype)
        past = cache.get_seq_length(0) if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=features.device).expand(batch, length)
        if attention_mask is None:
            attention_mask = causal_mask(batch, length, past, features.device)
        position_embeddings = self.rotary(hidden, position_ids)
        return self.midlayer(token_embeddings.to(hidden.dtype), hidden, position_embeddings, attention_mask, cache)

    def logits(self, hidden: torch.Tensor, lm_head_weight: Any = None, lm_head_bias: Any = None) -> torch.Tensor:
        """h (..., H) -> logits (..., V_d) over :meth:`vocab_ids` (the head's own norm and lm_head; the target's
        lm_head arguments are accepted and unused, so both head kinds are called alike)."""
        return self.lm_head(self.norm(hidden.to(self.lm_head.weight.dtype)))

    def vocab_ids(self) -> torch.Tensor:
        """The target ids (V_d,) that the columns of :meth:`logits` stand for: i + d2t[i]."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    @property
    def top_token_ids(self) -> torch.Tensor | None:
        """The target ids of the draft vocabulary, or None when it is the whole vocabulary in order."""
        if self.config.draft_vocab_size == self.config.vocab_size and not bool(self.d2t.any()):
            return None
        return self.vocab_ids()

    def embedding(self, target) -> nn.Module:
        """The embedding the head reads tokens through: its own when it ships one, else the target's."""
        return self.embed_tokens if self.embed_tokens is not None else target.get_input_embeddings()

    @torch.no_grad()
    def init_from_target(self, target) -> None:
        """Start the norm and lm_head from the target's final norm and lm_head rows of the draft ids (the head then
        begins by predicting the target's next-token from the target's own last-layer state)."""
        head = target.get_output_embeddings()
        ids = self.vocab_ids().to(head.weight.device)
        self.lm_head.weight.copy_(head.weight.index_select(0, ids).to(self.lm_head.weight))
        norm = getattr(target.get_decoder(), "norm", None)
        if norm is not None and getattr(norm, "weight", None) is not None and norm.weight.shape == self.norm.weight.shape:
            self.norm.weight.copy_(norm.weight.to(self.norm.weight))


# ---------------------------------------------------------------- training-time test


def ttt_mask(rows: int, step: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(rows, step * rows) bool, True = attend: what step ``step``'s query at row p sees among the key blocks of
    steps 1..step (block i: step i's keys of every row).

    Step j at row p is draft step j of the chain whose last exact pair is s = p - j + 1 (at decoding time the head
    has read the verified pairs 0..s and then drafted j - 1 tokens at rows s + 1 .. p - 1). So it sees step 1's keys
    of rows 0..s, and step i's key of row s + i - 1 for i = 2..j (its own included): each earlier draft of its
    chain once, no draft of any other chain. SpecForge's ``ttt_length`` steps use the same pattern.
    """
    p = torch.arange(rows, device=device)[:, None]
    r = torch.arange(rows, device=device)[None, :]
    blocks = [r <= p - step + 1] + [r == p - step + i for i in range(2, step + 1)]
    return torch.cat(blocks, dim=1)


def ttt_forward(head: Eagle3Head, aux: torch.Tensor, embedded: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The training-time test: h^j (B, n, H) for j = 1..steps.

    aux (B, n, 3 H_t): the target's aux states a_p; embedded (B, n, H): embeddings of x_{p+1}. Step 1 reads
    fc(a_p); step j reads step j - 1's output of row p - 1 (a j-th draft step), same token x_{p+1}, same RoPE
    position p as at decoding time. Keys of every step stay in one cache, masked by :func:`ttt_mask`; rows p < j - 1
    have no chain of j steps (their outputs are meaningless, masked out of losses and counts).
    """
    batch, n, _ = embedded.shape
    positions = torch.arange(n, device=embedded.device).expand(batch, n)
    cache = new_cache()  # step j's keys join it, so step j + 1 attends to them
    hidden, outputs = aux, []
    for j in range(1, steps + 1):
        mask = ttt_mask(n, j, embedded.device)[None, None].expand(batch, 1, n, j * n)
        out = head(hidden, embedded, position_ids=positions, cache=cache, attention_mask=mask)  # (B, n, H)
        outputs.append(out)
        hidden = torch.cat([out.new_zeros(batch, 1, out.shape[-1]), out[:, :-1]], dim=1)  # row p reads h of p - 1
    return outputs


def draft_vocab_maps(draft_ids: torch.Tensor | None, draft_vocab: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t (V_d,) int64, t2d (V,) bool) of an ascending, unique id set (None: the first V_d ids)."""
    if draft_ids is None:
        draft_ids = torch.arange(draft_vocab)
    draft_ids = torch.as_tensor(draft_ids).to(torch.int64)
    if draft_ids.dim() != 1 or draft_ids.numel() != draft_vocab:
        raise InvalidParameterError(f"the draft vocabulary has {draft_ids.numel()} ids but draft_vocab_size="
                                    f"{draft_vocab}: give exactly draft_vocab_size ascending target ids")
    if draft_ids.numel() and (int(draft_ids.min()) < 0 or int(draft_ids.max()) >= vocab):
        raise InvalidParameterError(f"draft vocabulary ids must lie in [0, {vocab}): got ids outside it")
    if draft_ids.numel() > 1 and not bool((draft_ids[1:] > draft_ids[:-1]).all()):
        raise InvalidParameterError("draft vocabulary ids must be ascending and unique: sort them (torch.unique)")
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[draft_ids] = True
    return draft_ids - torch.arange(draft_vocab), t2d


def check_vocab_maps(d2t: torch.Tensor, t2d: torch.Tensor | None, vocab: int, source: str) -> torch.Tensor:
    """The target ids (V_d,) that ``d2t`` names, refused in one line when they leave the target's vocabulary,
    repeat, or disagree with ``t2d``."""
    ids = torch.arange(d2t.numel()) + d2t.to(torch.int64).cpu()
    if d2t.numel() > vocab:
        raise IncompatibleModelsError(f"{source}: d2t maps {d2t.numel()} draft ids but this target's vocabulary has "
                                      f"{vocab}: use an EAGLE-3 head made for this target")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise IncompatibleModelsError(f"{source}: d2t maps draft ids to target ids up to {int(ids.max())}, outside "
                                      f"this target's vocabulary of {vocab}: use an EAGLE-3 head made for this target")
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise IncompatibleModelsError(f"{source}: d2t does not map draft ids to ascending, unique target ids: "
                                      "the file is damaged; download or export it again")
    if t2d is not None:
        if t2d.numel() != vocab:
            raise IncompatibleModelsError(f"{source}: t2d covers {t2d.numel()} target ids but this target has {vocab}: "
                                          "use an EAGLE-3 head made for this target")
        marked = torch.nonzero(t2d.bool().cpu()).flatten()
        if not torch.equal(marked, ids):
            raise IncompatibleModelsError(f"{source}: t2d marks {marked.numel()} target ids but d2t maps {ids.numel()} "
                                          "others: the file is damaged; download or export it again")
    return ids
