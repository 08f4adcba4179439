"""Method keys and recorded parameters (src.results.keys): what a record calls a method and what it carries.

The snapshot holds the key and params of every method of every predict config as main wrote them before this
policy moved out of the algorithm classes: a results file written then must resume (same resume keys and run
fingerprints), so today's keys must equal it.
"""

import json
from pathlib import Path

import pytest

from src.cli import cli_main
from src.results.keys import method_keys, method_name, recorded_params

SNAPSHOT = json.loads((Path(__file__).parent / "method_keys_snapshot.json").read_text())["configs"]


@pytest.mark.parametrize("config", sorted(SNAPSHOT))
def test_every_config_keeps_the_keys_and_params_its_results_were_written_with(config, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    module = cli_main(["--config", config], run=False).model
    today = [[key, module.recorded_params(method)] for key, method in zip(module.method_keys, module.methods)]
    assert json.dumps(today, sort_keys=True) == json.dumps(SNAPSHOT[config], sort_keys=True)


def test_defaults_the_first_files_left_out_are_left_out_and_anything_else_is_recorded():
    plain = {"k": 4, "schedule": "constant", "max_k": 16, "confidence_threshold": 0.0, "drafter": "draft_model",
             "top_tokens": None, "token_map": None}
    assert recorded_params("speculative", plain) == {"k": 4}
    adaptive = {**plain, "schedule": "heuristic", "confidence_threshold": 0.3}
    assert recorded_params("speculative", adaptive) == {"k": 4, "schedule": "heuristic", "max_k": 16,
                                                        "confidence_threshold": 0.3}
    lookup = {"budget": 32, "max_depth": 8, "drafter": "prompt_lookup", "max_ngram": 3, "min_ngram": 1,
              "max_branches": 1}
    assert recorded_params("specexec", lookup) == {"budget": 32, "max_depth": 8, "drafter": "prompt_lookup",
                                                   "max_ngram": 3, "min_ngram": 1}
    assert recorded_params("specexec", {**lookup, "max_branches": 3})["max_branches"] == 3
    assert recorded_params("autojudge", {"k": 4, "threshold": None}) == {"k": 4, "threshold": None}  # no policy
    assert recorded_params("specexec", {"scoring_temperature": 0}) == {"scoring_temperature": 0}  # 0 is not None


def test_names_and_keys():
    assert method_name("speculative", "draft_model") == "speculative" and method_name("baseline", None) == "baseline"
    assert method_name("specexec", "eagle") == "specexec+eagle"
    keys = method_keys([("baseline", {}), ("autojudge", {"k": 4, "threshold": 0.5}),
                        ("autojudge", {"k": 4, "threshold": None})])
    assert keys == ["baseline", "autojudge[threshold=0.5]", "autojudge[threshold=None]"]
    assert method_keys([("speculative", {"k": 4}), ("speculative", {"k": 4})]) == ["speculative[k=4]"] * 2
