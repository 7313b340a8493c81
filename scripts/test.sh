#!/usr/bin/env bash
# The test suite, in the repository's environment. Extra arguments go to pytest.
# Two pytest-xdist workers by default (QUANT_TEST_WORKERS: another count; 0 runs in this process): most
# slow tests wait on subprocesses, servers and imports, so two keep both cores busy.
set -euo pipefail
. "$(dirname "$0")/env.sh"
export QUANT_CACHE_DIR=${QUANT_CACHE_DIR:-$QUANT_HOME/cache}  # converted checkpoints are content-keyed: share them
export QUANT_HOME=$(mktemp -d -t quant-test-XXXX)  # tests never touch the embedded run's state
export AIRFLOW_HOME=$QUANT_HOME/airflow MLFLOW_TRACKING_URI=sqlite:///$QUANT_HOME/mlflow.db
trap 'rm -rf "$QUANT_HOME"' EXIT
# (the workers share the converted models: the first converts under a per-model lock, the other waits)
python -m pytest -q -n "${QUANT_TEST_WORKERS:-2}" "$@"
