"""The evaluation's commands:

    python -m tasks evaluate --model-dir DIR --backend NAME --calibration DIR [--eval-tokens N]
    python -m tasks downstream --model DIR [--backend NAME] [--tasks T1,T2]   (lm-eval task scores, downstream.py)
"""

from __future__ import annotations

import json
from pathlib import Path


def configure_evaluate(parser) -> None:
    from tasks.evaluation.stage import EvalParams

    parser.add_argument("--model-dir", required=True, help="quantized model directory, or the checkpoint with --backend none")
    parser.add_argument("--backend", default="hqq", help="backend that saved it ('none' for the unquantized checkpoint)")
    parser.add_argument("--calibration", required=True, help="calibration artifact directory (holds the evaluation tokens)")
    parser.add_argument("--eval-tokens", type=int, default=EvalParams.eval_tokens, help="tokens per evaluation stream; 0 = full set")
    parser.add_argument("--protocols", default="paper", help="comma-separated: paper, gptq")
    parser.add_argument("--artifacts", default=None)
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda or cuda:N")
    parser.add_argument("--base-model", default=None, help="the unquantized checkpoint: adds KLD and top-1 agreement against it")


def run_evaluate(args) -> int:
    from tasks.evaluation.stage import EvalParams, run_evaluation
    from tasks.settings import Settings

    params = EvalParams(eval_tokens=args.eval_tokens, protocols=tuple(p for p in args.protocols.split(",") if p))
    base = args.base_model
    metrics, _ = run_evaluation(args.model_dir, args.backend, args.calibration, params, args.artifacts or Settings.from_env().artifact_root,
                                model_key=str(args.model_dir), device=args.device, base_dir=base, base_key=base and str(Path(base).resolve()))  # fmt: skip
    print(json.dumps(metrics, indent=2))
    return 0


def configure_downstream(parser) -> None:
    from tasks.evaluation.downstream import DEFAULT_TASKS, TASK_DIR

    parser.add_argument("--model", required=True, help="model directory (a checkpoint or a backend's saved output)")
    parser.add_argument("--backend", default="none", help="backend that saved it (none, hqq, gptq, awq, bnb)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated lm-eval task names")
    parser.add_argument("--task-dir", default=str(TASK_DIR), help="directory of local task YAMLs ('' for none)")
    parser.add_argument("--limit", type=float, default=None, help="documents per task (quick runs)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the scores as JSON here")


def run_downstream(args) -> int:
    from tasks.artifacts import write_json_atomic
    from tasks.evaluation import downstream
    from tasks.model_io import load_tokenizer

    model = downstream.load_variant(args.model, args.backend)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    scores = downstream.run_downstream(model, tokenizer, [t for t in args.tasks.split(",") if t], task_dir=args.task_dir or None,
                                       limit=limit, batch_size=args.batch_size)
    if args.out:
        write_json_atomic(args.out, scores)
    print(json.dumps(downstream.metric_names(scores), sort_keys=True))
    return 0
