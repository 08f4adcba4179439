"""One code path that turns a :class:`ModelSpec` into a ready model and tokenizer, for every method."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from src.errors import InvalidParameterError, MissingInputError
from src.models.embedded import ensure_converted, is_embedded
from src.models.gguf import clear_gguf_quantized_flag, unsupported_gguf
from src.models.quantize import (
    TORCH_INT8,
    TORCHAO_QUANTIZATIONS,
    import_bitsandbytes,
    import_torchao,
    pack_int8_weights,
    quantize_weights,
    quiet_loggers,
)
from src.models.spec import ModelSpec

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# huggingface_hub logs two lines per retry of an unreachable hub (22 for one model) before transformers raises the
# error that load_tokenizer / load_model turn into one line: kept out while loading.
HUB_RETRY_LOGGERS = ("huggingface_hub.utils._http",)
# Files one of which a tokenizer needs (fast, sentencepiece, BPE or WordPiece vocabulary); tokenizer_config.json
# alone is not enough.
TOKENIZER_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                              "vocab.json", "vocab.txt", "tiktoken.model")


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers tokenizer
    spec: ModelSpec
    info: dict[str, Any] = field(default_factory=dict)  # resolved name, dtype, device, quantization


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_source(spec: ModelSpec) -> tuple[str, str | None]:
    """(folder or hub id to load from, gguf file name or None); validates local paths."""
    if is_embedded(spec.name_or_path):
        return str(ensure_converted(spec.name_or_path)), None
    path = Path(spec.name_or_path).expanduser()
    if path.exists():
        if spec.gguf_file and not (path / spec.gguf_file).is_file():
            raise MissingInputError(
                f"gguf_file {spec.gguf_file!r} is not in {path}: files there are "
                f"{sorted(p.name for p in path.iterdir())}"
            )
        return str(path), spec.gguf_file
    if spec.name_or_path.startswith(("/", "./", "../", "~")) or not _is_hub_id(spec.name_or_path):
        parent = path.parent if path.parent.exists() else Path(".")
        present = sorted(p.name for p in parent.iterdir())[:20]
        raise MissingInputError(
            f"model path {spec.name_or_path!r} does not exist and is not a hub id (owner/name); "
            f"{parent} holds {present}; the embedded model is 'embedded:smollm2-135m-instruct'"
        )
    return spec.name_or_path, spec.gguf_file


def check_device(spec: ModelSpec) -> None:
    """Refuse a device this machine lacks before anything loads (transformers fails deep in its loader, with a
    60-line traceback, after the tokenizer and the checkpoint are read)."""
    if spec.device is None or spec.device_map is not None:  # a device map names its own devices
        return
    try:
        device = torch.device(spec.device)
    except RuntimeError as error:
        raise InvalidParameterError(
            f"device {spec.device!r} of {spec.name_or_path!r} is not a device ({str(error).splitlines()[0]}): "
            "use cpu, cuda or cuda:N") from error
    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        why = "torch is built without CUDA" if torch.version.cuda is None else "torch sees no CUDA GPU"
        raise InvalidParameterError(
            f"device {spec.device!r} of {spec.name_or_path!r}: this machine has no GPU ({why}): use device cpu, "
            "or leave device unset (cuda when available, else cpu)")
    if device.index is not None and device.index >= count:
        raise InvalidParameterError(
            f"device {spec.device!r} of {spec.name_or_path!r}: this machine has {count} GPU(s) "
            f"(cuda:0..cuda:{count - 1}): use one of them")


def _missing_tokenizer(folder: Path) -> MissingInputError | None:
    """The one-line error for a local folder without tokenizer files (None when it has some)."""
    if not folder.is_dir() or any((folder / name).is_file() for name in TOKENIZER_VOCABULARY_FILES):
        return None
    present = sorted(p.name for p in folder.iterdir())[:20]
    return MissingInputError(
        f"model folder {folder} has no tokenizer: none of {', '.join(TOKENIZER_VOCABULARY_FILES)} is there (it "
        f"holds {present}): copy the tokenizer files of the model it was saved from into it, or set the model's "
        "tokenizer: to a folder or hub id that has them")


def _load_tokenizer(source: str, gguf_file: str | None, spec: ModelSpec):
    from transformers import AutoTokenizer

    if spec.tokenizer:
        return AutoTokenizer.from_pretrained(spec.tokenizer, trust_remote_code=spec.trust_remote_code)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(
        source, revision=spec.revision, trust_remote_code=spec.trust_remote_code, **kwargs
    )


def load_tokenizer(spec: ModelSpec):
    """The tokenizer alone (cheap): lets the tokenizer guard run before any weights load."""
    check_device(spec)
    source, gguf_file = resolve_source(spec)
    try:
        with quiet_loggers(HUB_RETRY_LOGGERS):
            return _load_tokenizer(source, gguf_file, spec)
    except (OSError, ValueError, TypeError) as error:
        # a local folder without tokenizer files fails in transformers with one of these, naming neither
        missing = None if gguf_file else _missing_tokenizer(Path(spec.tokenizer or source).expanduser())
        if missing is not None:
            raise missing from error
        if isinstance(error, OSError):  # transformers' "not found on the hub / not cached / no connection"
            raise _unreachable(spec, error) from error
        raise


def _unreachable(spec: ModelSpec, error: OSError) -> MissingInputError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    name = spec.tokenizer or spec.name_or_path
    return MissingInputError(
        f"cannot load {name!r} ({first}): check the name and revision, or download it first "
        f"(`hf download {name}`) and run offline with HF_HUB_OFFLINE=1"
    )


def _quantization_config(spec: ModelSpec):
    """transformers' quantization config for bitsandbytes; None otherwise (torchao quantizes after loading)."""
    if not spec.quantization.startswith("bnb-"):
        return None
    from transformers import BitsAndBytesConfig

    if spec.quantization == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=TORCH_DTYPES[spec.bnb_compute_dtype],
    )


def _make_resident(model) -> None:
    """Copy memory-mapped CPU weights into ordinary memory.

    safetensors loads are memory-mapped; under memory pressure the OS pages such weights out and a
    generation was seen taking 122 s instead of 5 s. Plain ``Parameter``s only: quantized parameter
    classes (bitsandbytes) were created in memory already.
    """
    for module in model.modules():
        for param in list(module._parameters.values()):
            if param is not None and type(param) is torch.nn.Parameter and param.device.type == "cpu":
                param.data = param.data.clone()
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type == "cpu":
                module._buffers[name] = buffer.clone()


def _device_description(model, first_device) -> str:
    """A model spread by a device map reports the map (module -> device); a model on one device, its name."""
    device_map = getattr(model, "hf_device_map", None) or {}
    devices = {str(d) for d in device_map.values()}
    return str(device_map) if len(devices) > 1 else str(first_device)


def _dtype_name(model) -> str:
    """The compute dtype: the embeddings' (torchao's quantized weights report their own dtype, not int8)."""
    return str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")


def load_model(spec: ModelSpec, tokenizer=None) -> LoadedModel:
    """Load weights + tokenizer as ``spec`` says; the model comes back in eval mode without gradients."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor bars drown the run's own progress bar
    if spec.quantization == "auto":
        raise InvalidParameterError(
            f"quantization 'auto' of {spec.name_or_path!r} is chosen by predict's run start (a draft only): "
            "give a fixed quantization here (none, bnb-8bit, bnb-4bit, torchao-int8, torchao-int4)")
    check_device(spec)
    import_torchao()  # transformers imports it when installed; first here, without its import-time log lines
    if spec.quantization.startswith("bnb-"):
        import_bitsandbytes()  # before transformers' quantizer imports it, with its log line

    source, gguf_file = resolve_source(spec)
    if tokenizer is None:
        tokenizer = load_tokenizer(spec)
    device = spec.device or default_device()
    if device == "cuda" and torch.cuda.is_available():
        # Under DDP Lightning has made each rank's own GPU current before ``setup`` loads the models: bind to it.
        device = f"cuda:{torch.cuda.current_device()}"
    kwargs: dict[str, Any] = {
        "dtype": "auto" if spec.dtype == "auto" else TORCH_DTYPES[spec.dtype],
        "revision": spec.revision,
        "trust_remote_code": spec.trust_remote_code,
    }
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    quantization_config = _quantization_config(spec)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if spec.device_map is not None:
        kwargs["device_map"] = spec.device_map
    elif quantization_config is not None or device != "cpu":
        kwargs["device_map"] = {"": device}
    try:
        with quiet_loggers(HUB_RETRY_LOGGERS):
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (ValueError, KeyError, NotImplementedError) as error:
        if gguf_file:
            raise unsupported_gguf(error, f"{gguf_file} in {source}") from error
        raise
    except OSError as error:
        raise _unreachable(spec, error) from error
    if gguf_file:
        clear_gguf_quantized_flag(model)
    model.eval().requires_grad_(False)
    _make_resident(model)
    if spec.quantization in TORCHAO_QUANTIZATIONS:  # after the copy: torchao's tensors are built in memory
        quantize_weights(model, spec.quantization, spec.int4_group_size)
    elif spec.quantization == TORCH_INT8:
        pack_int8_weights(model)
    first = next(model.parameters())
    info = {
        "name": spec.name_or_path,
        "source": source,
        "dtype": spec.bnb_compute_dtype if spec.quantization.startswith("bnb-") else _dtype_name(model),
        "device": _device_description(model, first.device),
        "quantization": spec.quantization
        + (f"-{spec.bnb_4bit_quant_type}" if spec.quantization == "bnb-4bit" else ""),
    }
    log.info("loaded %s", info)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, info=info)
