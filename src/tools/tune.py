"""Pick the draft length (chain) or tree shape for this machine and model pair from a cost model, not a guess.

    python -m src.tools.tune --config configs/speculative.yaml              # best k, written to a new config
    python -m src.tools.tune --config configs/specexec.yaml                 # best budget x max_depth
    python -m src.tools.tune --config configs/speculative.yaml --verify 8   # then measure the grid on 8 prompts

A draft-then-verify call costs T(n) (the target scoring n tokens at once, from the cost profile), plus the drafter
and the harness around it; it yields 1 + (accepted drafts) tokens. Tuning:

1. decodes ``--prompts`` calibration prompts (the config's prompt set, its first prompts round-robin over the
   categories) once per candidate shape it cannot derive from another: a chain is decoded once at the largest k
   of the grid (greedy acceptance of draft position i does not depend on k), each tree shape once;
2. from the records: the survival curve S_i = P(at least i drafts accepted) for chains, tokens per call for
   trees, the drafter's seconds per draft forward and the harness seconds per call (``other_s``);
3. predicts tokens/s for every candidate, k: (1 + sum_{i<=k} S_i) / (T(k+1) + k d + h); a tree:
   (tokens per call) / (T(budget+1) + drafting per call + h), prints the curve and writes ``--out`` (the config
   with the best value); ``--verify N`` then decodes N other prompts with every candidate, interleaved, and prints
   measured tokens/s next to the prediction (the pick's gap to the measured best).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from src.errors import InvalidParameterError, MalformedInputError, MissingInputError, UserInputError
from src.results.check import OneLineArgumentParser

DEFAULT_KS = (1, 2, 3, 4, 5, 6, 8, 10, 12)
DEFAULT_TREES = ((8, 4), (16, 6), (16, 8), (32, 8), (32, 12), (64, 12))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="python -m src.tools.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a predict config with a speculative or specexec method")
    parser.add_argument("--prompts", type=int, default=4, help="calibration prompts (default: 4)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's")
    parser.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS), help="chain lengths to consider")
    parser.add_argument("--trees", nargs="+", default=[f"{b}x{d}" for b, d in DEFAULT_TREES],
                        help="tree shapes BUDGETxMAX_DEPTH to consider")
    parser.add_argument("--out", type=Path, default=None, help="default: artifacts/tuned/<config stem>.yaml")
    parser.add_argument("--verify", type=int, default=0, metavar="N",
                        help="then decode N further prompts with every candidate, interleaved, and print measured "
                             "tok/s next to the prediction")
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.verify < 0:
        parser.error(f"--prompts {args.prompts} / --verify {args.verify}: use --prompts >= 1 and --verify >= 0")
    if any(k < 1 for k in args.ks):
        parser.error(f"--ks {args.ks}: every k must be >= 1")
    args.trees = [_tree_shape(parser, text) for text in args.trees]
    args.out = args.out or Path("artifacts/tuned") / f"{Path(args.config).stem}.yaml"
    return args


def check_out(config: str, out: Path) -> None:
    """Refuse an ``--out`` that cannot take the tuned config before minutes of calibration, not after."""
    if out.is_dir():
        raise InvalidParameterError(f"--out {out} is a folder: give a file name, e.g. "
                                    f"{out / (Path(config).stem + '.tuned.yaml')}")
    if out.exists() and Path(config).exists() and out.resolve() == Path(config).resolve():
        raise InvalidParameterError(
            f"--out {out} is the input config: tune writes a new config (the input keeps its comments); give "
            f"another path, e.g. {out.with_name(out.stem + '.tuned' + out.suffix)}")
    parent = next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise InvalidParameterError(f"--out {out}: {parent} is a file, not a folder: choose another --out")


def read_config(path: str) -> dict[str, Any]:
    """The config as YAML, refused in one line unless it is a mapping of a predict config's sections."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise MissingInputError(f"--config {path} does not exist: give a predict config, e.g. "
                                "configs/speculative.yaml") from error
    except (IsADirectoryError, UnicodeDecodeError) as error:
        raise MalformedInputError(f"--config {path} is not a YAML text file ({error}): give a predict config, e.g. "
                                  "configs/speculative.yaml") from error
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise MalformedInputError(f"--config {path} is not valid YAML{line}: give a predict config, e.g. "
                                  "configs/speculative.yaml (a prompt or results JSONL is not a config)") from error
    if not isinstance(config, dict) or "model" not in config:
        held = type(config).__name__ if not isinstance(config, dict) else f"keys {sorted(config)}"
        raise MalformedInputError(f"--config {path} is not a predict config (a mapping with model: / data: "
                                  f"sections; it holds a {held}): give one, e.g. configs/speculative.yaml")
    return config


def check_ks(config: str, method, ks: list[int]) -> None:
    """A chain longer than the method's ``max_k`` would be written into a config that predict then refuses."""
    too_long = sorted(k for k in ks if k > method.max_k)
    if too_long:
        raise InvalidParameterError(
            f"--ks {' '.join(map(str, too_long))}: above the max_k={method.max_k} of the speculative method in "
            f"{config}, which predict would refuse: use --ks values <= {method.max_k}, or raise max_k in the config")


def methods_entry(config: dict[str, Any], path: str, index: int) -> dict[str, Any]:
    """The config's entry of method ``index``, where the tuned values go (before calibrating: a config whose
    methods come from elsewhere cannot take them)."""
    methods = ((config.get("model") or {}).get("init_args") or {}).get("methods")
    if not isinstance(methods, list) or index >= len(methods) or not isinstance(methods[index], dict):
        raise InvalidParameterError(f"{path} does not list its methods under model.init_args.methods, where the "
                                    "tuned values are written: list them in the config")
    return methods[index]


def _tree_shape(parser: argparse.ArgumentParser, text: str) -> tuple[int, int]:
    try:
        budget, depth = (int(part) for part in text.lower().split("x"))
    except ValueError:
        parser.error(f"--trees {text!r} is not BUDGETxMAX_DEPTH (e.g. 16x8)")
    if budget < 1 or depth < 1:
        parser.error(f"--trees {text!r}: budget and max_depth must be >= 1")
    return budget, depth


# ---------------------------------------------------------------- the model


def _totals(records: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("new_tokens", "target_calls", "draft_calls", "draft_s", "other_s", "wall_s")
    return {key: sum(float(r.get(key) or 0.0) for r in records) for key in keys}


def survival_curve(records: list[dict[str, Any]]) -> list[float]:
    """S_i = cycles accepting >= i drafts / cycles offering >= i drafts (the records' per-position counts)."""
    accepted = [sum(v) for v in itertools.zip_longest(*(r["accepted_counts_per_position"] for r in records),
                                                      fillvalue=0)]
    offered = [sum(v) for v in itertools.zip_longest(*(r["drafted_counts_per_position"] for r in records),
                                                     fillvalue=0)]
    accepted += [0] * (len(offered) - len(accepted))
    return [a / d for a, d in zip(accepted, offered) if d > 0]


# ---------------------------------------------------------------- running


class Tuner:
    """The config's model pair, sampling and prompts; decodes with a method and returns records.

    Its methods import the torch side (src.cli, src.lit, src.decoding) where they need it: this module imports no
    torch at the top, so ``--help`` and a bad argument answer at once instead of after torch's ~3 s import.
    """

    def __init__(self, config: str, max_new_tokens: int | None) -> None:
        from src.cli import cli_main
        from src.cli_errors import one_line_error
        from src.lit.module import DecodingModule

        self.config_path = config
        try:
            cli = cli_main(["--config", config], run=False)
        except UserInputError:
            raise
        except Exception as error:  # jsonargparse's report of an unknown key or a bad value: predict's one line
            message = one_line_error(error)
            if message is None:
                raise
            raise InvalidParameterError(f"--config {config}: {' '.join(message.split())}") from error
        if not isinstance(cli.model, DecodingModule):
            raise InvalidParameterError(f"{config}: tuning needs a predict config (src.lit.module.DecodingModule)")
        self.module, self.data = cli.model, cli.datamodule
        if max_new_tokens is not None:
            self.module.max_new_tokens = max_new_tokens

    def load(self) -> None:
        """The models, the prompts and any ``auto`` draft copy: after the config's checks (seconds to minutes)."""
        self.module.ensure_pair()
        self.module.setup("predict")
        self.prompts = self.data.load_prompts()
        self.resolve_auto_draft()

    def resolve_auto_draft(self) -> None:
        """A config whose draft copy is chosen at run start (``quantization: auto``): chosen here the same way
        (src.lit.auto, which also sets the config's other ``auto`` values); tuning then varies k or the tree."""
        from src.data.prompts import round_robin
        from src.lit.auto import CALIBRATION_PROMPTS, auto_methods, resolve

        module = self.module
        if not auto_methods(module.methods, module.method_keys, module.draft_spec)[1]:
            return
        prompts = [self.encode(prompt) for prompt in round_robin(self.prompts)[:CALIBRATION_PROMPTS]]
        resolve(module.methods, module.method_keys, module.pair, module.draft_spec, prompts, module.max_new_tokens, {})

    def chosen_method(self):
        from src.decoding import SpecExec, SpeculativeSampling

        for index, method in enumerate(self.module.methods):
            if isinstance(method, (SpeculativeSampling, SpecExec)):
                return index, method
        raise InvalidParameterError(f"{self.config_path} has no speculative or specexec method to tune: add one")

    def decode(self, method, prompts) -> list[dict[str, Any]]:
        from src.decoding.timing import timed_generate
        from src.results.records import ok_record

        module, records = self.module, []
        for prompt in prompts:
            draft = module.pair.draft.model if module.pair.draft is not None else None
            generation = timed_generate(method, module.pair.target.model, draft, self.encode(prompt),
                                        module.max_new_tokens, module.sampling, module.pair.eos_token_ids, None)
            records.append(ok_record({}, generation, ""))
        return records

    def encode(self, prompt):
        """The prompt's first turn as predict formats it (the config's chat template, system prompt, truncation)."""
        options = self.data.prompt_options()
        ids, _ = self.module.first_turn_ids(options, prompt.turns[0])
        return ids.to(self.module.input_device)

    def profile(self, widest: int, prompt):
        """T(n) in ms for n = 1..widest after a context of the prompt plus half the generation budget."""
        from src.decoding.profile import forward_latency, interpolate

        ids = self.encode(prompt)
        length = ids.shape[1] + self.module.max_new_tokens // 2
        context = ids.repeat(1, -(-length // ids.shape[1]))[:, :length]
        table = forward_latency(self.module.pair.target.model, context, range(1, widest + 1))
        return lambda n: interpolate(table, n)


def tune_chain(tuner: Tuner, method, ks: list[int], calibration) -> tuple[dict[int, tuple[float, float]], dict]:
    from src.decoding.profile import chain_prediction

    probe = copy.copy(method)
    probe.k = max(ks)
    records = tuner.decode(probe, calibration)
    totals = _totals(records)
    survival = survival_curve(records)
    draft_ms = 1000 * totals["draft_s"] / totals["draft_calls"] if totals["draft_calls"] else 0.0
    harness_ms = 1000 * totals["other_s"] / totals["target_calls"]
    target_ms = tuner.profile(max(ks) + 1, calibration[0])
    curve = {k: chain_prediction(survival, k, target_ms, draft_ms, harness_ms) for k in sorted(ks)}
    facts = {"survival": survival, "draft_ms_per_forward": draft_ms, "harness_ms_per_call": harness_ms,
             "T(1)": target_ms(1)}
    return curve, facts


def tune_tree(tuner: Tuner, method, shapes: list[tuple[int, int]], calibration):
    target_ms = tuner.profile(max(b for b, _ in shapes) + 1, calibration[0])
    curve = {}
    for budget, depth in shapes:
        probe = copy.copy(method)
        probe.budget, probe.max_depth = budget, depth
        totals = _totals(tuner.decode(probe, calibration))
        per_call = totals["new_tokens"] / totals["target_calls"]
        per_call_ms = target_ms(budget + 1) + 1000 * (totals["draft_s"] + totals["other_s"]) / totals["target_calls"]
        curve[budget, depth] = (per_call, 1000 * per_call / per_call_ms)
    return curve, {"T(1)": target_ms(1)}


def verify(tuner: Tuner, method, candidates: list, prompts, is_chain: bool) -> dict:
    """Measured tok/s of every candidate on ``prompts``, candidates interleaved per prompt."""
    tokens = dict.fromkeys(candidates, 0)
    seconds = dict.fromkeys(candidates, 0.0)
    for position, prompt in enumerate(prompts):
        shift = position % len(candidates)
        for candidate in candidates[shift:] + candidates[:shift]:
            probe = copy.copy(method)
            if is_chain:
                probe.k = candidate
            else:
                probe.budget, probe.max_depth = candidate
            (record,) = tuner.decode(probe, [prompt])
            tokens[candidate] += record["new_tokens"]
            seconds[candidate] += record["wall_s"]
        print(f"  verify prompt {position + 1}/{len(prompts)} done", file=sys.stderr, flush=True)
    return {c: tokens[c] / seconds[c] for c in candidates}


def write_config(source: str, index: int, values: dict[str, int], out: Path) -> Path:
    config = read_config(source)
    entry = methods_entry(config, source, index)
    entry.setdefault("init_args", {}).update(values)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"# tuned by python -m src.tools.tune from {source}: {values}\n"
    out.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_out(args.config, args.out)
        config = read_config(args.config)
        tuner = Tuner(args.config, args.max_new_tokens)
        index, method = tuner.chosen_method()
        methods_entry(config, args.config, index)
        from src.data.prompts import round_robin
        from src.decoding import SpecExec

        if not isinstance(method, SpecExec):
            check_ks(args.config, method, args.ks)
        tuner.load()

        ordered = round_robin(tuner.prompts)
        if len(ordered) < args.prompts + args.verify:
            raise InvalidParameterError(f"{args.config}'s prompt set has {len(ordered)} prompts: ask for "
                                        f"--prompts + --verify <= {len(ordered)}")
        calibration, held_out = ordered[: args.prompts], ordered[args.prompts: args.prompts + args.verify]
        started = time.perf_counter()
        is_chain = not isinstance(method, SpecExec)
        if is_chain:
            curve, facts = tune_chain(tuner, method, args.ks, calibration)
        else:
            curve, facts = tune_tree(tuner, method, args.trees, calibration)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    best = max(curve, key=lambda c: curve[c][1])
    print(f"calibration: {len(calibration)} prompts, {time.perf_counter() - started:.0f} s; "
          + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={[round(x, 3) for x in v]}"
                      for k, v in facts.items()))
    label = "k" if is_chain else "budget x max_depth"
    print(f"{label:>18} {'tok/call':>8} {'predicted tok/s':>15}")
    for candidate, (per_call, rate) in curve.items():
        name = str(candidate) if is_chain else f"{candidate[0]}x{candidate[1]}"
        print(f"{name:>18} {per_call:8.2f} {rate:15.2f}{'  <- best' if candidate == best else ''}")
    values = {"k": best} if is_chain else {"budget": best[0], "max_depth": best[1]}
    try:
        print(f"wrote {write_config(args.config, index, values, args.out)}")
    except OSError as error:  # checked before calibrating, but the disk may have changed since
        print(f"error: cannot write {args.out} ({error.strerror}): choose another --out; the tuned values are "
              f"{values}", file=sys.stderr)
        return 2
    if args.verify:
        measured = verify(tuner, method, list(curve), held_out, is_chain)
        top = max(measured, key=measured.get)
        print(f"verify: {len(held_out)} held-out prompts, candidates interleaved")
        for candidate, rate in measured.items():
            name = str(candidate) if is_chain else f"{candidate[0]}x{candidate[1]}"
            print(f"{name:>18} measured {rate:7.2f} tok/s, predicted {curve[candidate][1]:7.2f}"
                  + ("  <- pick" if candidate == best else "") + ("  <- measured best" if candidate == top else ""))
        print(f"the pick measured {measured[best]:.2f} tok/s = {measured[best] / measured[top]:.3f} of the measured "
              f"best ({measured[top]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
