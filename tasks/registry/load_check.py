"""The reload check a registered version passes before it may become champion: in a clean process (one
that imported nothing of the pipeline's run), load it through the standard client
(`mlflow.pyfunc.load_model("models:/<name>/<version>")`) and reproduce its recorded WikiText-2 perplexity
(same protocol, same tokens) within TOLERANCE. The evaluation records the perplexity of its first 2,048
tokens (`reload_ppl`, the same windows as a 2,048-token evaluation), which is what the check reproduces,
so it costs a fraction of the evaluation. The outcome is the version's tags `load_check` ("passed" /
"failed") and `load_check_detail` (the numbers, or why).

The clean process serves the checks of one pipeline process one after another (`--serve`: one JSON request
per line in, one result per line out), each version loaded anew from the registry: starting Python, torch,
transformers and MLflow is most of a check's cost (about 7 of 10 s for a small model on 2 cores), and a
run checks every variant it registered. A process that dies or hangs fails only the check it was on; the
next check starts a new one.

    python -m tasks verify --model-uri models:/NAME/VERSION --calibration DIR --eval-tokens N --expect PPL
    python -m tasks verify --serve
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

TAG, DETAIL_TAG = "load_check", "load_check_detail"
TOLERANCE = 0.005  # relative perplexity difference a reload may show (0.5%)
PROMPT = "The capital of France is"  # what the serving engine of a version with one is asked
TIMEOUT_S = 3600


def reproduce(model_uri: str, calibration_dir: str | Path, eval_tokens: int, expected: float, protocol: str = "paper") -> dict:
    """Load `model_uri` with the standard client, measure, compare. Never raises for a bad model: the
    result says why it failed."""
    try:
        from tasks.artifacts import ensure_local
        from tasks.calibration import load_ids, window_bos
        from tasks.evaluation.perplexity import PROTOCOLS, model_forward, score_stream

        model, engine = load_for_check(model_uri)
        calibration_dir = ensure_local(calibration_dir)
        ids = load_ids(calibration_dir / "wikitext2.safetensors").reshape(-1)
        ids = ids[:eval_tokens] if eval_tokens else ids
        ppl = score_stream(model_forward(model, window_bos(calibration_dir)), ids, PROTOCOLS[protocol]).ppl
        served = engine(PROMPT, 8) if engine is not None else None  # the serving engine's own runtime answers too
    except Exception as exc:  # noqa: BLE001 (any failure to load or run is the check's finding)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return {"passed": False, "detail": f"does not reload: {type(exc).__name__}: {first[:300]}"}
    diff = abs(ppl - expected) / expected
    passed = diff <= TOLERANCE and (engine is None or bool(served.strip()))
    verdict = "within" if diff <= TOLERANCE else "outside"
    detail = f"reloaded ppl {ppl:.4f} vs recorded {expected:.4f} ({100 * diff:.3f}%, {verdict} {100 * TOLERANCE:g}%)"
    if engine is not None:
        detail += f"; its serving engine completes {PROMPT!r} with {served!r}" if served.strip() else "; its serving engine generates nothing"
    return {"passed": passed, "ppl": ppl, "detail": detail}


def load_for_check(model_uri: str):
    """(the torch model inside a registered version, through MLflow's own loader for its flavor; the
    pyfunc's serving-engine generator, or None)."""
    import mlflow.pyfunc
    from mlflow.models import Model

    if "transformers" in Model.load(model_uri).flavors:
        import mlflow.transformers

        return mlflow.transformers.load_model(model_uri, return_type="components")["model"], None
    python_model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    return python_model.model, getattr(python_model, "engine", None)


def check_version(tracking_uri: str, name: str, version: str, calibration_dir: str, eval_tokens: int, expected: float,
                  protocol: str = "paper") -> dict:
    """Run `reproduce` in the clean checking process and record the outcome on the version's tags."""
    from tasks.registry.tracking import client_for, set_version_tag

    request = {"model_uri": f"models:/{name}/{version}", "calibration": str(calibration_dir), "eval_tokens": int(eval_tokens),
               "expected": float(expected), "protocol": protocol}  # fmt: skip
    result = _checker({**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}).check(request)
    client = client_for(tracking_uri)
    set_version_tag(client, name, version, TAG, "passed" if result["passed"] else "failed")
    set_version_tag(client, name, version, DETAIL_TAG, result["detail"][:500])
    log.info("load check of %s v%s: %s", name, version, result["detail"])
    return result


class _Checker:
    """A `python -m tasks verify --serve` process: requests on its stdin, one JSON result per stdout line
    (a reader thread, so that a hung check times out); its stderr goes to a temporary file whose last line
    explains a death."""

    def __init__(self, env: dict):
        self.env = env
        self.lock = threading.Lock()  # one request at a time, whichever thread asks
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "tasks", "verify", "--serve"], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)  # fmt: skip
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # end of output: the process exited

    def check(self, request: dict) -> dict:
        with self.lock:
            return self._check(request)

    def _check(self, request: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.lines.get(timeout=TIMEOUT_S)
        except queue.Empty:
            self.close()
            return {"passed": False, "detail": f"the check did not finish within {TIMEOUT_S} s"}
        except (BrokenPipeError, OSError):
            line = None
        if line is None:
            detail = f"the checking process died: {self._last_error()}"
            self.close()
            return {"passed": False, "detail": detail}
        return json.loads(line)

    def _last_error(self) -> str:
        code = self.proc.wait(timeout=30)
        self.log.seek(0)
        lines = [line.strip() for line in self.log.read().splitlines() if line.strip()]
        return f"exit code {code}" + (f": {lines[-1][:300]}" if lines else "")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.alive():
            try:
                self.proc.stdin.close()  # end of requests: it exits
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


_CHECKERS: list[_Checker] = []  # at most one: this process's


def _checker(env: dict) -> _Checker:
    """This process's checker for `env` (a new one if the environment changed, ignoring the task context
    Airflow sets for each task, or the last one died)."""
    if _CHECKERS and _CHECKERS[0].alive() and _same_env(_CHECKERS[0].env, env):
        return _CHECKERS[0]
    _close_checkers()
    _CHECKERS.append(_Checker(env))
    return _CHECKERS[0]


def _same_env(a: dict, b: dict) -> bool:
    def relevant(env: dict) -> dict:
        return {k: v for k, v in env.items() if not k.startswith("AIRFLOW_CTX_")}

    return relevant(a) == relevant(b)


@atexit.register
def _close_checkers() -> None:
    while _CHECKERS:
        _CHECKERS.pop().close()


def serve(requests, results) -> None:
    """Answer each request line with one result line, until the requests end. Libraries that print go to
    stderr: `results` carries nothing but the results."""
    import gc

    from tasks.failpoints import failpoint

    for line in requests:
        if line.strip():
            r = json.loads(line)
            failpoint("verify.check")
            result = reproduce(r["model_uri"], r["calibration"], r["eval_tokens"], r["expected"], r["protocol"])
            gc.collect()  # the model goes before the next one loads
            results.write(json.dumps(result) + "\n")
            results.flush()
