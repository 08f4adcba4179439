"""Weight-only quantization through torchao: a model's linear layers keep int8 or int4 weights and compute in
the model's dtype (weights are dequantized per call or by an int4 kernel; activations are never quantized, so
SmolLM2-like activation outliers do not hurt the way torch.ao's dynamic int8 does).

``torchao-int8``: per-output-channel symmetric int8 (``Int8WeightOnlyConfig``), on CPU and CUDA.
``torchao-int4``: grouped int4; ``Int4WeightOnlyConfig`` on CUDA, the CPU packing of torchao's prototype
(``PrototypeInt4WeightOnlyConfig``, the ``_weight_int4pack_mm_for_cpu`` kernel) on CPU.

How fast each is depends on the machine, not only on the bits: torchao 0.18's eager int8 path converts the int8
weight to the activation dtype on every call, which on a 2-core CPU costs more than a bf16 matmul. The automatic
draft choice (``quantization: auto``, :mod:`src.lit.auto`) measures instead of assuming.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from src.errors import InvalidParameterError, MissingInputError

TORCHAO_QUANTIZATIONS = ("torchao-int8", "torchao-int4")
# torchao's import logs one "Failed to load <kernel>.so" per optional CUDA kernel library: library noise a user
# cannot act on, kept out of quiet runs.
NOISY_IMPORT_LOGGERS = ("torchao",)
# torch's pytree logs a deprecation warning for every enum torchao registers, also from modules that transformers
# imports later (its torchao quantizer): that logger is kept at ERROR for the process (it logs nothing else).
PYTREE_LOGGER = "torch.utils._pytree"


@contextlib.contextmanager
def quiet_loggers(names: tuple[str, ...]):
    """Loggers ``names`` at ERROR inside the block: a library's warnings a user cannot act on stay out."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def import_torchao():
    """torchao, imported once without its import-time log lines; None when it is not installed."""
    logging.getLogger(PYTREE_LOGGER).setLevel(logging.ERROR)
    try:
        with quiet_loggers(NOISY_IMPORT_LOGGERS):
            import torchao.quantization
    except ImportError:
        return None
    return torchao


def import_bitsandbytes() -> None:
    """bitsandbytes, imported once before transformers' quantizer does, without its import-time log line (a CPU
    kernel it cannot find, "pip install kernels": library noise a user cannot act on)."""
    with quiet_loggers(("bitsandbytes",)):
        import bitsandbytes  # noqa: F401 - the import is the point: later imports find it loaded


def torchao_config(quantization: str, device_type: str, int4_group_size: int):
    """The torchao config object of one of :data:`TORCHAO_QUANTIZATIONS` for a model on ``device_type``."""
    torchao = import_torchao()
    if torchao is None:
        raise MissingInputError(f"quantization {quantization!r} needs torchao: pip install torchao==0.18.0")
    if quantization == "torchao-int8":
        return torchao.quantization.Int8WeightOnlyConfig()
    if device_type == "cuda":
        return torchao.quantization.Int4WeightOnlyConfig(group_size=int4_group_size)
    with quiet_loggers(NOISY_IMPORT_LOGGERS):
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    return PrototypeInt4WeightOnlyConfig(group_size=int4_group_size)


def quantize_weights(model, quantization: str, int4_group_size: int = 32) -> None:
    """Quantize ``model``'s linear layers in place (embeddings stay as they are: torchao's default filter)."""
    device_type = next(model.parameters()).device.type
    if quantization == "torchao-int4":
        too_narrow = sorted({m.in_features for m in model.modules()
                             if isinstance(m, torch.nn.Linear) and m.in_features % int4_group_size})
        if too_narrow:
            raise InvalidParameterError(
                f"int4_group_size={int4_group_size} does not divide the input width of linear layers {too_narrow}: "
                "use a group size that divides every width (32 or 64 for most models)")
    config = torchao_config(quantization, device_type, int4_group_size)
    from torchao.quantization import quantize_

    with quiet_loggers(NOISY_IMPORT_LOGGERS):
        quantize_(model, config)


# ---------------------------------------------------------------- torch's own int8 weight-only kernel
# Hand-written rather than torchao: torchao 0.18's eager Int8Tensor converts the whole int8 weight to the
# activation dtype on every call, while torch ships a fused CPU kernel, ``torch._weight_int8pack_mm`` (int8
# weights, per-output-channel scales, bf16 / fp32 activations), that no torchao config uses. On an Intel Xeon
# with AMX it ran a SmolLM2 copy at 22 ms per 1-token forward against 32.7 ms for fp32 (greedy agreement 0.972);
# on this project's 2-core AMD EPYC it ran at 17.7 ms (bf16: 37.5 ms; agreement 0.963): `quantization: auto` measures.
TORCH_INT8 = "torch-int8"


class Int8PackedLinear(torch.nn.Module):
    """A linear layer with int8 weights (per-output-channel symmetric scales), computing in ``dtype``."""

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,): the largest weight maps to 127
        self.register_buffer("qweight", torch.round(weight / scale[:, None]).clamp(-128, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.scale.dtype)
        y = torch._weight_int8pack_mm(flat, self.qweight, self.scale).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def pack_int8_weights(model) -> None:
    """Replace every ``nn.Linear`` of ``model`` (CPU) by an :class:`Int8PackedLinear` in the model's dtype."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise InvalidParameterError(f"quantization {TORCH_INT8!r} is a CPU kernel, but the model is on {device}: "
                                    "use torchao-int8 or torchao-int4 on a GPU")
    dtype = model.get_input_embeddings().weight.dtype
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, Int8PackedLinear(child, dtype))
