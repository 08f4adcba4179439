"""The command line: every shipped config parses and instantiates; presets compose; bad presets are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from src.cli import cli_main

ROOT = Path(__file__).resolve().parent.parent
METHOD_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml"))
MODEL_PRESETS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "models").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _run_from_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["python -m src"])  # the CLI reads args=, not pytest's own argv


def subcommand_of(config: str) -> str:
    return "fit" if "trainer:\n  max_epochs" in Path(config).read_text() or "fit" in Path(config).stem else "predict"


def test_help_lists_fit_and_predict(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "fit" in out and "predict" in out and "validate" not in out


@pytest.mark.parametrize("config", METHOD_CONFIGS)
def test_every_config_prints(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([subcommand_of(config), "--config", config, "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path" in capsys.readouterr().out


@pytest.mark.parametrize("config", METHOD_CONFIGS)
def test_every_config_instantiates_without_loading_models(config):
    cli = cli_main(["--config", config], run=False)
    assert cli.model is not None and cli.datamodule is not None


@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_model_presets_compose_with_a_method_config(preset, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["predict", "--config", "configs/baseline.yaml", "--config", preset, "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    fragment = Path(preset).read_text()
    name = next(line.split(":", 1)[1].strip() for line in fragment.splitlines() if "name_or_path" in line)
    assert name in out


def test_command_line_overrides_reach_the_module():
    cli = cli_main(
        ["--config", "configs/baseline.yaml", "--data.limit", "2", "--model.max_new_tokens", "16", "--output", "x.jsonl"],
        run=False,
    )
    assert cli.model.max_new_tokens == 16 and cli.datamodule.limit == 2
    assert cli.config.output == "x.jsonl"


def test_unknown_preset_lists_existing_ones():
    from src.errors import MissingInputError

    with pytest.raises(MissingInputError, match=r"(?s)configs/models/nope\.yaml.*does not exist.*configs/models/smollm2-135m-bf16\.yaml"):
        cli_main(["predict", "--config", "configs/baseline.yaml", "--config", "configs/models/nope.yaml"])


def test_method_needing_a_draft_without_one_is_refused():
    from src.decoding.base import DecodingMethod
    from src.lit.module import DecodingModule

    class NeedsDraft(DecodingMethod):
        name = "needs-draft"
        needs_draft = True

        def generate(self, *args, **kwargs):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match="needs a draft model.*smollm2-135m-bf16"):
        DecodingModule(methods=[NeedsDraft()])
