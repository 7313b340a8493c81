"""The registry's commands: `python -m tasks promote` (move the champion alias, promotion.py) and
`python -m tasks verify` (the reload check of a registered version, load_check.py)."""

from __future__ import annotations

import json
import os
import sys

from tasks.errors import PipelineError
from tasks.registry.load_check import reproduce, serve
from tasks.registry.promotion import DEFAULT_METRIC, DEFAULT_TOLERANCE, run_promotion


def configure_promote(parser) -> None:
    parser.add_argument("--tracking-uri", required=True, help="MLflow tracking (and registry) URI")
    parser.add_argument("--model", required=True, help="registered model name, e.g. SmolLM2-135M-Instruct-quant")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help=f"metric to compare (default {DEFAULT_METRIC})")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"the smallest version with the metric within this bound wins (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--best", action="store_true", help="no tolerance: the best metric wins whatever its size")
    parser.add_argument("--max-bytes", type=float, default=None, help="memory cap on saved_bytes (default: none)")
    parser.add_argument("--min-improvement-pct", type=float, default=1.0,
                        help="replace the champion only if better by at least this percent (default 1.0)")
    parser.add_argument("--higher-is-better", action="store_true", help="for scores such as lm-eval accuracy")


def run_promote(args) -> int:
    d = run_promotion(
        args.tracking_uri,
        args.model,
        metric=args.metric,
        tolerance=None if args.best else args.tolerance,
        max_saved_bytes=args.max_bytes,
        min_improvement_pct=args.min_improvement_pct,
        lower_is_better=not args.higher_is_better,
    )
    if d["action"] == "demote":
        print(f"demote: {d['model']}@{d['alias']} removed from v{d['previous_champion']}; {d['reason']}")
    else:
        print(f"{d['action']}: {d['model']}@{d['alias']} = v{d['champion']} ({d['metric']} {d['value']:.4g}); {d['reason']}")
    return 0


def configure_verify(parser) -> None:
    parser.add_argument("--serve", action="store_true", help="answer JSON check requests from stdin, one result line each (the pipeline's checker)")
    parser.add_argument("--model-uri", help="models:/NAME/VERSION (or @alias)")
    parser.add_argument("--calibration", help="the calibration stage's output (holds wikitext2.safetensors)")
    parser.add_argument("--eval-tokens", type=int, help="the WikiText-2 tokens the recorded perplexity used (0 = all)")
    parser.add_argument("--expect", type=float, help="the recorded WikiText-2 perplexity")
    parser.add_argument("--protocol", default="paper", choices=("paper", "gptq"), help="the protocol it was recorded with")


def run_verify(args) -> int:
    if args.serve:
        results = os.fdopen(os.dup(sys.stdout.fileno()), "w")
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # whatever a library prints goes to stderr
        serve(sys.stdin, results)
        return 0
    missing = [f"--{n.replace('_', '-')}" for n in ("model_uri", "calibration", "eval_tokens", "expect") if getattr(args, n) is None]
    if missing:
        raise PipelineError(f"verify needs {', '.join(missing)} (or --serve)")
    if args.expect <= 0:
        raise PipelineError(f"--expect must be a positive perplexity, got {args.expect}")
    result = reproduce(args.model_uri, args.calibration, args.eval_tokens, args.expect, args.protocol)
    print(json.dumps(result))
    return 0 if result["passed"] else 3
