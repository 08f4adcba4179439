"""torchao weight-only quantization as a model-spec option, and the self-draft (``draft: {name_or_path: target}``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_models import save_tiny_checkpoint

from src.decoding import Baseline, SpeculativeSampling
from src.decoding.sampling import SamplingConfig
from src.errors import InvalidParameterError
from src.models import ModelSpec, load_model, load_pair
from src.models.quantize import import_torchao

pytestmark = pytest.mark.skipif(import_torchao() is None, reason="torchao is not installed (make setup installs it)")


@pytest.fixture
def tiny_model_dir(tmp_path):
    return save_tiny_checkpoint(tmp_path)


def linear_weight_types(model) -> set[str]:
    return {type(m.weight).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize(("quantization", "tensor"), [("torchao-int8", "Int8Tensor"),
                                                      ("torchao-int4", "Int4OpaqueTensor")])
def test_torchao_weight_only_quantizes_every_linear_layer_and_keeps_the_compute_dtype(tiny_model_dir, quantization,
                                                                                       tensor):
    loaded = load_model(ModelSpec(str(tiny_model_dir), dtype="bfloat16", device="cpu", quantization=quantization))
    assert linear_weight_types(loaded.model) == {tensor}
    assert loaded.info["quantization"] == quantization and loaded.info["dtype"] == "bfloat16"
    full = load_model(ModelSpec(str(tiny_model_dir), dtype="bfloat16", device="cpu"))
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    quantized, reference = loaded.model(ids).logits.float(), full.model(ids).logits.float()
    assert not torch.equal(quantized, reference)  # the weights really changed ...
    assert torch.allclose(quantized, reference, atol=0.05 if quantization == "torchao-int8" else 0.5)  # ... a little


def test_a_self_draft_names_the_targets_checkpoint_and_stays_lossless(tiny_model_dir):
    target = ModelSpec(str(tiny_model_dir), device="cpu")
    draft = ModelSpec("target", dtype="bfloat16", quantization="torchao-int8")
    resolved = draft.resolved_against(target)
    assert resolved.name_or_path == str(tiny_model_dir) and resolved.quantization == "torchao-int8"
    assert resolved.identity()["name_or_path"] == str(tiny_model_dir)
    pair = load_pair(target, draft)
    assert pair.draft.info["name"] == str(tiny_model_dir) and pair.draft.info["quantization"] == "torchao-int8"
    ids = torch.tensor([[1, 7, 3, 11]])
    greedy = SamplingConfig()
    expected = Baseline().generate(pair.target.model, None, ids, 24, greedy, set(), None).tokens
    got = SpeculativeSampling(k=3).generate(pair.target.model, pair.draft.model, ids, 24, greedy, set(), None).tokens
    assert got == expected


def test_int4_group_size_that_does_not_divide_a_width_is_one_line(tiny_model_dir):
    with pytest.raises(InvalidParameterError, match=r"int4_group_size=48 does not divide .*\[32, 64\]"):
        load_model(ModelSpec(str(tiny_model_dir), device="cpu", quantization="torchao-int4", int4_group_size=48))


def test_auto_is_resolved_by_predict_not_by_the_loader(tiny_model_dir):
    with pytest.raises(InvalidParameterError, match="quantization 'auto' .* chosen by predict"):
        load_model(ModelSpec(str(tiny_model_dir), device="cpu", quantization="auto"))


def test_the_torchao_int4_fingerprint_holds_its_group_size_and_bnb_fields_stay_where_they_were():
    assert ModelSpec(quantization="torchao-int4", int4_group_size=64).identity()["int4_group_size"] == 64
    assert "bnb_compute_dtype" not in ModelSpec(quantization="torchao-int8").identity()
    assert ModelSpec(quantization="bnb-8bit").identity()["bnb_compute_dtype"] == "float32"
    assert "int4_group_size" not in ModelSpec().identity()


def test_importing_torchao_prints_nothing_in_a_fresh_interpreter():
    """torchao logs one "Failed to load" line per optional kernel library and torch's pytree a warning per enum."""
    code = "from src.models.quantize import import_torchao; import_torchao(); import torchao.prototype.mx_formats"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stderr[-2000:]


def test_torch_int8_packs_every_linear_layer_and_stays_close(tiny_model_dir):
    from src.models.quantize import Int8PackedLinear

    packed = load_model(ModelSpec(str(tiny_model_dir), dtype="bfloat16", device="cpu", quantization="torch-int8"))
    linears = [m for m in packed.model.modules() if isinstance(m, (torch.nn.Linear, Int8PackedLinear))]
    assert linears and all(isinstance(m, Int8PackedLinear) for m in linears)
    assert packed.info["quantization"] == "torch-int8" and packed.info["dtype"] == "bfloat16"
    full = load_model(ModelSpec(str(tiny_model_dir), dtype="bfloat16", device="cpu"))
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    got, reference = packed.model(ids).logits.float(), full.model(ids).logits.float()
    assert not torch.equal(got, reference) and torch.allclose(got, reference, atol=0.05)
