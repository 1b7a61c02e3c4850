#!/usr/bin/env bash
# Build the native samples into samples/build/, fetching what they need from package registries.
#
#   samples/build.sh [cpp] [node] [cs]     (default: all three)
#
# Then, with the same arguments (<artifact_dir> <task_name> <max_new_tokens> <token ids...>):
#   samples/build/spexport-cpp ...
#   node samples/node/run.js ...
#   mono samples/build/spexport-cs.exe ...
#
# Idempotent: what is already there is kept, so a second run takes a second or two.
# Missing Debian packages are installed with apt-get when run as root; otherwise it says which.
set -euo pipefail

samples="$(cd "$(dirname "$0")" && pwd)"
build="$samples/build"
# ONNX Runtime's C/C++ headers are in no PyPI wheel and not in Debian 12. This npm package (ONNX
# Runtime for Unity) ships the official headers and the official Linux x64 libonnxruntime, both 1.29.
ORT_PACKAGE="com.github.asus4.onnxruntime@0.4.9"
ORT_HEADERS="package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64_x86_64-simulator/onnxruntime.framework/Headers"
ORT_LIB="package/Plugins/Linux/x64/libonnxruntime.so"

say() { echo "build.sh: $*" >&2; }

apt_install() {  # apt_install PACKAGE...: install the Debian packages that are missing
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "needs the Debian packages ${missing[*]} (or their equivalents); install them and run again"
    return 1
  fi
  say "installing ${missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

fetch_ort() {  # headers in $build/ort/include, libonnxruntime.so.1 in $build/ort/lib
  [ -f "$build/ort/lib/libonnxruntime.so.1" ] && [ -f "$build/ort/include/onnxruntime_cxx_api.h" ] && return 0
  command -v npm >/dev/null || apt_install npm
  say "fetching $ORT_PACKAGE (ONNX Runtime headers and library) from npm"
  local tmp
  tmp="$(mktemp -d "$build/.ort.XXXXXX")"
  (cd "$tmp" && npm pack --silent "$ORT_PACKAGE" >/dev/null && tar xzf ./*.tgz "$ORT_HEADERS" "$ORT_LIB")
  rm -rf "$build/ort" && mkdir -p "$build/ort/lib"
  mv "$tmp/$ORT_HEADERS" "$build/ort/include"
  # the library's soname is libonnxruntime.so.1: the loader looks for that name
  mv "$tmp/$ORT_LIB" "$build/ort/lib/libonnxruntime.so.1"
  ln -s libonnxruntime.so.1 "$build/ort/lib/libonnxruntime.so"
  rm -rf "$tmp"
}

build_cpp() {
  command -v cmake >/dev/null && command -v c++ >/dev/null || apt_install cmake g++ make
  [ -f /usr/include/nlohmann/json.hpp ] || apt_install nlohmann-json3-dev
  fetch_ort
  cmake -S "$samples/cpp" -B "$build/cpp" -DCMAKE_BUILD_TYPE=Release -DORT_ROOT="$build/ort" >/dev/null
  cmake --build "$build/cpp" -j "$(nproc)" >/dev/null
  cp -p "$build/cpp/spexport-cpp" "$build/spexport-cpp"
  say "built $build/spexport-cpp"
}

build_node() {
  command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
  if [ ! -f "$samples/node/node_modules/onnxruntime-node/package.json" ]; then
    say "installing onnxruntime-node from npm"
    # its install script would download GPU libraries; the CPU library ships in the package
    (cd "$samples/node" && ONNXRUNTIME_NODE_INSTALL=skip npm install --silent --no-audit --no-fund --no-package-lock)
  fi
  say "node sample ready: node $samples/node/run.js"
}

build_cs() {
  command -v mcs >/dev/null && command -v mono >/dev/null || apt_install mono-mcs mono-runtime
  fetch_ort
  local exe="$build/spexport-cs.exe" sources=("$samples"/csharp/*.cs)
  if [ ! -f "$exe" ] || [ -n "$(find "${sources[@]}" -newer "$exe")" ]; then
    mcs -langversion:7 -optimize+ -out:"$exe" "${sources[@]}"
  fi
  # mono finds the native library through this map (the sample's DllImport name is "onnxruntime")
  cat > "$exe.config" <<EOF
<configuration>
  <dllmap dll="onnxruntime" target="$build/ort/lib/libonnxruntime.so.1" />
</configuration>
EOF
  say "built $exe"
}

mkdir -p "$build"
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(cpp node cs)
for target in "${targets[@]}"; do
  case "$target" in
    cpp) build_cpp ;;
    node) build_node ;;
    cs) build_cs ;;
    *) say "unknown sample '$target' (choose from cpp, node, cs)"; exit 2 ;;
  esac
done
