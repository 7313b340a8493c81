#!/usr/bin/env bash
# Start the MLflow tracking server (UI, REST API and artifact proxy) for the pipeline.
#
# Lean by default (one worker, no job runner: about 10 s to start and 450 MB), bound to loopback.
# Artifacts go through the server (clients log to mlflow-artifacts:/) into S3. Everything comes from the
# environment; extra arguments are passed on to `mlflow server`.
#
#   MLFLOW_SERVER_HOST                  bind address                 (default 127.0.0.1)
#   MLFLOW_SERVER_PORT                  port                         (default 5000)
#   MLFLOW_SERVER_WORKERS               worker processes             (default 1)
#   MLFLOW_BACKEND_STORE_URI            runs and registry database   (default sqlite:///$QUANT_HOME/mlflow-server/mlflow.db)
#   MLFLOW_ARTIFACTS_DESTINATION        where artifacts are stored   (default s3://mlflow-artifacts)
#   MLFLOW_S3_ENDPOINT_URL              S3 endpoint for non-AWS S3 (MinIO, moto); unset = AWS
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION   S3 credentials (never written anywhere)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's background job runner (default false)
#   MLFLOW_CMD                          the mlflow executable        (default: mlflow on PATH)
#   QUANT_HOME                          state directory              (default <repo>/.state)
#
# Example (moto as S3):  moto_server -H 127.0.0.1 -p 9000 &
#   MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:9000 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://mlflow-artifacts mlflow/serve.sh
# The bucket must exist. Stop the server by signalling its process group.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
home="${QUANT_HOME:-$repo/.state}"

host="${MLFLOW_SERVER_HOST:-127.0.0.1}"
port="${MLFLOW_SERVER_PORT:-5000}"
workers="${MLFLOW_SERVER_WORKERS:-1}"
backend="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$home/mlflow-server/mlflow.db}"
destination="${MLFLOW_ARTIFACTS_DESTINATION:-s3://mlflow-artifacts}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

# A SQLite store needs its directory; other databases are created by their own server.
if [[ "$backend" == sqlite:///* ]]; then
    mkdir -p "$(dirname "${backend#sqlite:///}")"
fi
if [[ "$host" != "127.0.0.1" && "$host" != "localhost" && "$host" != "::1" ]]; then
    echo "serve.sh: binding to $host, beyond loopback: set --allowed-hosts and put authentication in front" >&2
fi

# The click options read the same variables; unset them so the command line below is the one truth.
unset MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION

exec ${MLFLOW_CMD:-mlflow} server \
    --host "$host" \
    --port "$port" \
    --workers "$workers" \
    --backend-store-uri "$backend" \
    --serve-artifacts \
    --artifacts-destination "$destination" \
    "$@"
