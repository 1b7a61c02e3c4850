#!/usr/bin/env bash
# The one command of every device call for benchmarks/gpu.py (docs/gpu.md, "Running the GPU benchmark").
#
# Each call carries at most one part of benchmarks/gpu/parts/ (made here by split_wheel.sh) in the device
# tool's `carry`; this appends it under /tmp, which survives while calls follow each other before the machine
# goes back. The call that completes every wheel of benchmarks/gpu/wheels.json installs them into /tmp/site
# (onnxruntime-gpu 1.31.1 and onnxruntime-genai-cuda 0.18.0; they shadow the image's CPU onnxruntime) and
# runs the benchmark; later calls on the same warm machine go straight to the benchmark.
#
#   bash benchmarks/gpu/run_on_device.sh [benchmarks/gpu.py options, e.g. --sizes smollm2-135m]
#
# Results land in $OUT (gpu-<sizes>.json, .md, .png, and log.txt). Exit 0 also when a part was appended and
# more are to come (the output says which); 2: a damaged or out-of-order part (start again from part 0).
set -uo pipefail
cd "$(dirname "$0")/../.."
stage=/tmp/spexport-gpu-stage
site=/tmp/site
out="${OUT:-/tmp/spexport-gpu-out}"
mkdir -p "$out"

if [ ! -f "$site/.spexport-installed" ]; then
  python3 benchmarks/gpu/wheel_parts.py append benchmarks/gpu/parts "$stage" || exit $?
  python3 benchmarks/gpu/wheel_parts.py install "$stage" "$site"
  rc=$?
  if [ "$rc" = 10 ]; then
    echo "more parts to carry: call again at once with the next part (the machine keeps /tmp only while warm)"
    exit 0
  fi
  [ "$rc" = 0 ] || exit "$rc"
  touch "$site/.spexport-installed"
fi

# onnxruntime-gpu 1.31 links CUDA 13's libcudart, libcublas(Lt) and libcurand and loads cuDNN 9: the image has
# them as the nvidia-* wheels beside PyTorch, whose folders the dynamic linker is told about here.
nvidia_libs="$(python3 -c 'import glob, os, nvidia
print(":".join(sorted({os.path.dirname(p) for root in nvidia.__path__
                       for p in glob.glob(os.path.join(root, "**", "lib*.so*"), recursive=True)})))')"
export LD_LIBRARY_PATH="${nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import onnxruntime as ort, onnxruntime_genai as og
print("onnxruntime", ort.__version__, ort.get_available_providers(), "| genai", og.__version__)' || exit 3
python3 -m benchmarks.gpu --out "$out" "$@" 2>&1 | tee "$out/log.txt"
