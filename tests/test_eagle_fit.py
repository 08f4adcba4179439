"""``fit`` of the EAGLE head on a tiny random Llama: features built in prepare_data (self-distilled answers),
validation agreement rising over the epochs, the best head exported and then drafting for speculative sampling."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from conftest import build_char_tokenizer, build_tiny_llama

from src.data.prompts import encode_messages
from src.decoding import Baseline, SamplingConfig, SpeculativeSampling
from src.decoding.eagle import EagleDrafter
from src.errors import InvalidParameterError
from src.lit.eagle import EagleDataModule, EagleModule
from src.models.loading import LoadedModel
from src.models.pair import ModelPair
from src.models.spec import ModelSpec

QUESTIONS = ["What is 2+3?", "Name a color.", "Count to four.", "Hi there", "Say yes.", "Spell cat.", "Why?",
             "Tell me a joke.", "List three fruits.", "What day is it?", "Add 7 and 8.", "Describe the sea.",
             "Where is Paris?", "Who are you?", "Give me a word.", "Pick a number."]


def write_prompts(path, questions):
    path.write_text("".join(json.dumps({"question_id": i, "category": "test", "turns": [q]}) + "\n"
                            for i, q in enumerate(questions)))
    return path


def tiny_module(tmp_path, dtype: torch.dtype = torch.float32, **kwargs) -> EagleModule:
    methods = [Baseline(), SpeculativeSampling(3, drafter=EagleDrafter())]
    module = EagleModule(target=ModelSpec(name_or_path="tiny-llama"), methods=methods, max_new_tokens=16,
                         head_path=str(tmp_path / "head"), learning_rate=3e-3, **kwargs)
    target = build_tiny_llama(seed=0).to(dtype)
    info = {"name": "tiny-llama", "dtype": str(dtype).removeprefix("torch."), "revision": None}
    module.pair = ModelPair(LoadedModel(target, build_char_tokenizer(), ModelSpec(name_or_path="tiny-llama"), info))
    return module


def tiny_data(tmp_path, **kwargs) -> EagleDataModule:
    prompts = write_prompts(tmp_path / "train.jsonl", QUESTIONS)
    return EagleDataModule(
        path=str(write_prompts(tmp_path / "eval.jsonl", QUESTIONS[:2])), self_distill_path=str(prompts),
        self_distill_prompts=len(QUESTIONS), self_distill_max_new_tokens=48, store_dir=str(tmp_path / "features"),
        max_length=128, feature_batch_size=8, val_fraction=0.25, batch_size=4, **kwargs)


@pytest.mark.usefixtures("one_thread")
def test_fit_raises_agreement_and_exports_a_head_that_drafts(tmp_path, caplog):
    L.seed_everything(0, verbose=False)  # the head's initial weights
    module, data = tiny_module(tmp_path, top_tokens=96, unroll_steps=2, eval_steps=3), tiny_data(tmp_path)
    trainer = L.Trainer(max_epochs=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=-1)
    trainer.fit(module, datamodule=data)
    before, after = module.val_history[0], module.val_history[-1]  # the sanity check ran the untrained head
    assert after["val_agree_step1"] > before["val_agree_step1"] + 0.2, (before, after)
    assert after["val_accepted_length"] > before["val_accepted_length"]
    assert "2 of" in caplog.text or "overlap" in caplog.text.lower()  # both evaluation prompts are training prompts
    # The export: the best epoch's figures, the target, the vocabulary subset; it drafts exactly.
    meta = json.loads((tmp_path / "head.json").read_text())
    assert meta["top_tokens"] == 96 and meta["metadata"]["target"]["name"] == "tiny-llama"
    assert meta["metadata"]["metrics"]["val_accepted_length"] == max(
        h["val_accepted_length"] for h in module.val_history[1:])
    target = module.pair.target.model
    method = module.methods[1]
    method.prepare(module.pair.target.info, None)
    prompt = encode_messages(build_char_tokenizer(), [{"role": "user", "content": QUESTIONS[4]}], True)
    expected = Baseline().generate(target, None, prompt, 24, SamplingConfig(), {2}).tokens
    generation = method.generate(target, None, prompt, 24, SamplingConfig(), {2})
    assert generation.tokens == expected and generation.stats.accepted_tokens > 0


@pytest.mark.usefixtures("one_thread")
def test_second_fit_reuses_the_store(tmp_path, monkeypatch):
    """Features are built once: a second fit on the same store generates and encodes nothing."""
    module, data = tiny_module(tmp_path), tiny_data(tmp_path)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    import src.data.features as features

    def refuse(*args, **kwargs):
        raise AssertionError("the store was built again")

    monkeypatch.setattr(features, "build_features", refuse)
    monkeypatch.setattr(features.FeatureStore, "add_answers", refuse)
    module, data = tiny_module(tmp_path), tiny_data(tmp_path)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)


@pytest.mark.usefixtures("one_thread")
def test_bf16_target_trains_float32_master_weights_and_drafts_in_bf16(tmp_path):
    """A bf16 target (the GPU presets): the head trains in float32 (AdamW steps would vanish in bf16), is saved
    so, and the drafter runs it in the target's dtype; greedy output still equals the target's own."""
    L.seed_everything(0, verbose=False)
    module, data = tiny_module(tmp_path, dtype=torch.bfloat16, top_tokens=96), tiny_data(tmp_path)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    initial = None

    class Watch(L.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal initial
            initial = pl_module.head.fc.weight.detach().clone()

    trainer.callbacks.append(Watch())
    trainer.fit(module, datamodule=data)
    assert {p.dtype for p in module.head.parameters()} == {torch.float32}
    assert not torch.equal(module.head.fc.weight.detach(), initial)  # it trained
    method = module.methods[1]
    method.prepare(module.pair.target.info, None)
    target = module.pair.target.model
    prompt = encode_messages(build_char_tokenizer(), [{"role": "user", "content": QUESTIONS[3]}], True)
    expected = Baseline().generate(target, None, prompt, 16, SamplingConfig(), {2}).tokens
    assert method.generate(target, None, prompt, 16, SamplingConfig(), {2}).tokens == expected
    assert method.drafter.head.fc.weight.dtype == torch.bfloat16


@pytest.mark.usefixtures("one_thread")
def test_killed_fit_resumes_from_the_last_checkpoint_and_keeps_the_best_epoch(tmp_path):
    """configs/eagle-long.yaml saves a checkpoint every epoch; ``--ckpt_path last`` goes on from it with the best
    epoch so far and the validation history, so the export is the best epoch of the whole run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def trainer(epochs: int) -> L.Trainer:
        checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0)
        return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, callbacks=[checkpoints],
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)

    L.seed_everything(0, verbose=False)
    first = tiny_module(tmp_path, top_tokens=96)
    trainer(1).fit(first, datamodule=tiny_data(tmp_path))  # "killed" after one epoch
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    resumed = tiny_module(tmp_path, top_tokens=96)
    trainer(3).fit(resumed, datamodule=tiny_data(tmp_path), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert len(resumed.val_history) == 3 and json.dumps(resumed.val_history[0]) == json.dumps(first.val_history[0])
    best = max(resumed.val_history, key=lambda values: values["val_accepted_length"])
    exported = json.loads((tmp_path / "head.json").read_text())["metadata"]["metrics"]
    assert exported["val_accepted_length"] == best["val_accepted_length"]


def test_bad_parameters_are_named(tmp_path):
    with pytest.raises(InvalidParameterError, match="unroll_steps=0"):
        EagleModule(unroll_steps=0)
    with pytest.raises(InvalidParameterError, match="top_tokens=0"):
        EagleModule(top_tokens=0)
    with pytest.raises(InvalidParameterError, match="no training data"):
        EagleDataModule()
    with pytest.raises(InvalidParameterError, match="val_fraction=1.5"):
        EagleDataModule(train_sources=["x.jsonl"], val_fraction=1.5)


def test_top_tokens_above_the_vocabulary_is_refused(tmp_path):
    module, data = tiny_module(tmp_path, top_tokens=1000), tiny_data(tmp_path)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(InvalidParameterError, match="top_tokens=1000 exceeds the target's 128 ids"):
        trainer.fit(module, datamodule=data)
