#!/usr/bin/env bash
# The embedded run: the quantization_pipeline DAG executed by `airflow dags test` on this machine
# (SQLite metadata DB in $QUANT_HOME/airflow, MLflow on SQLite in $QUANT_HOME/mlflow, tasks in-process).
# Usage: scripts/run-embedded.sh ['<json conf>']    e.g. '{"model": "/path/to/checkpoint"}'
set -uo pipefail
. "$(dirname "$0")/env.sh"
CONF=${1:-${CONF:-"{}"}}
[ -n "$CONF" ] || CONF="{}"
LOG=$QUANT_HOME/logs/embedded-$(date +%Y%m%d-%H%M%S).log
mkdir -p "$(dirname "$LOG")"

# Bad input stops here with one line, before Airflow starts: config, model, architecture.
python -m tasks pipeline --check --config "$CONF" || exit 2

if [ ! -f "$AIRFLOW_HOME/.migrated" ]; then
  echo "airflow: creating the metadata database in $AIRFLOW_HOME ..."
  airflow db migrate >"$AIRFLOW_HOME/migrate.log" 2>&1 || { echo "error: airflow db migrate failed (see $AIRFLOW_HOME/migrate.log)" >&2; exit 1; }
  touch "$AIRFLOW_HOME/.migrated"
fi

echo "airflow dags test quantization_pipeline (full log: $LOG)"
started=$(date +%s)
# Show the pipeline's own progress lines; everything goes to the log.
airflow dags test quantization_pipeline -c "$CONF" 2>&1 | tee "$LOG" \
  | grep --line-buffered -E "\[tasks\.|\[DAG TEST\] starting task_id" \
  | sed -u -E 's/^[^ ]+ \[[a-z]+ *\] (.*[^ ]) +\[tasks\.[^]]*\].*$/    \1/; s/^.*\[DAG TEST\] starting (task_id=[^ ]+ map_index=[^ ]+).*$/  \1/'
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ] || grep "DagRun Finished" "$LOG" | grep -q "state=failed"; then
  reason=$(grep -ho "PipelineError: .*" "$LOG" | head -1 | sed 's/^PipelineError: //')
  echo "error: ${reason:-the pipeline failed; see $LOG}" >&2
  exit 1
fi
echo
echo "done in $(( $(date +%s) - started )) s. Results ($QUANT_HOME/reports/latest/results.md):"
echo
cat "$QUANT_HOME/reports/latest/results.md"
echo
echo "Reports and plots: $QUANT_HOME/reports/latest/"
echo "MLflow UI:         . .venv/bin/activate && mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI --host 127.0.0.1 --port 5000"
echo "                   (the links open it in \"Model training\" mode, the toggle at the top of MLflow's sidebar)"
python - "$QUANT_HOME/reports/latest/links.json" <<'PY'
import json, sys
from tasks.registry.ui import LINK_LABELS
links = json.load(open(sys.argv[1]))
for key, label in LINK_LABELS.items():
    if key in links:
        print(f"  {label + ':':<18}{links[key]}")
PY
