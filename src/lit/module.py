"""DecodingModule: runs every configured method on each prompt as one predict step and returns the records."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
import zlib
from typing import Any

import lightning as L
import torch

from src.data.answers import answers_match, extract_answer
from src.data.progress import still_running
from src.data.prompts import encode_messages, round_robin, truncate_left
from src.decoding.base import DecodingMethod, model_logits, vocab_width
from src.decoding.baseline import Baseline
from src.decoding.kv import new_cache
from src.decoding.profile import measure_profile, predict
from src.decoding.sampling import SamplingConfig, make_generator
from src.decoding.timing import timed_generate
from src.errors import InvalidParameterError
from src.lit.auto import CALIBRATION_PROMPTS, apply_reused, auto_methods, resolve, reused_choices
from src.lit.system import system_info
from src.models.loading import load_tokenizer
from src.models.pair import ModelPair, load_pair
from src.models.spec import ModelSpec
from src.models.tokenizer_guard import check_tokenizers
from src.results.keys import describe, method_keys
from src.results.records import (
    classify_divergence,
    compare_with_baseline,
    error_record,
    fingerprint_id,
    near_tie_tolerance,
    ok_record,
    prompt_sha,
    resume_key,
)

log = logging.getLogger(__name__)

WARMUP_TOKENS = 4
# The prompt options of a batch (see PromptDataModule.prompt_options) that change what a model is given.
PROMPT_OPTION_DEFAULTS = {"chat_template": True, "system_prompt": None, "max_prompt_tokens": None}
SEED_RANGE = (0, 2**32 - 1)  # what Lightning's seed_everything (numpy) accepts: --model.seed seeds it too


def check_seed(seed: int) -> None:
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise InvalidParameterError(f"seed={seed} is invalid: use an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}")
DEFAULT_PRECISION = "32-true"
# The Lightning precisions predict runs under: the default, and autocast, which changes every matmul's numerics
# (so it is in the fingerprint) and the dtype whose rounding a near tie is judged by. A "-true" precision casts
# only modules Lightning can see: the models live in a plain holder (src.models.pair), so it would change
# nothing but torch's default dtype inside predict_step; it is refused in favour of model.target.dtype.
AUTOCAST_DTYPES = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}


class DecodingModule(L.LightningModule):
    """Decode prompts with one or more methods on a target (and draft) model.

    Args:
        target: the target model (its output distribution is what lossless methods reproduce).
        draft: the draft model, required by speculative methods (tokenizer must match the target's).
        methods: decoding methods to run on every prompt, back to back (default: the baseline alone).
        max_new_tokens: generation budget per prompt.
        temperature: 0 for greedy decoding, > 0 to sample.
        top_k: keep only the k most likely tokens when sampling (0 disables).
        top_p: nucleus sampling mass (1.0 disables).
        seed: base seed; each (prompt, turn) gets its own generator seeded from it, identical for every method.
        warmup: run one short untimed generation per method before the first prompt.
        cost_profile: before the first prompt, measure the target's (and draft's) forward latency for 1..n tokens
            and each model-free drafter's step (:mod:`src.decoding.profile`; 20-45 s on a 2-core CPU); every record then
            carries the profile and its predicted time (``predicted_*``, ``unexplained_share``).
    """

    def __init__(
        self,
        target: ModelSpec = ModelSpec(),
        draft: ModelSpec | None = None,
        methods: list[DecodingMethod] | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        warmup: bool = True,
        cost_profile: bool = True,
    ) -> None:
        super().__init__()
        if max_new_tokens < 1:
            raise InvalidParameterError(f"max_new_tokens={max_new_tokens} is invalid: use a value >= 1")
        check_seed(seed)
        self.target_spec = target
        self.draft_spec = draft.resolved_against(target) if draft is not None else None
        self.methods = list(methods) if methods else [Baseline()]
        self.method_keys = method_keys([describe(m) for m in self.methods])
        if len(set(self.method_keys)) != len(self.method_keys):
            raise InvalidParameterError(f"methods {self.method_keys} are configured twice: give each entry different parameters")
        self.max_new_tokens = max_new_tokens
        self.sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
        self.seed = seed
        self.warmup = warmup
        self.cost_profile = cost_profile
        self.profile = None  # a src.decoding.profile.CostProfile, measured at the first prompt
        self._profile_json: dict[str, Any] | None = None  # its record form, built once
        self._profile_tried = False
        self.run_id = uuid.uuid4().hex[:12]
        self.previous_records: dict[str, dict[str, Any]] = {}  # resume_key -> ok record from an earlier run
        self.auto_choices: dict[str, dict[str, Any]] = {}  # method key -> what its `auto` resolved to (src.lit.auto)
        self.pair: ModelPair | None = None  # a plain holder: Lightning must not move or cast these models
        self._tokenizer = None  # loaded alone (cheap) when a fingerprint is needed before the models load
        self._fingerprints: dict[str, dict[str, dict[str, Any]]] = {}  # prompt options (JSON) -> method key -> fp
        for method in self.methods:
            if method.needs_draft and draft is None:
                raise InvalidParameterError(
                    f"method {method.name!r} needs a draft model but model.draft is not set: add a draft preset, "
                    "e.g. --config configs/models/smollm2-135m-bf16.yaml"
                )

    @staticmethod
    def recorded_params(method: DecodingMethod) -> dict[str, Any]:
        """The method's parameters as its records carry them (src.results.keys)."""
        return describe(method)[1]

    # ---- set-up -------------------------------------------------------------------------------------------
    def ensure_pair(self, with_draft: bool = False) -> ModelPair:
        """Load the target (and the draft, when a method needs it or ``with_draft``) once. A draft with
        ``quantization: auto`` is only checked here (its tokenizer): the copy is chosen and loaded at run start
        (:mod:`src.lit.auto`)."""
        if self.pair is None:
            needs_draft = any(m.needs_draft for m in self.methods) or with_draft
            draft = self.draft_spec if needs_draft else None
            if draft is not None and draft.quantization == "auto":
                check_tokenizers(load_tokenizer(self.target_spec), load_tokenizer(draft),
                                 self.target_spec.describe(), draft.describe())
                self.pair = load_pair(self.target_spec, None)
            else:
                self.pair = load_pair(self.target_spec, draft)
        return self.pair

    def setup(self, stage: str) -> None:
        self.autocast_precision()  # refuses a precision that would not reach the models, before they load
        pair = self.ensure_pair()
        self._check_generation_budget()
        for method in self.methods:  # e.g. AutoJudge loads its judge and checks it was trained for this pair
            method.prepare(pair.target.info, pair.draft.info if pair.draft is not None else None)

    def autocast_precision(self) -> str | None:
        """The trainer's autocast precision (``bf16-mixed``, ``16-mixed``), None for the default float32 run (or
        no trainer); refuses any other precision (see :data:`AUTOCAST_DTYPES`)."""
        precision = str(self._trainer.precision) if self._trainer is not None else DEFAULT_PRECISION
        if precision in (DEFAULT_PRECISION, "32"):
            return None
        if precision in AUTOCAST_DTYPES:
            return precision
        raise InvalidParameterError(
            f"--trainer.precision {precision} does not reach the models (predict loads them itself in "
            "model.target.dtype): set --model.target.dtype (and --model.draft.dtype) instead, e.g. bfloat16, or use "
            f"one of {sorted(AUTOCAST_DTYPES)} for autocast"
        )

    def context_length(self) -> int | None:
        """The fewest positions any loaded model holds (``max_position_embeddings``); None when none says."""
        models = [self.pair.target.model] + ([self.pair.draft.model] if self.pair.draft is not None else [])
        lengths = [getattr(getattr(m, "config", None), "max_position_embeddings", None) for m in models]
        known = [n for n in lengths if isinstance(n, int) and n > 0]
        return min(known) if known else None

    def _check_generation_budget(self) -> None:
        """A budget no prompt fits is refused before decoding, as vLLM refuses max_tokens beyond max_model_len
        (HF generate would decode past the position table into noise)."""
        context = self.context_length()
        if context is not None and self.max_new_tokens >= context:
            raise InvalidParameterError(
                f"max_new_tokens={self.max_new_tokens} does not fit the model's context of {context} tokens "
                f"(max_position_embeddings), which also holds the prompt: use max_new_tokens below {context}"
            )

    def _context_overflow(self, prompt_id: str, turn: int, prompt_tokens: int) -> InvalidParameterError | None:
        """The error of a turn whose prompt plus budget exceeds the context (recorded; the run goes on)."""
        context = self.context_length()
        if context is None or prompt_tokens + self.max_new_tokens <= context:
            return None
        return InvalidParameterError(
            f"prompt {prompt_id} turn {turn}: {prompt_tokens} prompt tokens + max_new_tokens {self.max_new_tokens} "
            f"exceed the model's context of {context} tokens: set --data.max_prompt_tokens "
            f"{max(1, context - self.max_new_tokens)} (keeps the prompt's end) or lower --model.max_new_tokens"
        )

    # ---- run identity -------------------------------------------------------------------------------------
    def input_files(self) -> list[str]:
        """Files the methods read (judges, heads): hashed into fingerprints, never overwritten by results."""
        return [path for method in self.methods for path in method.input_files()]

    def chat_template_sha(self) -> str | None:
        """SHA-1 of the target tokenizer's chat template (None without one); loads the tokenizer alone if needed."""
        if self.pair is not None:
            tokenizer = self.pair.tokenizer
        else:
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(self.target_spec)
            tokenizer = self._tokenizer
        template = getattr(tokenizer, "chat_template", None)
        return hashlib.sha1(json.dumps(template, sort_keys=True).encode()).hexdigest()[:12] if template else None

    def fingerprints(self, prompt_options: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """``method key -> run fingerprint``: everything that changes a method's output on a given prompt.

        Models (name, revision, dtype, quantization, device type, device map, attention), the prompt formatting
        (chat template on/off and its hash, system prompt, truncation), sampling, the method's parameters and the
        hashes of the files it reads, and an autocast precision (``precision``, only when set: records of float32
        runs written before it was recorded keep their fingerprint). Not the turn count (the turn is in the resume
        key), the prompt text (its hash ends the resume key) nor ``warmup``.
        """
        options = {name: prompt_options.get(name, default) for name, default in PROMPT_OPTION_DEFAULTS.items()}
        precision = self.autocast_precision()
        cache_key = json.dumps([options, precision], sort_keys=True)
        if cache_key not in self._fingerprints:
            prompt = {**options, "chat_template_sha": self.chat_template_sha() if options["chat_template"] else None}
            self._fingerprints[cache_key] = {
                key: {
                    "method": key,
                    "params": self._params(method),
                    "target": self.target_spec.identity(),
                    "draft": self.draft_spec.identity() if method.needs_draft and self.draft_spec else None,
                    "prompt": prompt,
                    "files": {path: _file_sha256(path) for path in method.input_files()},
                    **({"precision": precision} if precision else {}),
                }
                for method, key in zip(self.methods, self.method_keys)
            }
        return self._fingerprints[cache_key]

    @property
    def input_device(self) -> torch.device:
        return self.pair.target.model.get_input_embeddings().weight.device

    def on_predict_start(self) -> None:
        self._resolve_auto_choices()
        if not self.warmup:
            return
        input_ids = torch.tensor([[self.pair.tokenizer.bos_token_id or 0, 1, 2, 3]], device=self.input_device)
        for method in self.methods:
            self._generate(method, input_ids, WARMUP_TOKENS, seed=self.seed)

    def _resolve_auto_choices(self) -> None:
        """``auto`` parameters and an ``auto`` draft copy, chosen on rank 0 at the run's first prompt (or read back
        from the results file on a resume) and shared with every rank (:mod:`src.lit.auto`)."""
        auto, draft_auto = auto_methods(self.methods, self.method_keys, self.draft_spec)
        if not auto:
            return
        trainer = self.trainer
        choices = None
        if trainer.is_global_zero:
            data = trainer.datamodule
            options = data.prompt_options()
            prompts = round_robin(data.load_prompts())[:CALIBRATION_PROMPTS]  # one per category first
            calibration = [self.first_turn_ids(options, prompt.turns[0])[0].to(self.input_device) for prompt in prompts]
            ids = {key: fingerprint_id(fp) for key, fp in self.fingerprints(options).items()}
            with still_running("auto"):
                choices = resolve(self.methods, self.method_keys, self.pair, self.draft_spec, calibration,
                                  self.max_new_tokens, reused_choices(self.previous_records, ids))
        choices = trainer.strategy.broadcast(choices, src=0)
        if not trainer.is_global_zero:
            apply_reused(auto, self.pair, self.draft_spec, choices, draft_auto, source=None)
        self.auto_choices = choices

    # ---- decoding -----------------------------------------------------------------------------------------
    def _generate(self, method: DecodingMethod, input_ids: torch.Tensor, max_new_tokens: int, seed: int):
        draft = self.pair.draft.model if self.pair.draft is not None else None
        generator = make_generator(seed, device="cpu")
        return timed_generate(  # method.generate, with its time split into target / draft / other
            method, self.pair.target.model, draft, input_ids, max_new_tokens, self.sampling, self.pair.eos_token_ids,
            generator,
        )

    def _measure_profile(self, input_ids: torch.Tensor) -> None:
        """The cost profile, once, at the run's first prompt: forwards after a context of the prompt plus half the
        generation budget (the mean context a decoding step sees)."""
        if not self.cost_profile or self._profile_tried:
            return
        self._profile_tried = True
        context_length = input_ids.shape[1] + self.max_new_tokens // 2
        context = input_ids.repeat(1, -(-context_length // max(1, input_ids.shape[1])))[:, :context_length]
        target, draft = self.pair.target.model, self.pair.draft.model if self.pair.draft is not None else None
        drafters = [d for d in (getattr(m, "drafter", None) for m in self.methods) if d is not None]
        try:
            with still_running("cost profile", enabled=self.trainer.is_global_zero if self._trainer else True):
                self.profile = measure_profile(
                    target, draft if any(m.needs_draft for m in self.methods) else None, drafters,
                    context.to(self.input_device), max(m.verify_width() for m in self.methods), input_ids.shape[1],
                    vocab_width(target), trees=any(m.verifies_trees for m in self.methods))
        except Exception as error:  # a profile is an explanation, never a reason to lose the run
            log.warning("cost profile not measured (%s: %s): records carry no predictions", type(error).__name__, error)
            return
        self._profile_json = self.profile.to_json()
        log.info("cost profile: %d sizes of the target in %.1f s", len(self.profile.target_ms), self.profile.measured_s)

    def _prompt_seed(self, prompt_id: str, turn: int) -> int:
        return (self.seed * 1_000_003 + zlib.crc32(f"{prompt_id}/{turn}".encode())) % (2**63)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """All methods on one prompt, method order rotated per prompt to spread machine drift across methods.

        With two turns, each method's second turn is conditioned on its *own* first answer (as in Spec-Bench).
        """
        order = [(batch_idx + i) % len(self.methods) for i in range(len(self.methods))]
        history: dict[int, list[dict[str, str]] | None] = {i: self._system_messages(batch) for i in order}
        new_records: list[dict[str, Any]] = []
        for turn, user_text in enumerate(batch["turns"][: batch.get("num_turns", 1)], start=1):
            turn_records, reused = [], []
            for index in order:
                record, reused_record = self._run_turn(batch, batch_idx, turn, user_text, index, history)
                if record is not None:
                    turn_records.append(record)
                if reused_record is not None:
                    reused.append(reused_record)
            compare_with_baseline(turn_records, self.sampling.greedy, reference=reused)
            if turn == 1:  # later turns follow each method's own earlier answers: other prompts, nothing to class
                self._classify_divergences(batch, user_text, turn_records, reused)
            new_records += turn_records
        return new_records

    @torch.no_grad()
    def _classify_divergences(self, batch, user_text: str, records: list[dict[str, Any]], reused) -> None:
        """A lossless method whose greedy tokens leave the baseline's: near tie or mismatch? One target forward
        over the prompt + the baseline's tokens before the divergence gives the top-1 / top-2 logit margin."""
        baseline = next((r for r in [*records, *reused] if r["method"] == "baseline" and r["status"] == "ok"), None)
        if baseline is None:
            return
        lossless = {key: method.lossless for key, method in zip(self.method_keys, self.methods)}
        messages = self._system_messages(batch) + [{"role": "user", "content": user_text}]
        prompt = None
        for record in records:
            if record.get("matches_baseline") is not False or not lossless.get(record["method"], False):
                continue
            if prompt is None:
                prompt, _ = self._prompt_ids(batch, messages)
            prefix = baseline["tokens"][: record["first_divergence"]]
            ids = torch.cat([prompt, torch.tensor([prefix], dtype=prompt.dtype)], dim=1).to(self.input_device)
            top = model_logits(self.pair.target.model, ids, new_cache(), logits_to_keep=1)[0, -1].float().topk(2)
            info = self.pair.target.info
            precision = self.autocast_precision()
            dtype = AUTOCAST_DTYPES[precision] if precision else info.get("dtype")  # autocast rounds as its dtype
            classify_divergence(record, float(top.values[0] - top.values[1]),
                                near_tie_tolerance(dtype, info.get("quantization")))

    def _prompt_ids(self, batch: dict[str, Any], messages: list[dict[str, str]]) -> tuple[torch.Tensor, int]:
        """Token ids (1, n) of a conversation as the batch's prompt options format it, and the tokens truncation
        dropped from its start."""
        input_ids = encode_messages(self.pair.tokenizer, messages, batch.get("chat_template", True))
        return truncate_left(input_ids, batch.get("max_prompt_tokens"))

    @staticmethod
    def _system_messages(batch: dict[str, Any]) -> list[dict[str, str]]:
        return [{"role": "system", "content": batch["system_prompt"]}] if batch.get("system_prompt") else []

    def first_turn_ids(self, options: dict[str, Any], user_text: str) -> tuple[torch.Tensor, int]:
        """A first turn formatted exactly as predict formats it (``options``: the data module's prompt options:
        chat template, system prompt, truncation): token ids (1, n) and the tokens truncation dropped. Label
        mining and the tune tool encode their prompts through this, so they see what predict decodes."""
        return self._prompt_ids(options, self._system_messages(options) + [{"role": "user", "content": user_text}])

    def _run_turn(self, batch, batch_idx, turn, user_text, index, history):
        """Decode one turn with one method; returns (new record or None, reused record or None)."""
        method, method_key = self.methods[index], self.method_keys[index]
        messages = history[index]
        if messages is None:  # this method's previous turn failed: the conversation cannot go on
            common = self._common_fields(batch, turn, method, method_key, prompt_tokens=0)
            return error_record(common, RuntimeError(f"turn {turn - 1} of {method_key} failed; turn {turn} skipped")), None
        messages = messages + [{"role": "user", "content": user_text}]
        input_ids, dropped = self._prompt_ids(batch, messages)
        common = self._common_fields(batch, turn, method, method_key, input_ids.shape[1])
        previous = self._previous_record(common)
        overflow = self._context_overflow(batch["prompt_id"], turn, input_ids.shape[1])
        if overflow is not None and previous is None:
            log.warning("%s", overflow)
            history[index] = None
            return error_record(common, overflow), None
        self._measure_profile(input_ids)
        if dropped:
            log.warning("prompt %s turn %d: dropped its first %d tokens (max_prompt_tokens)", batch["prompt_id"], turn, dropped)
        if previous is not None:  # --resume: done in an earlier run
            history[index] = messages + [{"role": "assistant", "content": previous["text"]}]
            return None, previous
        try:
            generation = self._generate(
                method, input_ids.to(self.input_device), self.max_new_tokens, self._prompt_seed(batch["prompt_id"], turn)
            )
            text = self.pair.tokenizer.decode(generation.tokens, skip_special_tokens=True)
        except Exception as error:  # one failing (prompt, method) must not end the run
            log.exception("method %s failed on prompt %s turn %d", method_key, batch["prompt_id"], turn)
            history[index] = None
            return error_record(common, error), None
        history[index] = messages + [{"role": "assistant", "content": text}]
        record = ok_record(common, generation, text)
        record["prompt_truncated_tokens"] = dropped
        if self.profile is not None:
            record.update(predict(record, self.profile, _model_free_drafter(method), method.verifies_trees),
                          cost_profile=self._profile_json)
        record.update(self._answer_fields(batch, method, text))
        return record, None

    def _previous_record(self, common: dict[str, Any]) -> dict[str, Any] | None:
        """The ok record of an earlier run for this turn: by its key, which ends in the prompt text's hash, or by
        the key without it for a record written before records carried ``prompt_sha``. Such a record's text is
        unknown: it is trusted as the older runs' resume did, since nothing says it is wrong."""
        previous = self.previous_records.get(common["resume_key"])
        if previous is not None:
            return previous
        legacy_key = common["resume_key"].rsplit("/", 1)[0]
        legacy = self.previous_records.get(legacy_key)
        return legacy if legacy is not None and "prompt_sha" not in legacy else None

    @staticmethod
    def _answer_fields(batch: dict[str, Any], method: DecodingMethod, text: str) -> dict[str, Any]:
        """``answer`` / ``answer_correct`` for tasks with a gold final answer (and every autojudge record)."""
        gold = batch.get("answer")
        if gold is None and method.name != "autojudge":
            return {}
        answer = extract_answer(text, batch.get("answer_extractor") or "gsm8k")
        return {"answer": answer, "answer_correct": None if gold is None else answers_match(answer, gold)}

    def _params(self, method: DecodingMethod) -> dict[str, Any]:
        return {
            **self.recorded_params(method),
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.sampling.temperature,
            "top_k": self.sampling.top_k,
            "top_p": self.sampling.top_p,
            "seed": self.seed,
        }

    def _common_fields(self, batch: dict[str, Any], turn: int, method: DecodingMethod, method_key: str, prompt_tokens: int):
        fingerprint = self.fingerprints(batch)[method_key]
        text_sha = prompt_sha(list(batch["turns"][:turn]))
        return {
            "run_id": self.run_id,
            "resume_key": resume_key(batch["dataset"], batch["prompt_id"], turn, method_key, fingerprint, text_sha),
            "method": method_key,
            "dataset": batch["dataset"],
            "prompt_id": batch["prompt_id"],
            "category": batch["category"],
            "turn": turn,
            "prompt_sha": text_sha,
            "prompt_tokens": prompt_tokens,
            # an `auto` parameter: the value chosen at run start (the fingerprint keeps `auto`, which a resume matches)
            "params": {**fingerprint["params"], **self.auto_choices.get(method_key, {}).get("values", {})},
            "fingerprint_id": fingerprint_id(fingerprint),
            "fingerprint": fingerprint,
            "target": self.pair.target.info,
            "draft": self.pair.draft.info if (method.needs_draft and self.pair.draft) else None,
            "system": system_info(self.input_device),
            **({"auto_choice": self.auto_choices[method_key]} if method_key in self.auto_choices else {}),
        }


def _model_free_drafter(method: DecodingMethod) -> str | None:
    """The name of a method's drafter when it has no draft model (an EAGLE head, a lookup): the profile prices
    its steps, not draft forwards."""
    drafter = getattr(method, "drafter", None)
    return drafter.name if drafter is not None and not drafter.needs_draft_model else None


def _file_sha256(path: str) -> str | None:
    """SHA-256 of a file (None when it does not exist: the method that needs it then refuses to start)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        return None
    return digest.hexdigest()
