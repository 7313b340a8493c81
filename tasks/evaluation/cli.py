"""`python -m tasks evaluate --model-dir DIR --backend NAME --calibration DIR [--eval-tokens N]`."""

from __future__ import annotations

import json
from pathlib import Path


def configure_parser(parser) -> None:
    from tasks.evaluation.stage import EvalParams

    parser.add_argument("--model-dir", required=True, help="quantized model directory, or the checkpoint with --backend none")
    parser.add_argument("--backend", default="hqq", help="backend that saved it ('none' for the unquantized checkpoint)")
    parser.add_argument("--calibration", required=True, help="calibration artifact directory (holds the evaluation tokens)")
    parser.add_argument("--eval-tokens", type=int, default=EvalParams.eval_tokens, help="tokens per evaluation stream; 0 = full set")
    parser.add_argument("--protocols", default="paper", help="comma-separated: paper, gptq")
    parser.add_argument("--artifacts", default=None)
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda or cuda:N")
    parser.add_argument("--base-model", default=None, help="the unquantized checkpoint: adds KLD and top-1 agreement against it")


def run_cli(args) -> int:
    from tasks.evaluation.stage import EvalParams, run_evaluation
    from tasks.settings import Settings

    params = EvalParams(eval_tokens=args.eval_tokens, protocols=tuple(p for p in args.protocols.split(",") if p))
    base = args.base_model
    metrics, _ = run_evaluation(args.model_dir, args.backend, args.calibration, params, args.artifacts or Settings.from_env().artifact_root,
                                model_key=str(args.model_dir), device=args.device, base_dir=base, base_key=base and str(Path(base).resolve()))  # fmt: skip
    print(json.dumps(metrics, indent=2))
    return 0
