"""GGUF helpers shared by the loader and the embedded-model conversion.

Kept apart from :mod:`src.models.loading` so :mod:`src.models.embedded` can dequantize its GGUF without
importing the loader, which itself imports the embedded module to resolve ``embedded:`` names.
"""

from __future__ import annotations

from pathlib import Path

import torch

from src.errors import InvalidParameterError


def clear_gguf_quantized_flag(model) -> None:
    """A GGUF-loaded model is flagged as quantized (refusing save_pretrained) although its weights are plain."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def unsupported_gguf(error: Exception, where: str) -> Exception:
    return InvalidParameterError(f"transformers cannot load the GGUF {where}: {error} (convert it to safetensors first)")


def load_gguf_unquantized(folder: Path | str, gguf_file: str, dtype: torch.dtype = torch.float32):
    """Dequantize a GGUF into a plain transformers model (+ its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype)
    except (ValueError, KeyError, NotImplementedError) as error:
        raise unsupported_gguf(error, f"{Path(folder) / gguf_file}") from error
    clear_gguf_quantized_flag(model)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    return model, tokenizer
