"""End to end on the real embedded SmolLM2-135M-Instruct: loading, caching, baseline decoding, the predict CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import chat_input_ids

from src.decoding import Baseline, SamplingConfig
from src.models import embedded

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_model_gives_coherent_greedy_text(embedded_target):
    tokenizer = embedded_target.tokenizer
    input_ids = chat_input_ids(tokenizer, "What is the capital of France?")
    generation = Baseline().generate(
        embedded_target.model, None, input_ids, 24, SamplingConfig(), {tokenizer.eos_token_id}
    )
    text = tokenizer.decode(generation.tokens, skip_special_tokens=True)
    assert "Paris" in text, text
    assert embedded_target.model.config.num_hidden_layers == 30 and len(tokenizer) == 49152


def test_second_load_uses_the_cache(embedded_target, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was converted again although a cached copy exists")

    monkeypatch.setattr("src.models.embedded.load_gguf_unquantized", no_conversion)
    folder = embedded.ensure_converted("embedded:smollm2-135m-instruct")
    assert (folder / "model.safetensors").is_file()
    assert folder.parent.parent == embedded.cache_root()


@pytest.mark.slow
def test_first_load_converts_into_an_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SP_SAMP_CACHE", str(tmp_path))
    started = time.perf_counter()
    folder = embedded.ensure_converted("embedded:smollm2-135m-instruct")
    assert folder == tmp_path / "models" / "smollm2-135m-instruct"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    print(f"conversion took {time.perf_counter() - started:.1f} s")


def test_baseline_equals_hf_generate_on_mt_bench(embedded_target, mt_bench_prompts):
    model, tokenizer = embedded_target.model, embedded_target.tokenizer
    eos = {tokenizer.eos_token_id}
    for prompt in mt_bench_prompts[:3]:
        input_ids = chat_input_ids(tokenizer, prompt.turns[0])
        ours = Baseline().generate(model, None, input_ids, 32, SamplingConfig(), eos).tokens
        with torch.inference_mode():
            reference = model.generate(input_ids, max_new_tokens=32, do_sample=False)[0, input_ids.shape[1]:].tolist()
        assert ours == reference, f"prompt {prompt.prompt_id}: first difference at {next(i for i, (a, b) in enumerate(zip(ours, reference)) if a != b)}"


def test_predict_cli_writes_records(tmp_path, mt_bench_path, monkeypatch):
    from src.cli import cli_main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["python -m src"])
    output = tmp_path / "out" / "b.jsonl"
    args = ["predict", "--config", "configs/baseline.yaml", "--data.path", str(mt_bench_path), "--data.limit", "2",
            "--model.max_new_tokens", "8", "--output", str(output), "--trainer.enable_progress_bar", "false"]
    cli_main(args)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        assert record["status"] == "ok" and record["method"] == "baseline"
        assert 1 <= record["new_tokens"] <= 8 and record["tokens_per_target_call"] == 1.0
        assert record["tokens_per_s"] > 0 and record["text"]
        assert {"prompt_id", "category", "wall_s", "prefill_s", "decode_s", "system", "params"} <= record.keys()
    # a second run refuses to touch the file; --resume true skips what is done
    with pytest.raises(FileExistsError, match="--resume true"):
        cli_main(args)
    cli_main(args + ["--resume", "true"])
    assert len(output.read_text().splitlines()) == 2
