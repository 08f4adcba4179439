"""``fit`` of an EAGLE-3 head on a tiny random Llama: an EAGLE-3 feature store (three aux layers beside the final
features) built in prepare_data, validation agreement rising, the best epoch exported in the speculators format and
decoding exactly from it; the same store trains the EAGLE-1/2 recipe too; a store of the other layout is refused."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import build_char_tokenizer, build_tiny_llama
from test_eagle_fit import QUESTIONS, tiny_data

from src.data.features import FeatureStore
from src.data.prompts import encode_messages
from src.decoding import Baseline, SamplingConfig, SpecExec, SpeculativeSampling
from src.decoding.eagle import EagleDrafter
from src.errors import IncompatibleModelsError, InvalidParameterError
from src.lit.eagle import EagleModule
from src.lit.eagle3 import Eagle3Module
from src.models.eagle3 import Eagle3Head
from src.models.eagle_formats import load_head
from src.models.loading import LoadedModel
from src.models.pair import ModelPair
from src.models.spec import ModelSpec

LAYERS = [2, 3, 3]  # 'auto' on the 6-layer tiny Llama


def attach_target(module, num_layers: int = 6):
    target = build_tiny_llama(seed=0, num_layers=num_layers)
    info = {"name": "tiny-llama", "dtype": "float32", "revision": None}
    module.pair = ModelPair(LoadedModel(target, build_char_tokenizer(), ModelSpec(name_or_path="tiny-llama"), info))
    return module


def eagle3_module(tmp_path, **kwargs) -> Eagle3Module:
    methods = [Baseline(), SpeculativeSampling(2, drafter=EagleDrafter()),
               SpecExec(budget=6, max_depth=3, drafter=EagleDrafter())]
    return attach_target(Eagle3Module(target=ModelSpec(name_or_path="tiny-llama"), methods=methods, max_new_tokens=16,
                                      head_path=str(tmp_path / "head3"), learning_rate=3e-3, **kwargs))


def trainer(epochs: int, sanity: int = 0) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=sanity)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One EAGLE-3 fit (store built with aux_layers auto, 10 epochs) shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("eagle3")
    L.seed_everything(0, verbose=False)
    module = eagle3_module(tmp_path, top_tokens=96, unroll_steps=3, eval_steps=3)
    data = tiny_data(tmp_path, aux_layers="auto")
    torch.set_num_threads(1)
    trainer(10, sanity=-1).fit(module, datamodule=data)
    return module, data, tmp_path


def test_store_keeps_the_aux_layers(fitted):
    _, data, _ = fitted
    store = FeatureStore(data.store_dir)
    assert store.meta()["aux_layers"] == LAYERS and store.aux_layers() == tuple(LAYERS)
    item = data.train_set[0]
    assert item["aux_features"].shape == (len(item["input_ids"]), 3 * 64) and item["features"].shape[-1] == 64


def test_fit_raises_agreement_and_exports_the_best_epoch(fitted):
    module, _, tmp_path = fitted
    before, after = module.val_history[0], max(module.val_history[1:], key=lambda v: v["val_accepted_length"])
    assert after["val_agree_step1"] > before["val_agree_step1"] + 0.15, (before, after)
    assert after["val_accepted_length"] > before["val_accepted_length"]
    assert after["val_chain_step2"] <= after["val_chain_step1"]  # unconditioned accuracy only falls along a chain
    folder = tmp_path / "head3"
    config = json.loads((folder / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["draft_vocab_size"] == 96
    assert config["eagle_aux_hidden_state_layer_ids"] == LAYERS
    assert config["speculators_config"]["verifier"]["name_or_path"] == "tiny-llama"
    metadata = json.loads((folder / "sp_samp.json").read_text())
    assert metadata["metrics"]["val_accepted_length"] == after["val_accepted_length"]


@pytest.mark.usefixtures("one_thread")
def test_exported_head_decodes_exactly_and_round_trips(fitted):
    """predict's methods load the exported folder; chain and tree give the baseline's tokens with drafts
    accepted; the loaded head drafts as the trained one did (same weights, same maps)."""
    module, _, tmp_path = fitted
    target = module.pair.target.model
    loaded = load_head(tmp_path / "head3", target.config, module.pair.target.info)
    assert isinstance(loaded, Eagle3Head)
    for name, tensor in module.head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor.cpu(), rtol=0, atol=0)
    accepted = 0
    for method in module.methods[1:]:
        method.prepare(module.pair.target.info, None)
        for question in QUESTIONS[3:7]:
            prompt = encode_messages(build_char_tokenizer(), [{"role": "user", "content": question}], True)
            expected = Baseline().generate(target, None, prompt, 24, SamplingConfig(), {2}).tokens
            generation = method.generate(target, None, prompt, 24, SamplingConfig(), {2})
            assert generation.tokens == expected, (method.name, question)
            accepted += generation.stats.accepted_tokens
    assert accepted > 0


@pytest.mark.usefixtures("one_thread")
def test_the_same_store_trains_the_eagle1_recipe(fitted):
    """A/B on the same data: an EAGLE-1/2 fit reads the EAGLE-3 store (its final features) and builds nothing."""
    _, data, tmp_path = fitted
    module = attach_target(EagleModule(target=ModelSpec(name_or_path="tiny-llama"),
                                       methods=[Baseline(), SpeculativeSampling(2, drafter=EagleDrafter())],
                                       head_path=str(tmp_path / "head1"), top_tokens=96))
    trainer(1).fit(module, datamodule=tiny_data(tmp_path))
    assert (tmp_path / "head1.safetensors").is_file()
    assert json.loads((tmp_path / "head1.json").read_text())["metadata"]["training_data"].get("aux_layers") is None


def test_store_of_the_other_layout_is_refused(tmp_path):
    """An EAGLE-1 store (no aux layers) cannot train EAGLE-3; the fix is named, before any training step."""
    module = attach_target(EagleModule(target=ModelSpec(name_or_path="tiny-llama"), methods=[Baseline()],
                                       head_path=str(tmp_path / "head1")))
    trainer(1).fit(module, datamodule=tiny_data(tmp_path))  # builds an EAGLE-1 store
    with pytest.raises(IncompatibleModelsError, match=r"EAGLE-1/2 store.*target layers \[2, 3, 3\] \(EAGLE-3\): choose another store_dir"):
        trainer(1).fit(eagle3_module(tmp_path), datamodule=tiny_data(tmp_path, aux_layers="auto"))
    with pytest.raises(InvalidParameterError, match="set data.init_args.aux_layers: auto"):
        trainer(1).fit(eagle3_module(tmp_path), datamodule=tiny_data(tmp_path))


def test_bad_parameters_are_named(tmp_path):
    with pytest.raises(InvalidParameterError, match="step_weight=0"):
        Eagle3Module(step_weight=0)
    with pytest.raises(InvalidParameterError, match=r"aux_layers=\[-1\] is invalid"):
        tiny_data(tmp_path, aux_layers=[-1])
    module = eagle3_module(tmp_path)
    with pytest.raises(InvalidParameterError, match=r"aux_layers=\[2, 9, 3\] reach beyond the target's 6 layers"):
        trainer(1).fit(module, datamodule=tiny_data(tmp_path, aux_layers=[2, 9, 3]))
