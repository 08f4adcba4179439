"""The EAGLE-1/2 draft head (Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature
Uncertainty") as a plain torch module.

Convention. The *feature* f_t is the target's last hidden state at position t, i.e. the input of its
``lm_head`` (after the final norm). At position t the head reads the pair (f_t, embedding of token x_{t+1})
and predicts the next feature f̂_{t+1}; the target's own frozen ``lm_head`` applied to f̂_{t+1} gives the
draft distribution over x_{t+2}.

Layout (EAGLE-1, as in the EAGLE repository's ``cnets1.py``)::

    e = embed(x_{t+1})                      (B, T, H)   the target's embedding, frozen, not part of the head
    h = fc(cat(e, f_t))                     (B, T, 2H) -> (B, T, H), fc has a bias by default
    f̂ = LlamaDecoderLayer(h)               (B, T, H)   one layer, its input RMSNorm skipped
    logits = lm_head(f̂)                    (B, T, V)   the target's lm_head, frozen, no extra final norm

The head's weights are ``fc`` and the decoder layer only (plus ``top_token_ids``, the optional vocabulary
subset the head scores). Exported as two files side by side, never pickled: ``<path>.safetensors`` (weights
and ``top_token_ids``) and ``<path>.json`` (format, the layer config, and the caller's metadata: the target
the head was trained for, the training data, metrics). :func:`load_eagle_checkpoint` imports a head saved in
the EAGLE repository's layout (``config.json`` + ``pytorch_model.bin`` / ``model.safetensors``).
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from src.errors import (
    IncompatibleModelsError,
    InvalidParameterError,
    MalformedInputError,
    MissingInputError,
    is_positive_int,
)

FORMAT = "sp-samp-eagle-head/1"
TRAIN_HINT = "train one with `python -m src fit --config configs/eagle1.yaml` or set head_path"
IDENTITY_FIELDS = ("name", "dtype", "revision")  # what identifies the target a head was trained for
SKIPPED_NORM = "layer.input_layernorm.weight"  # EAGLE-1 skips this norm: accepted in a state dict, ignored
# the layer-config fields saved in ``<path>.json``, enough to rebuild the head
CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "rms_norm_eps", "max_position_embeddings", "rope_parameters",
)
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")


class EagleHead(nn.Module):
    """fc over [token embedding; feature] then one Llama decoder layer without its input norm (EAGLE-1)."""

    aux_layers = None  # reads the target's final-norm last hidden state (EAGLE-3 heads read three layers)

    def __init__(self, config: Any, top_token_ids: torch.Tensor | None = None, fc_bias: bool = True):
        super().__init__()
        self.config = head_config(config)
        hidden = self.config.hidden_size
        self.vocab_size = self.config.vocab_size
        self.fc_bias = fc_bias
        self.fc = nn.Linear(2 * hidden, hidden, bias=fc_bias)
        self.layer = LlamaDecoderLayer(self.config, layer_idx=0)
        self.layer.input_layernorm = nn.Identity()  # EAGLE-1: no input norm on the first (only) layer
        self.rotary = LlamaRotaryEmbedding(self.config)
        self.register_buffer("top_token_ids", check_top_tokens(top_token_ids, self.vocab_size))
        self.register_load_state_dict_pre_hook(_drop_skipped_norm)
        self.metadata: dict[str, Any] = {}
        self._rows_key: tuple | None = None
        self._rows: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _apply(self, fn: Any, recurse: bool = True) -> EagleHead:
        """``.to(dtype)`` / ``.cuda()`` etc., except that the RoPE frequencies stay float32 (in bfloat16 the
        angles of far positions would be off by radians); the device still follows."""
        inv_freq = self.rotary.inv_freq.float()  # computed in float32 at init, kept so from here on
        super()._apply(fn, recurse)
        inv_freq = inv_freq.to(self.rotary.inv_freq.device)
        self.rotary.inv_freq, self.rotary.original_inv_freq = inv_freq, inv_freq.clone()
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_rows"] = state["_rows_key"] = None  # weak references do not pickle; the cut is redone on use
        return state

    def forward(
        self,
        features: torch.Tensor,
        token_embeddings: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: Any | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """features f_t (B, T, H), token_embeddings of x_{t+1} (B, T, H) -> predicted features f̂_{t+1} (B, T, H).

        ``cache``: a ``DynamicCache`` (layer 0 is the head's) holding ``past`` earlier positions; it is
        extended by the T new ones. ``position_ids`` (B, T) default to past .. past + T - 1.
        ``attention_mask`` (B or 1, 1, T, past + T), bool (True = attend) or additive float, is passed to the
        attention untouched; by default each new position sees every cached one and the new ones up to itself.
        """
        batch, length, _ = features.shape
        past = cache.get_seq_length(0) if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=features.device).expand(batch, length)
        if attention_mask is None:
            attention_mask = causal_mask(batch, length, past, features.device)
        hidden = self.fc(torch.cat((token_embeddings, features), dim=-1))  # (B, T, 2H) -> (B, T, H)
        position_embeddings = self.rotary(hidden, position_ids)  # cos, sin: (B, T, head_dim)
        return self.layer(
            hidden, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            use_cache=cache is not None, position_embeddings=position_embeddings,
        )

    def logits(
        self, predicted_features: torch.Tensor, lm_head_weight: torch.Tensor, lm_head_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """predicted features (..., H) -> logits (..., N) over :meth:`vocab_ids` (N = len(top_token_ids), or V)."""
        weight, bias = self._head_rows(lm_head_weight, lm_head_bias)
        return F.linear(predicted_features.to(weight.dtype), weight, bias)

    def embedding(self, target) -> nn.Module:
        """The embedding the head reads tokens through: always the target's (frozen)."""
        return target.get_input_embeddings()

    def vocab_ids(self) -> torch.Tensor:
        """The token ids (N,) that the columns of :meth:`logits` stand for, ascending."""
        if self.top_token_ids is not None:
            return self.top_token_ids
        return torch.arange(self.vocab_size, device=self.fc.weight.device)

    def _head_rows(
        self, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The lm_head rows (N, H) and bias (N,) of ``top_token_ids``, cut once per (weight, bias, ids) state."""
        ids = self.top_token_ids
        if ids is None:
            return weight, bias
        sources = (weight, bias, ids)
        if any(t is not None and (t.requires_grad or t.is_inference()) for t in sources):
            # a cached cut would detach it from a trainable lm_head; inference tensors have no version counter
            return _select(weight, bias, ids)
        # versions change on in-place writes; rows cut under inference mode cannot be used by autograd
        key = tuple(_version_of(t) for t in sources) + (ids.device, torch.is_inference_mode_enabled())
        if self._rows is None or not self._cut_from(sources, key):
            self._rows = _select(weight, bias, ids)
            self._rows_key = (tuple(None if t is None else weakref.ref(t) for t in sources), key)
        return self._rows

    def _cut_from(self, sources: tuple[torch.Tensor | None, ...], key: tuple) -> bool:
        """Whether the cached rows were cut from these very tensors, in this state."""
        refs, old_key = self._rows_key
        same = all(t is None if ref is None else ref() is t for ref, t in zip(refs, sources))
        return same and old_key == key

    # ---------------------------------------------------------------- export

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> tuple[Path, Path]:
        """Write ``<path>.safetensors`` (weights, top_token_ids) and ``<path>.json``; returns both paths."""
        from safetensors.torch import save_file

        weights, meta_path = head_files(path)
        try:
            text = json.dumps(self._description(metadata or {}), indent=2) + "\n"
        except (TypeError, ValueError) as error:
            raise InvalidParameterError(f"head metadata is not JSON-serializable ({error}): pass plain values") from None
        weights.parent.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, str(weights))
        meta_path.write_text(text, encoding="utf-8")
        self.metadata = dict(metadata or {})
        return weights, meta_path

    def _description(self, metadata: dict[str, Any]) -> dict[str, Any]:
        count = None if self.top_token_ids is None else int(self.top_token_ids.numel())
        config = {name: getattr(self.config, name) for name in CONFIG_FIELDS}
        return {"format": FORMAT, "layout": "eagle-1", "config": config, "fc_bias": self.fc_bias,
                "top_tokens": count, "metadata": metadata}

    @classmethod
    def load(
        cls, path: str | Path, target_config: Any, target_identity: dict[str, Any] | None = None
    ) -> EagleHead:
        """Rebuild a head written by :meth:`save`, refusing one trained for another target."""
        weights, meta_path = head_files(path)
        meta = _read_description(meta_path, weights)
        try:
            config = LlamaConfig(num_hidden_layers=1, **meta["config"])
        except (TypeError, ValueError) as error:
            raise MalformedInputError(f"head file {meta_path}: bad config ({_one_line(error)}): re-export it") from None
        check_target(config, target_config, f"head {weights}")
        metadata = meta.get("metadata") or {}
        if not isinstance(metadata, dict) or not isinstance(metadata.get("target") or {}, dict):
            raise MalformedInputError(f"head file {meta_path}: metadata / metadata.target must be JSON objects: re-export it")
        check_identity(metadata.get("target"), target_identity, weights)
        state = _read_safetensors(weights)
        top = state.get("top_token_ids")
        _check_top_count(meta["top_tokens"], top, target_config.vocab_size, weights)
        head = cls(config, top_token_ids=top, fc_bias=bool(meta["fc_bias"]))
        load_weights(head, state, weights)
        head.metadata = metadata
        return head


# ---------------------------------------------------------------- config and masks


def head_config(config: Any) -> LlamaConfig:
    """A 1-layer ``LlamaConfig`` (SDPA attention) from a Llama / Qwen2 / Mistral-like target config."""
    heads = config.num_attention_heads
    max_positions = getattr(config, "max_position_embeddings", None) or 2048
    cfg = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        hidden_act=getattr(config, "hidden_act", None) or "silu",
        rms_norm_eps=getattr(config, "rms_norm_eps", None) or 1e-6,
        max_position_embeddings=max_positions,
        rope_parameters=rope_parameters(config),
        attention_bias=False,
        mlp_bias=False,
    )
    cfg._attn_implementation = "sdpa"  # takes a bool or an additive float mask alike
    return cfg


def rope_parameters(config: Any) -> dict[str, Any]:
    """The target's RoPE settings as transformers 5 stores them ({"rope_type", "rope_theta", ...})."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
        rope = rope["full_attention"]  # per-layer-type settings: the head's layer is a full-attention one
    if isinstance(rope, dict) and "rope_theta" in rope:
        return dict(rope)
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    return {**scaling, "rope_type": rope_type, "rope_theta": getattr(config, "rope_theta", None) or 10000.0}


def causal_mask(batch: int, length: int, past: int, device: torch.device | str) -> torch.Tensor:
    """(B, 1, T, past + T) bool, True = attend: new position i sees every cached one and new ones <= i."""
    keys = torch.arange(past + length, device=device)
    queries = torch.arange(past, past + length, device=device)
    return (keys[None, :] <= queries[:, None]).expand(batch, 1, length, past + length)


def check_top_tokens(ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor | None:
    """``top_token_ids`` as ascending, unique int64 ids in [0, vocab_size), or None (full vocabulary)."""
    if ids is None:
        return None
    ids = torch.as_tensor(ids).detach()
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise InvalidParameterError(f"top_token_ids must be a 1-D tensor of token ids, got {ids.dtype} {tuple(ids.shape)}")
    if ids.numel() > vocab_size:
        raise InvalidParameterError(
            f"top_tokens={ids.numel()} is larger than the vocabulary ({vocab_size} tokens): use at most {vocab_size}"
        )
    ids = ids.to(torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise InvalidParameterError(f"top_token_ids must lie in [0, {vocab_size}): got ids outside it")
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise InvalidParameterError("top_token_ids must be ascending and unique: sort them (torch.unique)")
    return ids.clone()


def _select(
    weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = ids.to(weight.device)
    rows = weight.index_select(0, ids)  # (N, H)
    return rows, None if bias is None else bias.index_select(0, ids.to(bias.device))


def _version_of(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor._version


def _drop_skipped_norm(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: EAGLE checkpoints may carry the skipped input norm; ignore it."""
    state_dict.pop(prefix + SKIPPED_NORM, None)


# ---------------------------------------------------------------- checks


def check_target(config: Any, target_config: Any, what: str) -> None:
    """Refuse a head whose layer shapes (hidden size, vocabulary, ...) are not the target's."""
    ours = head_config(target_config)
    for name in SHAPE_FIELDS:
        have, need = getattr(config, name, None), getattr(ours, name)
        if have is not None and have != need:  # a field the file does not give is checked by the weight shapes
            raise IncompatibleModelsError(
                f"{what} was built for a target with {name}={have} but this target has {name}={need}: "
                f"use a head trained for this target ({TRAIN_HINT})"
            )


def check_identity(trained: dict[str, Any] | None, target: dict[str, Any] | None, weights: Path) -> None:
    """Refuse a head recorded as trained for another target (name / dtype / revision); no record = no check."""
    if not trained or target is None:
        return
    was = {name: trained.get(name) for name in IDENTITY_FIELDS}
    now = {name: target.get(name) for name in IDENTITY_FIELDS}
    if was != now:
        raise IncompatibleModelsError(
            f"head {weights} was trained for target {was} but this run's target is {now}: {TRAIN_HINT}"
        )


def _check_top_count(count: Any, top: torch.Tensor | None, vocab_size: int, weights: Path) -> None:
    if count is not None and not is_positive_int(count):
        raise MalformedInputError(f"head {weights}: top_tokens={count!r} is not a positive integer or null: re-export it")
    if count is not None and count > vocab_size:
        raise InvalidParameterError(
            f"head {weights}: top_tokens={count} is larger than the vocabulary ({vocab_size} tokens): {TRAIN_HINT}"
        )
    stored = None if top is None else top.numel()
    if stored != count:
        raise MalformedInputError(
            f"head {weights} holds {stored} top_token_ids but its description says top_tokens={count}: re-export it"
        )


# ---------------------------------------------------------------- files


def head_files(path: str | Path) -> tuple[Path, Path]:
    """``artifacts/eagle`` -> (``artifacts/eagle.safetensors``, ``artifacts/eagle.json``)."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:200] or type(error).__name__


def _read_description(meta_path: Path, weights: Path) -> dict[str, Any]:
    for file in (weights, meta_path):
        if not file.is_file():
            raise MissingInputError(f"head file {file} does not exist: {TRAIN_HINT}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MalformedInputError(f"head file {meta_path} is not JSON ({_one_line(error)}): re-export it or {TRAIN_HINT}") from None
    missing = [key for key in ("format", "config", "fc_bias", "top_tokens") if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise MalformedInputError(f"head file {meta_path} lacks {missing}: re-export it or {TRAIN_HINT}")
    if meta["format"] != FORMAT:
        raise MalformedInputError(f"head file {meta_path} has format {meta['format']!r}, not {FORMAT!r}: {TRAIN_HINT}")
    config = meta["config"]
    absent = [name for name in CONFIG_FIELDS if not isinstance(config, dict) or name not in config]
    if absent:
        raise MalformedInputError(f"head file {meta_path}: config lacks {absent}: re-export it or {TRAIN_HINT}")
    return meta


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error type, or OSError / ValueError
        raise MalformedInputError(
            f"head file {path} is not a readable safetensors file ({_one_line(error)}): re-export it or {TRAIN_HINT}"
        ) from None


def load_weights(head: EagleHead, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Copy ``state`` (the head's own key names) into ``head``: every tensor present, shaped as expected."""
    expected = head.state_dict()
    state = {name: tensor for name, tensor in state.items() if name != SKIPPED_NORM}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        problems = ([f"lacks {_few(missing)}"] if missing else []) + ([f"has unknown {_few(unexpected)}"] if unexpected else [])
        raise MalformedInputError(
            f"{source} does not match the EAGLE head layout ({'; '.join(problems)}): re-export it or {TRAIN_HINT}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise IncompatibleModelsError(
                f"{source}: {name} has shape {tuple(tensor.shape)} but this target needs {tuple(expected[name].shape)}: "
                f"the head was trained for another target; {TRAIN_HINT}"
            )
    head.load_state_dict(state)


def _few(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---------------------------------------------------------------- EAGLE repository layout


def load_eagle_checkpoint(directory: str | Path, target_config: Any) -> EagleHead:
    """An EAGLE-1/2 head saved by the EAGLE repository: ``config.json`` (a 1-layer Llama config, optional
    ``"bias"`` for fc) and ``pytorch_model.bin`` or ``model.safetensors`` with keys ``fc.*`` and ``layers.0.*``.
    The skipped ``layers.0.input_layernorm.weight`` and the copy of the target's ``embed_tokens.weight`` are
    ignored (the latter refused if its shape is not the target's embedding)."""
    directory = Path(directory)
    config = _read_eagle_config(directory)
    check_target(_AttrDict(config), target_config, f"EAGLE head {directory}")
    weights = _eagle_weights_file(directory)
    raw = _read_eagle_state(weights)
    state = _map_eagle_keys(raw, target_config, weights)
    fc_bias = bool(config["bias"]) if "bias" in config else "fc.bias" in state
    head = EagleHead(target_config, fc_bias=fc_bias)
    load_weights(head, state, weights)
    return head


class _AttrDict(dict):
    """A dict read as a config (``config.hidden_size``); head_dim falls back as transformers does."""

    def __getattr__(self, name: str) -> Any:
        if name == "head_dim" and self.get("head_dim") is None and "hidden_size" in self:
            return self["hidden_size"] // self["num_attention_heads"]
        if name == "num_key_value_heads" and self.get(name) is None:
            return self.get("num_attention_heads")
        return self.get(name)


def _read_eagle_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise MissingInputError(f"EAGLE head config {path} does not exist: point the import at an EAGLE head folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MalformedInputError(f"EAGLE head config {path} is not JSON ({_one_line(error)}): fix or re-download it") from None
    if not isinstance(config, dict):
        raise MalformedInputError(f"EAGLE head config {path} is not a JSON object: fix or re-download it")
    layers = config.get("num_hidden_layers", 1)
    if layers != 1:
        raise MalformedInputError(f"EAGLE head config {path} has num_hidden_layers={layers}: an EAGLE-1/2 head has 1")
    return config


def _eagle_weights_file(directory: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    raise MissingInputError(
        f"EAGLE head folder {directory} has neither model.safetensors nor pytorch_model.bin: download the head's weights"
    )


def _read_eagle_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # truncated zip, pickle of other objects, ...
        raise MalformedInputError(f"EAGLE head weights {path} cannot be read ({_one_line(error)}): re-download them") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise MalformedInputError(f"EAGLE head weights {path} are not a dict of tensors: re-download them")
    return state


def _map_eagle_keys(raw: dict[str, torch.Tensor], target_config: Any, source: Path) -> dict[str, torch.Tensor]:
    """EAGLE key names -> EagleHead ones (``layers.0.`` -> ``layer.``); ignored keys dropped."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name == "embed_tokens.weight":
            _check_embedding(tensor, target_config, source)
        elif name.endswith("rotary_emb.inv_freq") or name == "layers.0.input_layernorm.weight":
            continue  # recomputed / skipped by EAGLE-1
        elif name.startswith("layers.0."):
            state["layer." + name.removeprefix("layers.0.")] = tensor
        else:
            state[name] = tensor  # fc.* map as is; anything else is reported as unexpected
    return state


def _check_embedding(tensor: torch.Tensor, target_config: Any, source: Path) -> None:
    need = (target_config.vocab_size, target_config.hidden_size)
    if tuple(tensor.shape) != need:
        raise IncompatibleModelsError(
            f"{source}: embed_tokens.weight has shape {tuple(tensor.shape)} but this target's embedding is {need}: "
            "the head was trained for another target; use one made for this target"
        )
