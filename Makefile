# sp-samp: every entry point a newcomer needs. `make help` lists them.
# Set-up runs on first use of any target that needs it; it is idempotent and quick afterwards.

VENV            ?= .venv
PYTHON          ?= python3
TORCH_VERSION   ?= 2.13.0
TORCH_INDEX_URL ?=
CONFIG          ?= configs/specexec.yaml
ARGS            ?=
PY              := $(VENV)/bin/python
SETUP_ENV       := VENV=$(VENV) PYTHON=$(PYTHON) TORCH_VERSION=$(TORCH_VERSION) TORCH_INDEX_URL=$(TORCH_INDEX_URL)

.PHONY: help setup predict autojudge eagle eagle1 report test test-all lint list-presets clean docker-build docker-build-gpu docker-predict

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

setup:  ## create .venv, install pinned torch, the project, the embedded model and MT-Bench
	@$(SETUP_ENV) bash scripts/setup.sh

predict: setup  ## decode MT-Bench with the default config (CONFIG=..., ARGS="--data.limit 3")
	$(PY) -m src predict --config $(CONFIG) $(ARGS)

autojudge: setup  ## AutoJudge: mine labels + train the judge (fit), then decode held-out problems with it (predict)
	$(PY) -m src fit --config configs/autojudge.yaml $(ARGS)
	$(PY) -m src predict --config configs/autojudge.yaml $(ARGS)

eagle: setup  ## EAGLE-3 (the better recipe here, README): features + train the head (fit), decode MT-Bench (predict)
	$(PY) -m src fit --config configs/eagle.yaml $(ARGS)
	$(PY) -m src predict --config configs/eagle.yaml $(ARGS)

eagle1: setup  ## the EAGLE-1/2 recipe (configs/eagle1.yaml): fit, then predict
	$(PY) -m src fit --config configs/eagle1.yaml $(ARGS)
	$(PY) -m src predict --config configs/eagle1.yaml $(ARGS)

report: setup  ## summarise datasets/results.jsonl into reports/ (report.md, report.html, PNGs; ARGS="--seed 1")
	$(PY) -m src.report datasets/results.jsonl --out reports $(ARGS)

test: setup  ## run the default test suite (everything but tests marked slow), two workers, one test file each
	$(PY) -m pytest -m "not slow" -q -n 2 --dist loadfile $(ARGS)

test-all: setup  ## run every test, the slow end-to-end ones included
	$(PY) -m pytest -q $(ARGS)

lint: setup  ## ruff over the code, the tests and the benchmarks
	$(PY) -m ruff check src tests benchmarks

list-presets:  ## list the shipped configs and model presets, one line each
	@for f in configs/*.yaml configs/models/*.yaml; do \
		printf "  %-44s %s\n" "$$f" "$$(grep -m1 '^#' $$f | sed 's/^# *//')"; done

IMAGE           ?= sp-samp
docker-build:  ## build the CPU image (runs scripts/setup.sh inside; embedded model converted at build time)
	docker build -t $(IMAGE) .

docker-build-gpu:  ## build the CUDA image (torch from TORCH_INDEX_URL, default cu124 wheels; bitsandbytes)
	docker build -f Dockerfile.gpu -t $(IMAGE)-gpu $(if $(TORCH_INDEX_URL),--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL),) .

docker-predict:  ## predict in the CPU image, ./datasets mounted (prompts in, results out; needs `make setup` first)
	docker run --rm -v $(CURDIR)/datasets:/app/datasets $(IMAGE) \
		predict --config $(CONFIG) --output datasets/results.jsonl $(ARGS)

clean:  ## remove caches and build outputs (keeps .venv, datasets/ and results)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info lightning_logs
