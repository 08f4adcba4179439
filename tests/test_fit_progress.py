"""Progress of fit's long data phases (src/data/progress.py): each shows one bar on stderr, as whole lines where
stderr is no terminal, never more often than every LINE_INTERVAL_S but at least that often while a batch runs;
a resumed store's bar starts at what it holds and says so; quiet mode prints nothing else."""

from __future__ import annotations

import io
import json
import re
import time
from types import SimpleNamespace

import pytest
from conftest import build_char_tokenizer, build_tiny_llama, perturbed_copy
from test_eagle_fit import tiny_data, tiny_module
from test_features import CONVERSATIONS, open_store

import src.data.progress as progress
from src.data.features import build_features, generate_answers
from src.data.progress import phase_progress, shows_progress

pytestmark = pytest.mark.usefixtures("one_thread")


def fit_trainer(module, progress_bar: bool = True):
    """What prepare_data reads of a Lightning trainer during fit (a real one logs its own lines to stderr)."""
    return SimpleNamespace(state=SimpleNamespace(fn="fit"), lightning_module=module, is_global_zero=True,
                           progress_bar_callback=object() if progress_bar else None)


def bar_lines(err: str, phase: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(phase)]


def test_eagle_prepare_data_shows_both_phases_and_nothing_else(tmp_path, capfd):
    module, data = tiny_module(tmp_path), tiny_data(tmp_path)
    data.trainer = fit_trainer(module)
    data.prepare_data()
    out, err = capfd.readouterr()
    assert out == ""
    phases = ("self-distillation: target answers", "features: target hidden states")
    lines = err.splitlines()
    assert lines and all(line.startswith(phases) for line in lines), err  # quiet mode: the bars alone
    assert "\r" not in err  # no terminal: whole lines, no in-place redraws
    for phase, unit in zip(phases, ("answer", "conversation")):
        shown = bar_lines(err, phase)
        assert 2 <= len(shown) <= 4, shown  # its first line, its last (and a heartbeat on a slow machine)
        assert "| 0/16 [" in shown[0] and "resuming" not in shown[0]
        assert re.search(rf"\| 16/16 \[.*{unit}/s", shown[-1]), shown[-1]  # done/total, elapsed<ETA, rate
    assert "tokens/s" in bar_lines(err, phases[1])[-1]
    # A second fit over the finished store builds nothing and shows nothing.
    data = tiny_data(tmp_path)
    data.trainer = fit_trainer(module)
    data.prepare_data()
    assert capfd.readouterr() == ("", "")


def test_enable_progress_bar_false_silences_the_phases(tmp_path, capfd):
    module, data = tiny_module(tmp_path), tiny_data(tmp_path)
    data.trainer = fit_trainer(module, progress_bar=False)
    data.prepare_data()
    assert capfd.readouterr() == ("", "")
    assert not shows_progress(SimpleNamespace(progress_bar_callback=object(), is_global_zero=False))
    assert shows_progress(None)


def test_resumed_stores_start_at_what_they_hold(tmp_path, capfd):
    target, tokenizer = build_tiny_llama(seed=0), build_char_tokenizer()
    store = open_store(tmp_path / "store")
    report = build_features(target, tokenizer, CONVERSATIONS, store, batch_size=2, token_budget=1)
    assert report["items_done"] == 2 and report["stopped"] == "token_budget"
    first = bar_lines(capfd.readouterr().err, "features: target hidden states")
    assert "resuming" not in first[0] and "| 2/6 [" in first[-1]
    build_features(target, tokenizer, CONVERSATIONS, store, batch_size=2)
    resumed = bar_lines(capfd.readouterr().err, "features: target hidden states")
    assert resumed[0].startswith("features: target hidden states (resuming: 2/6 already stored)")
    assert "| 2/6 [" in resumed[0] and "| 6/6 [" in resumed[-1]
    # the answers of self-distillation are a resumable store too
    prompts = [(c.item_id, c.messages[0]["content"]) for c in CONVERSATIONS]
    generate_answers(target, tokenizer, prompts[:4], 8, 4, store=store)
    generate_answers(target, tokenizer, prompts, 8, 4, store=store)
    answers = bar_lines(capfd.readouterr().err, "self-distillation: target answers")
    assert "| 4/4 [" in answers[1]
    assert answers[2].startswith("self-distillation: target answers (resuming: 4/6 already stored)")
    assert "| 6/6 [" in answers[-1]


def test_label_mining_resumes_with_what_the_store_holds(tmp_path, capfd):
    from src.lit.judge import AutoJudgeModule, JudgeDataModule
    from src.models.loading import LoadedModel
    from src.models.pair import ModelPair
    from src.models.spec import ModelSpec

    questions = tmp_path / "train.jsonl"
    questions.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + 1?",
                                             "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}) + "\n" for i in range(4)))
    module = AutoJudgeModule(target=ModelSpec(name_or_path="tiny-target"), draft=ModelSpec(name_or_path="tiny-draft"),
                             max_new_tokens=8)
    target, tokenizer = build_tiny_llama(seed=3), build_char_tokenizer()
    info = {"name": "tiny", "dtype": "float32", "quantization": "none", "device": "cpu"}
    module.pair = ModelPair(LoadedModel(target, tokenizer, ModelSpec(name_or_path="tiny-target"), info),
                            LoadedModel(perturbed_copy(target, 0.05, seed=4), tokenizer,
                                        ModelSpec(name_or_path="tiny-draft"), info))
    for count in (2, 4):
        data = JudgeDataModule(mine_path=str(questions), mine_prompts=count, mine_max_new_tokens=12, mine_group=2,
                               store_dir=str(tmp_path / "labels"), chat_template=False)
        data.trainer = fit_trainer(module)
        data.prepare_data()
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert out == "" and all(line.startswith("mining AutoJudge labels") for line in lines), err
    assert "| 2/2 [" in lines[1] and "labels (" in lines[1]
    assert lines[2].startswith("mining AutoJudge labels (resuming: 2/4 already stored)") and "| 4/4 [" in lines[-1]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_at_most_every_interval_and_a_heartbeat_while_a_batch_runs(monkeypatch, capsys):
    with phase_progress("quick phase", 1000, unit="item") as bar:
        for _ in range(1000):
            bar.update()
    assert len(bar_lines(capsys.readouterr().err, "quick phase")) == 2  # its first line and its last: no spam
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.25)
    with phase_progress("slow batch", 2, unit="batch") as bar:
        time.sleep(1.5)  # one batch longer than the interval: the heartbeat shows it is still running
        bar.update()
    lines = bar_lines(capsys.readouterr().err, "slow batch")
    assert 3 <= len(lines) <= 9, lines  # first, ~5 heartbeats of 0/2 (never more than one per interval), last
    assert "| 0/2 [00:01<" in "".join(lines[:-1]) and "| 1/2 [" in lines[-1]


def test_a_usually_quick_phase_shows_nothing_unless_it_lasts(capsys):
    with phase_progress("tokenizing", 10, delay_s=5.0) as bar:
        bar.update(10)
    assert capsys.readouterr().err == ""


def test_on_a_terminal_the_bar_redraws_in_place(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with phase_progress("drawn", 3, done=1, unit="item") as bar:
        bar.update(2)
    text = terminal.getvalue()
    assert text.count("\r") >= 2 and text.endswith("\n") and text.count("\n") == 1
    assert "drawn (resuming: 1/3 already stored)" in text and "3/3" in text


def test_still_running_prints_a_line_per_interval_and_nothing_for_a_quick_phase(capsys):
    import time

    from src.data.progress import still_running

    with still_running("cost profile", interval=0.05):
        time.sleep(0.18)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 2
    assert all(line.startswith("cost profile: still running, ") for line in lines)
    with still_running("auto", interval=5.0):
        pass
    with still_running("auto", enabled=False, interval=0.01):
        time.sleep(0.05)
    assert capsys.readouterr().err == ""
