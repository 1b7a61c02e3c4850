#!/usr/bin/env bash
# Build llama.cpp's llama-bench, llama-server and llama-quantize from the llama-cpp-python sdist on PyPI
# (its vendored llama.cpp), CPU only, into a cache folder. Nothing from the sdist is committed: this script
# downloads and builds it at run time, and does nothing when the binaries are already there.
#   benchmarks/build_llama_cpp.sh [CACHE]   (default /tmp/llama.cpp; binaries land in CACHE/build/bin)
set -euo pipefail
CACHE=${1:-${LLAMA_CPP_CACHE:-/tmp/llama.cpp}}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PY=${PYTHON:-python3}
BIN=$CACHE/build/bin
if [[ -x $BIN/llama-bench && -x $BIN/llama-server && -x $BIN/llama-quantize ]]; then
  echo "llama.cpp already built in $BIN"; exit 0
fi
mkdir -p "$CACHE"
if [[ ! -f $CACHE/src/CMakeLists.txt ]]; then
  # --no-binary for this package only: with :all: pip would build every build dependency from source too
  "$PY" -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$CACHE/dl"
  rm -rf "$CACHE/sdist" && mkdir -p "$CACHE/sdist"
  tar -xzf "$CACHE"/dl/llama_cpp_python-"$VERSION".tar.gz -C "$CACHE/sdist"
  rm -rf "$CACHE/src" && mv "$CACHE/sdist/llama_cpp_python-$VERSION/vendor/llama.cpp" "$CACHE/src"
  # convert_hf_to_gguf.py and gguf-py sit in src/; keep the sdist version for the results file
  echo "$VERSION" > "$CACHE/src/LLAMA_CPP_PYTHON_VERSION"
fi
nice -n 15 cmake -S "$CACHE/src" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=OFF -DGGML_METAL=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
  -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON
nice -n 15 cmake --build "$CACHE/build" --config Release -j2 --target llama-bench llama-server llama-quantize
ls -l "$BIN"/llama-bench "$BIN"/llama-server "$BIN"/llama-quantize
