#!/usr/bin/env bash
# Build llama.cpp's own tools once and cache them: llama-quantize (the gguf backend's quantizer),
# llama-imatrix, llama-perplexity and llama-server, with their shared libraries (which llama-cpp-python
# also loads: one llama.cpp for quantizing, evaluating and serving). The source is the llama.cpp tree that
# the pinned llama-cpp-python source release vendors (PyPI is the one reachable source here); no network
# at run time. Usage: scripts/build-llama-cpp.sh [CACHE_DIR]; prints the directory holding bin/ and lib/.
set -euo pipefail
VERSION=0.3.36        # llama-cpp-python, whose vendor/llama.cpp is llama.cpp b11312 (commit 0c1e57098)
LLAMA_BUILD=b11312
CACHE=${1:-${QUANT_LLAMA_CPP_DIR:-$HOME/.cache/quantpipe/llama.cpp/$LLAMA_BUILD}}
TOOLS="llama-quantize llama-imatrix llama-perplexity llama-server"
if [ -x "$CACHE/bin/llama-quantize" ] && [ -f "$CACHE/.complete" ]; then
  echo "$CACHE"; exit 0
fi
command -v cmake >/dev/null || { echo "error: building llama.cpp needs cmake (apt-get install cmake)" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/llama-cpp-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
PY=${PYTHON:-python3}
"$PY" -m pip download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$VERSION" >&2
tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
started=$(date +%s)
echo "llama.cpp $LLAMA_BUILD: building $TOOLS (once; about 10 minutes on 2 cores) ..." >&2
# GGML_NATIVE=OFF: portable x86-64 kernels (AVX2/FMA/F16C), so a cache copied to another CPU still runs.
# The tools find their libraries beside them ($ORIGIN/../lib), wherever the cache lives.
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF \
  -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON "-DCMAKE_INSTALL_RPATH=\$ORIGIN/../lib" \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF >/dev/null
cmake --build "$work/build" --target $TOOLS -j "$(nproc)" >/dev/null
rm -rf "$CACHE.partial" && mkdir -p "$CACHE.partial/bin" "$CACHE.partial/lib"
for tool in $TOOLS; do cp "$work/build/bin/$tool" "$CACHE.partial/bin/"; done
find "$work/build" -name 'lib*.so*' -exec cp -P {} "$CACHE.partial/lib/" \;
# llama.cpp's own HF -> GGUF converter, with the gguf-py of the same tree (the gguf backend's first step).
cp -r "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" "$CACHE.partial/"
echo "llama.cpp $LLAMA_BUILD (llama-cpp-python $VERSION), built in $(( $(date +%s) - started )) s" > "$CACHE.partial/.complete"
rm -rf "$CACHE" && mkdir -p "$(dirname "$CACHE")" && mv "$CACHE.partial" "$CACHE"
echo "$CACHE"
