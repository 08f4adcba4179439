"""Cut lines in append-only files and the mining time budget (issue 27 items 6, 7 and 13): a cut line is moved
to ``<file>.corrupt``, never joined to the next row and never a reason to throw a store away; a symlinked file
is repaired through its link; the AutoJudge mining budget is overrun by at most one prompt's time. All in-process
and without a model (the mining budget test fakes the clock and the miner)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import torch

from src.data.features import FeatureStore
from src.data.mining import IMPORTANT, UNIMPORTANT, LabelStore, MinedPrompt, Mismatch
from src.jsonl import read_rows, repair_lines

ROWS = [json.dumps({"run_id": "r", "resume_key": f"k{i}", "status": "ok"}) for i in range(3)]


# ---- item 6: a symlinked file is repaired through its link ---------------------------------------------------------

def test_a_symlinked_output_keeps_its_link_through_a_repair(tmp_path):
    real = tmp_path / "store" / "results.jsonl"
    real.parent.mkdir()
    real.write_text(ROWS[0] + "\n" + ROWS[1] + "\n" + '{"run_id": "r", "st')
    link = tmp_path / "results.jsonl"
    link.symlink_to(real)
    assert repair_lines(link) == 1
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert real.read_text() == ROWS[0] + "\n" + ROWS[1] + "\n"
    assert (tmp_path / "results.jsonl.corrupt").read_text() == '{"run_id": "r", "st\n'  # beside the name given
    with link.open("a") as handle:  # what the resumed writer does next: it reaches the real file
        handle.write(ROWS[2] + "\n")
    assert real.read_text() == "".join(row + "\n" for row in ROWS)
    assert not list(real.parent.glob("*.tmp"))


def test_a_line_cut_mid_character_or_holding_u2028_is_no_unreadable_file(tmp_path):
    path = tmp_path / "r.jsonl"
    kept = json.dumps({"run_id": "r", "answer": "a\u2028b\x1cc"}, ensure_ascii=False)  # not line ends in JSONL
    cut = json.dumps({"run_id": "r", "answer": "é"}, ensure_ascii=False).encode()[:-3]  # inside the 2-byte é
    path.write_bytes((ROWS[0] + "\n" + kept + "\n").encode() + cut)
    assert repair_lines(path) == 1
    assert path.read_text(encoding="utf-8") == ROWS[0] + "\n" + kept + "\n"
    assert (tmp_path / "r.jsonl.corrupt").read_bytes() == cut + b"\n"


# ---- item 7: a cut line in the label store or the feature store ----------------------------------------------------

def mined(label: int) -> MinedPrompt:
    return MinedPrompt("7", [1], [Mismatch(0, 3, 4, label, torch.zeros(4), torch.ones(4))])


def cut_last_line(path, keep_newline: bool) -> str:
    """Cut the file's last line in half (a killed write; with its newline, as a crash or an edit can leave it)."""
    lines = path.read_text().splitlines()
    fragment = lines[-1][: len(lines[-1]) // 2]
    path.write_text("".join(line + "\n" for line in lines[:-1]) + fragment + ("\n" if keep_newline else ""))
    return fragment


def test_a_cut_label_store_line_is_moved_aside_and_its_prompt_mined_again(tmp_path, caplog):
    store = LabelStore(tmp_path / "labels")
    store.open({"target": "t"})
    for prompt_id, label in (("a", IMPORTANT), ("b", UNIMPORTANT), ("c", IMPORTANT)):
        store.add(prompt_id, mined(label), 0.1)
    fragment = cut_last_line(store.root / "prompts.jsonl", keep_newline=True)  # prompt c's row
    with caplog.at_level(logging.WARNING):
        assert set(store.finished_prompts()) == {"a", "b"}
    store.open({"target": "t"})  # the next fit: the fragment goes aside before anything is appended
    assert (store.root / "prompts.jsonl.corrupt").read_text() == fragment + "\n"
    store.add("c", mined(IMPORTANT), 0.1)
    store.add("d", mined(UNIMPORTANT), 0.1)
    assert set(store.finished_prompts()) == {"a", "b", "c", "d"}
    labels = store.load(show_progress=False)
    assert sorted(labels.prompt_ids) == ["a", "b", "c", "d"] and labels.labels.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert "prompts.jsonl: line 3 not valid JSON" in caplog.text and "its work is redone" in caplog.text


def test_a_label_row_lost_mid_file_mines_its_prompt_again_and_nothing_says_delete(tmp_path, caplog):
    store = LabelStore(tmp_path / "labels")
    store.open({"target": "t"})
    for prompt_id in "ab":
        store.add(prompt_id, mined(IMPORTANT), 0.1)
    labels_path = store.root / "labels.jsonl"
    lines = labels_path.read_text().splitlines()  # an earlier version appended b's label onto a fragment
    labels_path.write_text(lines[0] + "\n" + '{"prompt_id": "x", "pos' + lines[1] + "\n")
    with caplog.at_level(logging.WARNING):
        assert set(store.finished_prompts()) == {"a"}  # b is short of its label: mined again, not half-used
        assert store.load(show_progress=False).prompt_ids == ["a"]
    assert "delete" not in caplog.text
    store.open({"target": "t"})
    store.add("b", mined(UNIMPORTANT), 0.1)
    assert store.load(show_progress=False).labels.tolist() == [1.0, 0.0]


def test_a_cut_feature_store_line_is_moved_aside(tmp_path):
    store = FeatureStore(tmp_path / "features")
    store.open({"feature_dtype": "float32"})
    settings = {"max_new_tokens": 8}
    store.add_answers([{"item_id": f"i{n}", "answer": "x", "settings": settings} for n in range(3)])
    fragment = cut_last_line(store.answers_path, keep_newline=True)
    assert set(store.answers(settings)) == {"i0", "i1"}
    store.open({"feature_dtype": "float32"})
    store.add_answers([{"item_id": "i2", "answer": "x", "settings": settings}])
    assert set(store.answers(settings)) == {"i0", "i1", "i2"}
    assert (store.root / "answers.jsonl.corrupt").read_text() == fragment + "\n"
    cut_last_line(store.answers_path, keep_newline=False)  # a writer killed since the store was opened
    store.add_answers([{"item_id": "i3", "answer": "x", "settings": settings}])
    assert set(store.answers(settings)) == {"i0", "i1", "i3"}
    assert len((store.root / "answers.jsonl.corrupt").read_text().splitlines()) == 2
    store.items_path.write_text('{"item_id": "a", "shard": "shards/000000.safetensors"')
    assert store.finished_items() == {} and read_rows(store.items_path) == []


# ---- item 13: the mining time budget -------------------------------------------------------------------------------

def test_the_mining_budget_is_overrun_by_at_most_one_prompt(tmp_path, monkeypatch, caplog):
    import src.lit.judge as judge

    clock = SimpleNamespace(now=0.0)
    groups = []

    def fake_mine(target, draft, prompts, *args, **kwargs):  # one second per prompt, however many side by side
        groups.append(len(prompts))
        clock.now += len(prompts)
        return [MinedPrompt(None, [1], stopped_by="no_answer") for _ in prompts]

    monkeypatch.setattr(judge, "mine_prompts", fake_mine)
    monkeypatch.setattr(judge, "time", SimpleNamespace(monotonic=lambda: clock.now))
    pair = SimpleNamespace(tokenizer=None, target=SimpleNamespace(model=None), draft=SimpleNamespace(model=None),
                           eos_token_ids={2})
    module = SimpleNamespace(pair=pair, first_turn_ids=lambda options, turn: [[torch.tensor([1, 2])]])
    prompts = [SimpleNamespace(prompt_id=f"p{i}", turns=["q"]) for i in range(40)]

    data = judge.JudgeDataModule(mine_time_budget_s=2.5, mine_group=16, store_dir=str(tmp_path / "small"))
    data.store.open({})
    with caplog.at_level(logging.WARNING):
        data._mine(module, prompts, 0)
    assert groups == [1, 1, 1] and clock.now - 2.5 <= 1.0  # a group of 16 first overran by 13.5 s
    assert "mining budget (2.5 s) spent: stopped after 3.0 s, 0.5 s over" in caplog.text
    assert "37 prompts left; rerun fit to go on" in caplog.text
    assert len(data.store.finished_prompts()) == 3

    groups.clear()
    clock.now = 0.0
    data = judge.JudgeDataModule(mine_time_budget_s=30, mine_group=16, store_dir=str(tmp_path / "large"))
    data.store.open({})
    data._mine(module, prompts, 0)
    assert groups == [1, 16, 13] and clock.now == 30  # full groups while the budget holds them
