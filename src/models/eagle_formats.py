"""Every published layout of an EAGLE draft head, read by one function (:func:`load_head`), and the export of an
EAGLE-3 head in the speculators format (:func:`save_speculators`), the folder vLLM serves.

Layouts recognised (a folder with ``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``, unless noted):

| layout | how it is told apart | head |
|---|---|---|
| sp-samp EAGLE-1/2 files | ``<path>.safetensors`` + ``<path>.json`` (not a folder) | :class:`~src.models.eagle.EagleHead` |
| EAGLE repository, EAGLE-1/2 | weights ``fc.*`` (H x 2H) and ``layers.0.*`` | EagleHead |
| EAGLE repository, EAGLE-3 | ``architectures: [LlamaForCausalLMEagle3]``, weights ``midlayer.*``, ``d2t``/``t2d`` | :class:`~src.models.eagle3.Eagle3Head` |
| SpecForge export | the same architecture name and keys, ``draft_vocab_size``; aux layer ids in ``eagle_config`` | Eagle3Head |
| speculators (vLLM) | ``speculators_model_type: eagle3``, ``transformer_layer_config``, ``speculators_config.verifier`` | Eagle3Head |

EAGLE-3 key names are normalised onto the EAGLE repository's (``midlayer.*``): speculators writes ``layers.0.*``,
some exports prefix ``model.``. Aux layer ids: ``eagle_aux_hidden_state_layer_ids`` where the file gives them,
else EAGLE-3's default (2, L // 2, L - 3) of the target (what the EAGLE repository and vLLM use).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from src.errors import IncompatibleModelsError, InvalidParameterError, MalformedInputError, MissingInputError
from src.models.eagle import (
    EagleHead,
    _AttrDict,
    _eagle_weights_file,
    _few,
    _one_line,
    _read_eagle_state,
    check_identity,
    load_eagle_checkpoint,
    rope_parameters,
)
from src.models.eagle3 import Eagle3Config, Eagle3Head, check_vocab_maps, default_aux_layers

LAYOUTS = ("sp-samp head files (<path>.safetensors + <path>.json)", "EAGLE repository EAGLE-1/2 folder",
           "EAGLE repository EAGLE-3 folder", "SpecForge EAGLE-3 export", "speculators eagle3 folder")
EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
SPECULATORS_VERSION = "0.3.0"  # the speculators release whose config layout the export follows
METADATA_FILE = "sp_samp.json"  # our training metadata beside a speculators folder (vLLM ignores it)


HUB_PREFIX = "hub:"
HUB_FILES = ["config.json", "*.safetensors", "pytorch_model.bin", METADATA_FILE]


def resolve_head_path(path: str | Path) -> Path:
    """A local head path as is; ``hub:<owner>/<name>[@revision]`` downloaded (config and weights only) into the
    Hugging Face cache, and its local folder returned (offline: from the cache, with HF_HUB_OFFLINE=1)."""
    text = str(path)
    if not text.startswith(HUB_PREFIX):
        return Path(path)
    repo, _, revision = text.removeprefix(HUB_PREFIX).partition("@")
    if len(repo.split("/")) != 2 or not all(repo.split("/")):
        raise InvalidParameterError(f"head_path {text!r} is not hub:<owner>/<name>: e.g. "
                                    "hub:yuhuili/EAGLE3-LLaMA3.1-Instruct-8B")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=HUB_FILES))
    except Exception as error:  # offline, gated, unknown repo: huggingface_hub raises several kinds
        raise MissingInputError(f"cannot download head {repo!r} ({_one_line(error)}): check the name, log in for "
                                f"gated repos, or download it first (`hf download {repo}`) and pass its folder") from None


def load_head(path: str | Path, target_config: Any, target_identity: dict[str, Any] | None = None):
    """A draft head from ``path``, whatever its published layout (module table); refused in one line when it was
    made for another target or its folder has no recognised layout."""
    path = Path(path)
    if not path.is_dir():
        return EagleHead.load(path, target_config, target_identity)
    config = _read_config(path)
    layout = detect_layout(config, path)
    if layout == "eagle-1":
        return load_eagle_checkpoint(path, target_config)
    return load_eagle3(path, config, layout, target_config, target_identity)


def detect_layout(config: dict[str, Any], directory: Path) -> str:
    """``speculators`` | ``eagle-3`` (EAGLE repository / SpecForge) | ``eagle-1``; refused when none fits."""
    kind = config.get("speculators_model_type")
    if kind is not None:
        if kind != "eagle3":
            raise MalformedInputError(f"{directory}: speculators_model_type={kind!r} is not supported: sp-samp reads "
                                      "eagle3 speculators heads (and EAGLE-1/2 heads in the EAGLE repository's layout)")
        return "speculators"
    architectures = config.get("architectures") or []
    if any(name in EAGLE3_ARCHITECTURES for name in architectures) or "draft_vocab_size" in config:
        return "eagle-3"
    if config.get("num_hidden_layers", 1) == 1 and "hidden_size" in config:  # a 1-layer Llama config
        return "eagle-1"
    raise MalformedInputError(f"{directory}/config.json matches no head layout sp-samp reads (architectures="
                              f"{architectures}): the layouts are {'; '.join(LAYOUTS)}")


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise MissingInputError(f"head folder {directory} has no config.json: point head_path at a head folder "
                                f"({'; '.join(LAYOUTS)})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MalformedInputError(f"{path} is not JSON ({_one_line(error)}): fix or download it again") from None
    if not isinstance(config, dict):
        raise MalformedInputError(f"{path} is not a JSON object: fix or download it again")
    return config


# ---------------------------------------------------------------- EAGLE-3


def eagle3_config(config: dict[str, Any], layout: str, target_config: Any, directory: Path) -> Eagle3Config:
    """The head's :class:`Eagle3Config` from its ``config.json`` (speculators: the layer config is nested)."""
    layer = config.get("transformer_layer_config") if layout == "speculators" else config
    if not isinstance(layer, dict) or "hidden_size" not in layer:
        raise MalformedInputError(f"{directory}/config.json lacks the decoder layer's sizes "
                                  f"({'transformer_layer_config' if layout == 'speculators' else 'hidden_size'}): "
                                  "download the head again")
    layers = layer.get("num_hidden_layers") or 1
    if layers != 1:  # speculators can train deeper drafts; the EAGLE-3 recipe and its releases use one layer
        raise MalformedInputError(f"{directory}/config.json describes a {layers}-layer draft (num_hidden_layers="
                                  f"{layers}): sp-samp decodes one-layer EAGLE-3 heads; train one with num_layers=1")
    if config.get("norm_before_fc"):  # speculators' gpt-oss variant: an RMSNorm over the 3H input before fc
        raise MalformedInputError(f"{directory}/config.json sets norm_before_fc=true (speculators' gpt-oss variant), "
                                  "which sp-samp does not decode: use a head trained without it")
    layer = _AttrDict(layer)
    nested = config.get("eagle_config") if isinstance(config.get("eagle_config"), dict) else {}
    ids = config.get("eagle_aux_hidden_state_layer_ids") or nested.get("eagle_aux_hidden_state_layer_ids")
    aux = tuple(ids) if ids else default_aux_layers(target_config.num_hidden_layers)
    try:
        return Eagle3Config(
            hidden_size=layer.hidden_size, intermediate_size=layer.intermediate_size,
            num_attention_heads=layer.num_attention_heads, num_key_value_heads=layer.num_key_value_heads,
            head_dim=layer.head_dim, target_hidden_size=config.get("target_hidden_size") or layer.hidden_size,
            vocab_size=layer.vocab_size or target_config.vocab_size,
            draft_vocab_size=config.get("draft_vocab_size") or layer.vocab_size or target_config.vocab_size,
            aux_layers=aux, rms_norm_eps=layer.rms_norm_eps or 1e-6, hidden_act=layer.hidden_act or "silu",
            max_position_embeddings=layer.max_position_embeddings or 2048,
            rope_parameters=rope_parameters(layer), norm_before_residual=bool(config.get("norm_before_residual", False)),
            fc_bias=bool(config.get("bias", False)),
        )
    except (TypeError, ValueError) as error:
        raise MalformedInputError(f"{directory}/config.json: {_one_line(error)}") from None


def check_verifier(config: dict[str, Any], target_identity: dict[str, Any] | None, directory: Path) -> None:
    """A speculators head names its verifier: refuse it for another target (by name; a local copy of the same
    hub model passes when its folder name ends with the hub name)."""
    verifier = (config.get("speculators_config") or {}).get("verifier") or {}
    named = verifier.get("name_or_path")
    ours = (target_identity or {}).get("name")
    if not named or not ours:
        return
    if _same_model(str(named), str(ours)):
        return
    raise IncompatibleModelsError(f"head {directory} was trained for verifier {named!r} but this run's target is "
                                  f"{ours!r}: use a head made for this target, or train one (configs/eagle.yaml)")


def _same_model(a: str, b: str) -> bool:
    """Same hub id, or a local folder named like the hub model (``/models/Llama-3.1-8B-Instruct``)."""
    return a.rstrip("/").split("/")[-1] == b.rstrip("/").split("/")[-1]


def load_eagle3(
    directory: Path, config: dict[str, Any], layout: str, target_config: Any, target_identity: dict[str, Any] | None
) -> Eagle3Head:
    """An EAGLE-3 head of any of the three published layouts, checked against the target before any decoding."""
    head_config = eagle3_config(config, layout, target_config, directory)
    head_config.check_target(target_config, f"EAGLE-3 head {directory}")
    if layout == "speculators":
        check_verifier(config, target_identity, directory)
    metadata = _read_metadata(directory)
    check_identity(metadata.get("target"), target_identity, directory)
    weights = _eagle_weights_file(directory)
    state = normalise_eagle3_keys(_read_eagle_state(weights))
    d2t, t2d = state.get("d2t"), state.get("t2d")
    if d2t is None and head_config.draft_vocab_size != head_config.vocab_size:
        raise MalformedInputError(f"{weights} lacks d2t but the head drafts over {head_config.draft_vocab_size} of "
                                  f"{head_config.vocab_size} ids: download the head again")
    draft_ids = None if d2t is None else check_vocab_maps(d2t, t2d, target_config.vocab_size, str(weights))
    own_embedding = "embed_tokens.weight" in state
    head = Eagle3Head(head_config, draft_ids=draft_ids, own_embedding=own_embedding)
    state.pop("d2t", None), state.pop("t2d", None)
    state.update({"d2t": head.d2t, "t2d": head.t2d})
    _load_state(head, state, weights)
    head.metadata = metadata
    return head


def normalise_eagle3_keys(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """speculators' ``layers.0.*`` and any ``model.`` prefix -> the EAGLE repository's ``midlayer.*`` names;
    recomputed RoPE buffers dropped."""
    state = {}
    for name, tensor in raw.items():
        name = name.removeprefix("model.")
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name.startswith("layers.0."):
            name = "midlayer." + name.removeprefix("layers.0.")
        state[name] = tensor
    return state


def _load_state(head: Eagle3Head, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = head.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        problems = ([f"lacks {_few(missing)}"] if missing else []) + ([f"has unknown {_few(unexpected)}"] if unexpected else [])
        raise MalformedInputError(f"{source} does not match the EAGLE-3 head layout ({'; '.join(problems)}): "
                                  "download or export it again")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise IncompatibleModelsError(f"{source}: {name} has shape {tuple(tensor.shape)} but its config.json "
                                          f"needs {tuple(expected[name].shape)}: the head's files do not belong together")
    head.load_state_dict(state)


def _read_metadata(directory: Path) -> dict[str, Any]:
    path = directory / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MalformedInputError(f"{path} is not JSON ({_one_line(error)}): export the head again") from None
    return metadata if isinstance(metadata, dict) else {}


# ---------------------------------------------------------------- speculators export


def speculators_config(head: Eagle3Head, verifier_name: str, verifier_config: Any) -> dict[str, Any]:
    """``config.json`` of a speculators eagle3 folder for ``head`` drafting for ``verifier_name``."""
    config = head.config
    layer = config.layer_config().to_dict()
    for key in ("transformers_version", "_attn_implementation_autoset", "architectures"):
        layer.pop(key, None)
    layer["architectures"] = ["LlamaForCausalLM"]
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3, "verifier_accept_k": 1,
                                  "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier_name,
                         "architectures": list(getattr(verifier_config, "architectures", None) or [])},
        },
        "transformer_layer_config": layer,
        "draft_vocab_size": config.draft_vocab_size,
        "norm_before_residual": config.norm_before_residual,
        "target_hidden_size": config.target_hidden_size,
        "eagle_aux_hidden_state_layer_ids": list(config.aux_layers),
        "torch_dtype": str(head.fc.weight.dtype).removeprefix("torch."),
    }


def save_speculators(
    head: Eagle3Head, directory: str | Path, target_identity: dict[str, Any], target_config: Any,
    metadata: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``directory/config.json`` + ``model.safetensors`` (speculators' key names: ``layers.0.*``,
    ``embed_tokens``, ``fc``, ``norm``, ``lm_head``, ``d2t``, ``t2d``) and our metadata beside them."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = speculators_config(head, str(target_identity.get("name")), target_config)
    try:
        meta_text = json.dumps({"target": target_identity, **(metadata or {})}, indent=2) + "\n"
    except (TypeError, ValueError) as error:
        raise MalformedInputError(f"head metadata is not JSON-serializable ({error}): pass plain values") from None
    state = {}
    for name, tensor in head.state_dict().items():
        if name.startswith("midlayer."):
            name = "layers.0." + name.removeprefix("midlayer.")
        state[name] = tensor.detach().cpu().contiguous()
    weights = directory / "model.safetensors"
    save_file(state, str(weights), metadata={"format": "pt"})
    config_path = directory / "config.json"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (directory / METADATA_FILE).write_text(meta_text, encoding="utf-8")
    head.metadata = dict(metadata or {})
    return weights, config_path
