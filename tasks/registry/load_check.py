"""The reload check a registered version passes before it may become champion: in a fresh process, load
it through the standard client (`mlflow.pyfunc.load_model("models:/<name>/<version>")`) and reproduce
its recorded WikiText-2 perplexity (same protocol, same tokens) within TOLERANCE. The evaluation records
the perplexity of its first 2,048 tokens (`reload_ppl`, the same windows as a 2,048-token evaluation),
which is what the check reproduces, so it costs a fraction of the evaluation. The outcome is
the version's tags `load_check` ("passed" / "failed") and `load_check_detail` (the numbers, or why).

    python -m tasks verify --model-uri models:/NAME/VERSION --calibration DIR --eval-tokens N --expect PPL
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from tasks.errors import PipelineError

log = logging.getLogger(__name__)

TAG, DETAIL_TAG = "load_check", "load_check_detail"
TOLERANCE = 0.005  # relative perplexity difference a reload may show (0.5%)
TIMEOUT_S = 3600


def reproduce(model_uri: str, calibration_dir: str | Path, eval_tokens: int, expected: float, protocol: str = "paper") -> dict:
    """Load `model_uri` with the standard client, measure, compare. Never raises for a bad model: the
    result says why it failed."""
    try:
        from tasks.artifacts import ensure_local
        from tasks.calibration import load_ids
        from tasks.evaluation.perplexity import PROTOCOLS, model_forward, score_stream

        model = load_torch_model(model_uri)
        ids = load_ids(ensure_local(calibration_dir) / "wikitext2.safetensors").reshape(-1)
        ids = ids[:eval_tokens] if eval_tokens else ids
        ppl = score_stream(model_forward(model), ids, PROTOCOLS[protocol]).ppl
    except Exception as exc:  # noqa: BLE001 (any failure to load or run is the check's finding)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return {"passed": False, "detail": f"does not reload: {type(exc).__name__}: {first[:300]}"}
    diff = abs(ppl - expected) / expected
    verdict = "within" if diff <= TOLERANCE else "outside"
    return {"passed": diff <= TOLERANCE, "ppl": ppl, "detail": f"reloaded ppl {ppl:.4f} vs recorded {expected:.4f} ({100 * diff:.3f}%, {verdict} {100 * TOLERANCE:g}%)"}


def load_torch_model(model_uri: str):
    """The model inside a registered version, through MLflow's own loader for its flavor."""
    import mlflow.pyfunc
    from mlflow.models import Model

    if "transformers" in Model.load(model_uri).flavors:
        import mlflow.transformers

        return mlflow.transformers.load_model(model_uri, return_type="components")["model"]
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().model


def check_version(tracking_uri: str, name: str, version: str, calibration_dir: str, eval_tokens: int, expected: float,
                  protocol: str = "paper") -> dict:
    """Run `reproduce` in a fresh Python process and record the outcome on the version's tags."""
    from tasks.registry.tracking import client_for

    cmd = [sys.executable, "-m", "tasks", "verify", "--model-uri", f"models:/{name}/{version}", "--calibration", str(calibration_dir),
           "--eval-tokens", str(eval_tokens), "--expect", repr(float(expected)), "--protocol", protocol]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        lines = proc.stdout.strip().splitlines()
        result = json.loads(lines[-1]) if lines else {"passed": False, "detail": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    except (subprocess.TimeoutExpired, ValueError) as exc:
        result = {"passed": False, "detail": f"the check did not finish: {type(exc).__name__}"}
    client = client_for(tracking_uri)
    client.set_model_version_tag(name, version, TAG, "passed" if result["passed"] else "failed")
    client.set_model_version_tag(name, version, DETAIL_TAG, result["detail"][:500])
    log.info("load check of %s v%s: %s", name, version, result["detail"])
    return result


def configure_parser(parser) -> None:
    parser.add_argument("--model-uri", required=True, help="models:/NAME/VERSION (or @alias)")
    parser.add_argument("--calibration", required=True, help="the calibration stage's output (holds wikitext2.safetensors)")
    parser.add_argument("--eval-tokens", type=int, required=True, help="the WikiText-2 tokens the recorded perplexity used (0 = all)")
    parser.add_argument("--expect", type=float, required=True, help="the recorded WikiText-2 perplexity")
    parser.add_argument("--protocol", default="paper", choices=("paper", "gptq"), help="the protocol it was recorded with")


def run_cli(args) -> int:
    if args.expect <= 0:
        raise PipelineError(f"--expect must be a positive perplexity, got {args.expect}")
    result = reproduce(args.model_uri, args.calibration, args.eval_tokens, args.expect, args.protocol)
    print(json.dumps(result))
    return 0 if result["passed"] else 3
