"""The EAGLE-1/2 draft head (src/models/eagle.py) on a tiny random Llama target.

- the forward is fc over [embedding; feature] then one Llama layer with its input norm skipped, checked
  against a reference written out by hand (RoPE, GQA, causal softmax, MLP);
- feeding positions through a cache (one at a time, 3 then 2) gives the full-sequence features; a given 4D
  mask is used as is;
- logits over top_token_ids are the full logits at those ids (the lm_head rows are cut once);
- save / load round-trips weights and metadata and refuses a missing, corrupt or foreign head, in one line;
- heads in the EAGLE repository's layout (.bin or safetensors) import exactly, bad ones are refused;
- the head trains (its parameters are fc + the layer only).
"""

from __future__ import annotations

import copy
import json
import math
import pickle

import pytest
import torch
from conftest import build_tiny_llama
from safetensors.torch import save_file
from torch.nn import functional as F
from transformers import DynamicCache, Qwen2Config

from src.decoding.kv import new_cache
from src.errors import (
    IncompatibleModelsError,
    InvalidParameterError,
    MalformedInputError,
    MissingInputError,
    UserInputError,
)
from src.models.eagle import EagleHead, causal_mask, load_eagle_checkpoint
from src.models.eagle_formats import load_head

B, T, H, V = 2, 5, 64, 128


@pytest.fixture(scope="module")
def target():
    return build_tiny_llama(seed=0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny ops are faster on one intra-op thread."""


def make_head(config, seed: int = 0, **kwargs) -> EagleHead:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = EagleHead(config, **kwargs).eval()
        with torch.no_grad():  # fc bias and norm weights start at 0 / 1: make every weight matter
            for param in head.parameters():
                param.add_(0.05 * torch.randn_like(param))
    return head


def inputs(seed: int = 1, batch: int = B, length: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, H, generator=generator), torch.randn(batch, length, H, generator=generator)


def eagle_state(head: EagleHead, vocab_size: int = V, seed: int = 3) -> dict[str, torch.Tensor]:
    """The head's weights under the EAGLE repository's key names, with the skipped norm and embedding copy."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in head.state_dict().items():
        state[name.replace("layer.", "layers.0.", 1) if name.startswith("layer.") else name] = tensor.clone()
    state["layers.0.input_layernorm.weight"] = 1 + torch.rand(H, generator=generator)  # would change outputs
    state["embed_tokens.weight"] = torch.randn(vocab_size, H, generator=generator)
    return state


def reference(state: dict[str, torch.Tensor], config, features: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """EAGLE-1 by hand from EAGLE-named weights: fc([emb; feat]), attention (no input norm), MLP."""
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, H // config.num_attention_heads
    w = {k.removeprefix("layers.0."): v for k, v in state.items()}
    h = F.linear(torch.cat((emb, features), -1), w["fc.weight"], w.get("fc.bias"))
    batch, length, _ = h.shape

    def split(x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(batch, length, n, dim).transpose(1, 2)  # (B, n, T, dim)

    q = split(h @ w["self_attn.q_proj.weight"].T, heads)
    k = split(h @ w["self_attn.k_proj.weight"].T, kv_heads)
    v = split(h @ w["self_attn.v_proj.weight"].T, kv_heads)
    inv_freq = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.arange(length).float()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    q, k = rotate(q), rotate(k)
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim)
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, heads * dim)
    h = h + attn @ w["self_attn.o_proj.weight"].T
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * w["post_attention_layernorm.weight"]
    mlp = (F.silu(normed @ w["mlp.gate_proj.weight"].T) * (normed @ w["mlp.up_proj.weight"].T)) @ w["mlp.down_proj.weight"].T
    return h + mlp


def assert_one_line(error: pytest.ExceptionInfo, names: str) -> None:
    text = str(error.value)
    assert "\n" not in text and names in text, text


# ---------------------------------------------------------------- forward


def test_shapes_and_hand_written_reference(target):
    head = make_head(target.config)
    features, emb = inputs()
    with torch.no_grad():
        out = head(features, emb)
        logits = head.logits(out, target.lm_head.weight)
        expected = reference(eagle_state(head), target.config, features, emb)
    assert out.shape == (B, T, H) and logits.shape == (B, T, V)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(head.vocab_ids(), torch.arange(V))


def test_rope_frequencies_stay_float32_under_a_dtype_change(target):
    head = make_head(target.config)
    inv_freq = head.rotary.inv_freq.clone()
    head.to(torch.bfloat16)
    assert head.fc.weight.dtype == torch.bfloat16 and head.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(head.rotary.inv_freq, inv_freq)
    with torch.no_grad():
        assert head(*(x.bfloat16() for x in inputs())).dtype == torch.bfloat16


def test_other_config_families_build():
    config = Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=96, num_attention_heads=4,
                         num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=256)
    head = make_head(config)
    assert head.config.rope_parameters["rope_theta"] == 1e6 and head.config.head_dim == 16
    with torch.no_grad():
        assert head(*inputs()).shape == (B, T, H)


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1], [3, 2]])
@pytest.mark.parametrize("make_cache", [DynamicCache, new_cache])
def test_cache_gives_the_full_sequence_features(target, chunks, make_cache):
    head = make_head(target.config)
    features, emb = inputs()
    cache = make_cache()
    with torch.no_grad():
        full = head(features, emb)
        parts, start = [], 0
        for size in chunks:
            parts.append(head(features[:, start:start + size], emb[:, start:start + size], cache=cache))
            start += size
    assert cache.get_seq_length(0) == T
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_default_mask_sees_the_cache_and_is_causal_over_new_positions():
    mask = causal_mask(1, 2, 3, "cpu")
    assert mask.shape == (1, 1, 2, 5)
    assert mask[0, 0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_given_mask_is_honored(target):
    head = make_head(target.config)
    features, emb = inputs()
    chain = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T)
    hidden = chain.clone()
    hidden[:, :, 3, 1] = False  # position 3 no longer sees position 1 (as in a tree, another branch)
    additive = torch.zeros(B, 1, T, T).masked_fill(~chain, torch.finfo(torch.float32).min)
    with torch.no_grad():
        default = head(features, emb)
        out_chain = head(features, emb, attention_mask=chain)
        out_additive = head(features, emb, attention_mask=additive)
        out_hidden = head(features, emb, attention_mask=hidden)
    torch.testing.assert_close(out_chain, default)
    torch.testing.assert_close(out_additive, default)
    assert not torch.allclose(out_hidden[:, 3], default[:, 3])
    torch.testing.assert_close(out_hidden[:, :3], default[:, :3])


# ---------------------------------------------------------------- logits over a vocabulary subset


def test_top_token_logits_are_the_full_logits_at_those_ids(target):
    ids = torch.tensor([0, 5, 17, 64, 127])
    head = make_head(target.config, top_token_ids=ids)
    weight = target.lm_head.weight.detach().clone()
    bias = torch.randn(V)
    features, emb = inputs()
    with torch.no_grad():
        out = head(features, emb)
        full = F.linear(out, weight, bias)
        sub = head.logits(out, weight, bias)
        rows = head._rows[0]
        again = head.logits(out, weight, bias)
    assert sub.shape == (B, T, 5) and torch.equal(head.vocab_ids(), ids)
    torch.testing.assert_close(sub, full[..., ids])
    assert head._rows[0] is rows  # cut once
    torch.testing.assert_close(again, sub)
    with torch.no_grad():
        weight.mul_(2)  # an in-place change of the lm_head is seen
        torch.testing.assert_close(head.logits(out, weight, bias), F.linear(out, weight, bias)[..., ids])
    with torch.inference_mode():
        head.logits(out, weight, bias)
    trainable = out.clone().requires_grad_()  # rows cut under inference mode are not reused by autograd
    head.logits(trainable, weight, bias).sum().backward()
    assert trainable.grad is not None
    copy.deepcopy(head)
    assert pickle.loads(pickle.dumps(head))._rows is None  # the cached cut (weak references) is not pickled


def test_top_tokens_are_checked(target):
    with pytest.raises(InvalidParameterError) as error:
        EagleHead(target.config, top_token_ids=torch.arange(V + 1))
    assert_one_line(error, str(V + 1))
    assert str(V) in str(error.value)
    with pytest.raises(InvalidParameterError):
        EagleHead(target.config, top_token_ids=torch.tensor([3, 1]))
    with pytest.raises(InvalidParameterError):
        EagleHead(target.config, top_token_ids=torch.tensor([1, V]))


# ---------------------------------------------------------------- save / load

IDENTITY = {"name": "tiny-llama", "dtype": "float32", "revision": "abc"}


def saved_head(target, tmp_path):
    head = make_head(target.config, top_token_ids=torch.tensor([1, 2, 3, 50, 90]))
    metadata = {"target": IDENTITY, "data": "sharegpt 1k", "metrics": {"top1": 0.5}}
    head.save(tmp_path / "eagle", metadata)
    return head, metadata


def test_save_load_round_trip(target, tmp_path):
    head, metadata = saved_head(target, tmp_path)
    loaded = EagleHead.load(tmp_path / "eagle", target.config, target_identity=dict(IDENTITY))
    features, emb = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(features, emb), head(features, emb), atol=0, rtol=0)
    assert loaded.metadata == metadata and torch.equal(loaded.top_token_ids, head.top_token_ids)
    via_dispatch = load_head(tmp_path / "eagle", target.config, IDENTITY)
    assert torch.equal(via_dispatch.fc.weight, head.fc.weight)
    description = json.loads((tmp_path / "eagle.json").read_text())
    assert description["top_tokens"] == 5 and description["fc_bias"] is True
    assert description["config"]["hidden_size"] == H


def test_load_refuses_another_target(target, tmp_path):
    saved_head(target, tmp_path)
    with pytest.raises(IncompatibleModelsError) as error:
        EagleHead.load(tmp_path / "eagle", target.config, target_identity={**IDENTITY, "dtype": "bfloat16"})
    assert_one_line(error, "eagle.safetensors")
    assert "bfloat16" in str(error.value) and "float32" in str(error.value)
    other = build_tiny_llama(seed=0, vocab_size=256).config
    with pytest.raises(IncompatibleModelsError) as error:
        EagleHead.load(tmp_path / "eagle", other, target_identity=IDENTITY)
    assert_one_line(error, "vocab_size=128")


def test_load_refuses_missing_and_corrupt_files(target, tmp_path):
    with pytest.raises(MissingInputError) as error:
        EagleHead.load(tmp_path / "nothing", target.config)
    assert_one_line(error, "nothing.safetensors")
    assert "configs/eagle1.yaml" in str(error.value)
    saved_head(target, tmp_path)
    weights = tmp_path / "eagle.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(MalformedInputError) as error:
        EagleHead.load(tmp_path / "eagle", target.config)
    assert_one_line(error, str(weights))
    top = torch.tensor([1, 2, 3, 50, 90])
    save_file({"fc.weight": torch.zeros(H, 2 * H), "top_token_ids": top}, str(weights))  # readable, tensors missing
    with pytest.raises(UserInputError) as error:
        EagleHead.load(tmp_path / "eagle", target.config)
    assert_one_line(error, str(weights))
    assert "lacks fc.bias" in str(error.value)


def test_load_refuses_top_tokens_above_the_vocabulary(target, tmp_path):
    saved_head(target, tmp_path)
    meta = tmp_path / "eagle.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "top_tokens": 1000}))
    with pytest.raises(InvalidParameterError) as error:
        EagleHead.load(tmp_path / "eagle", target.config)
    assert_one_line(error, "top_tokens=1000")
    assert str(V) in str(error.value)


# ---------------------------------------------------------------- EAGLE repository layout


def write_eagle_folder(folder, config, state, kind: str, bias: bool | None = True):
    folder.mkdir()
    description = {**json.loads(config.to_json_string()), "num_hidden_layers": 1, "architectures": ["LlamaForCausalLM"]}
    if bias is not None:
        description["bias"] = bias
    (folder / "config.json").write_text(json.dumps(description))
    if kind == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, str(folder / "model.safetensors"))


@pytest.mark.parametrize("kind", ["bin", "safetensors"])
def test_eagle_checkpoint_imports_exactly(target, tmp_path, kind):
    state = eagle_state(make_head(target.config, seed=7))
    write_eagle_folder(tmp_path / "head", target.config, state, kind)
    head = load_head(tmp_path / "head", target.config)  # a folder: the EAGLE layout
    features, emb = inputs()
    with torch.no_grad():
        torch.testing.assert_close(head(features, emb), reference(state, target.config, features, emb), atol=1e-5, rtol=1e-5)
    assert head.top_token_ids is None and head.fc_bias


def test_eagle_checkpoint_without_fc_bias(target, tmp_path):
    state = eagle_state(make_head(target.config, seed=7, fc_bias=False))
    write_eagle_folder(tmp_path / "head", target.config, state, "safetensors", bias=None)
    head = load_eagle_checkpoint(tmp_path / "head", target.config)
    features, emb = inputs()
    with torch.no_grad():
        torch.testing.assert_close(head(features, emb), reference(state, target.config, features, emb), atol=1e-5, rtol=1e-5)
    assert head.fc.bias is None


@pytest.mark.parametrize(
    ("change", "error_type", "names"),
    [
        (lambda s: s.update({"fc.weight": torch.zeros(H, 3 * H)}), IncompatibleModelsError, "fc.weight"),
        (lambda s: s.update({"layers.0.self_attn.rotary.scale": torch.zeros(1)}), MalformedInputError, "rotary.scale"),
        (lambda s: s.pop("layers.0.mlp.up_proj.weight"), MalformedInputError, "layer.mlp.up_proj.weight"),
        (lambda s: s.update({"embed_tokens.weight": torch.zeros(2 * V, H)}), IncompatibleModelsError, "embed_tokens"),
    ],
    ids=["fc-shape", "unknown-key", "missing-key", "other-embedding"],
)
def test_bad_eagle_checkpoints_are_refused(target, tmp_path, change, error_type, names):
    state = eagle_state(make_head(target.config))
    change(state)
    write_eagle_folder(tmp_path / "head", target.config, state, "bin")
    with pytest.raises(error_type) as error:
        load_eagle_checkpoint(tmp_path / "head", target.config)
    assert_one_line(error, names)


def test_eagle_folder_without_weights_is_refused(target, tmp_path):
    (tmp_path / "head").mkdir()
    with pytest.raises(MissingInputError) as error:
        load_eagle_checkpoint(tmp_path / "head", target.config)
    assert_one_line(error, "config.json")


# ---------------------------------------------------------------- training


def test_head_trains_on_a_fixed_batch(target):
    head = make_head(target.config).train()
    names = {name for name, _ in head.named_parameters()}
    assert all(name.startswith(("fc.", "layer.")) for name in names) and "layer.input_layernorm.weight" not in names
    assert all(param.requires_grad for param in head.parameters())
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = target.model(ids).last_hidden_state  # f_t, the lm_head input
        emb = target.model.embed_tokens(ids)
    lm_head = target.lm_head.weight.detach()  # frozen, as the target's
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        predicted = head(features[:, :-2], emb[:, 1:-1])  # (f_t, x_{t+1}) -> f̂_{t+1}
        return F.cross_entropy(head.logits(predicted, lm_head).flatten(0, 1), ids[:, 2:].flatten())

    first = loss().item()
    for _ in range(8):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < first - 0.05
    target_tensors = {target.lm_head.weight.data_ptr(), target.model.embed_tokens.weight.data_ptr()}
    assert not target_tensors & {param.data_ptr() for param in head.parameters()}
