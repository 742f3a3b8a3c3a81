#!/usr/bin/env bash
# Create .venv-peer at the repo root: a separate virtual environment holding llm-compressor,
# the peer of fxcompress in benchmarks/peer_llmcompressor.py, so that its pins
# (transformers<=5.17, compressed-tensors==0.19.0, ...) never touch the project's own env.
#
#   bash benchmarks/peer_setup.sh            # then:
#   .venv-peer/bin/python benchmarks/peer_llmcompressor.py --help
#
# torch is installed first and pinned to 2.13.0: on these machines pip takes that release from
# a local CPU wheel, while any other torch release (or a range pip is free to resolve upward)
# pulls a multi-GB CUDA build. With torch==2.13.0 already present, llmcompressor's range
# (torch>=2.10.0,<=2.14.0 for 0.14.0.1) is satisfied and pip installs no other torch; the
# constraint file below makes that explicit for every later step too.
#
# llmcompressor 0.14.0.1 is the newest release (checked 2026-11) and accepts torch 2.13.0
# (it asks torch>=2.10,<=2.14.0, transformers>=5.15,<=5.17); it is pinned so the peer numbers
# stay reproducible. Versions seen after a clean install (about 1.5 min):
#   torch 2.13.0+cpu, llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0,
#   accelerate 1.16.0, datasets 5.2.0, auto-round 0.15.1, safetensors 0.8.0, numpy 2.4.6
# (auto-round, the peer of benchmarks/peer_autoround.py, comes with llmcompressor)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-peer"
PYTHON="${PYTHON:-python3}"
LLMCOMPRESSOR_VERSION="0.14.0.1"
TORCH_VERSION="2.13.0"

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "torch==$TORCH_VERSION"
"${PIP[@]}" install -c "$CONSTRAINTS" "llmcompressor==$LLMCOMPRESSOR_VERSION" psutil

# Fail loudly if anything replaced the CPU torch or dragged in CUDA wheels.
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torch

assert torch.__version__ == "2.13.0+cpu", f"unexpected torch {torch.__version__}"
assert torch.version.cuda is None, f"CUDA torch installed: {torch.version.cuda}"
cuda = sorted(d.metadata["Name"] for d in md.distributions()
              if d.metadata["Name"].lower().startswith(("nvidia-cu", "nvidia-cudnn", "triton")))
assert not cuda, f"CUDA packages pulled in: {cuda}"
for name in ("torch", "llmcompressor", "compressed-tensors", "transformers", "accelerate",
             "datasets", "auto-round", "safetensors", "numpy"):
    print(f"{name}=={md.version(name)}")
EOF
