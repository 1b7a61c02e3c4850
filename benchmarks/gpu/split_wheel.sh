#!/usr/bin/env bash
# Download the GPU wheels that benchmarks/gpu/run_on_device.sh installs on the device machine, and split the
# onnxruntime-gpu one into parts that fit a device call (64 MiB travel per call, the repository included).
# Writes benchmarks/gpu/parts/ (ignored by git: one part travels per call, named in `carry`) and
# benchmarks/gpu/wheels.json (tracked: every wheel's and part's sha256, checked on the device).
# Usage: bash benchmarks/gpu/split_wheel.sh            (run from anywhere; needs PyPI)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
parts="$here/parts"
download="$(mktemp -d)"
trap 'rm -rf "$download"' EXIT
fetch() {
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$download" "$1"
}
fetch onnxruntime-gpu==1.31.1
fetch onnxruntime-genai-cuda==0.18.0
rm -rf "$parts"
mkdir -p "$parts"
python3 "$here/wheel_parts.py" split "$download"/onnxruntime_gpu-*.whl "$download"/onnxruntime_genai_cuda-*.whl \
  --out "$parts"
ls -l "$parts"
