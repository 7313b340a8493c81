"""`python -m tasks profile --model PATH_OR_embedded --calibration FILE --out DIR`: write the scores table."""

from __future__ import annotations

import argparse

from tasks.ladder import LADDER, parse_rung


def configure_profile(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="'embedded', a local checkpoint directory or a hub id")
    parser.add_argument("--calibration", required=True, help="calibration.safetensors (key input_ids) or its directory")
    parser.add_argument("--out", required=True, help="output directory (scores.csv, scores.parquet, profiling.json)")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration samples per mini-batch (default 8)")
    parser.add_argument("--normalize", action="store_true", help="SensiBoost parts relative to |WX|^2 (paper Eq. 10)")
    parser.add_argument("--rungs", nargs="+", default=None, metavar="RUNG", help="ladder rungs to score (default: all 12)")
    from tasks.profiling.driver import DEFAULT_FISHER_SAMPLES

    parser.add_argument("--rival-scores", action="store_true",
                        help="also measure ModelOpt's and AutoRound's scores (taylor_dloss, delta_loss) in the backward pass")
    parser.add_argument("--dkld-windows", type=int, default=0,
                        help="also ExLlamaV3's measured KLD change per layer group and rung on this many windows (0 = no)")
    parser.add_argument("--fisher-samples", type=int, default=DEFAULT_FISHER_SAMPLES,
                        help=f"calibration samples of the backward pass behind fisher_dloss (default {DEFAULT_FISHER_SAMPLES}; 0 = none)")
    parser.add_argument("--revision", default=None, help="hub revision, for hub ids")
    parser.add_argument("--cache-dir", default=None, help="model cache directory (default $QUANT_CACHE_DIR)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="where the layers run: cpu (default), cuda or cuda:N")


def run_profile(args: argparse.Namespace) -> int:
    import torch

    from tasks.model_io import resolve_model
    from tasks.profiling.driver import run_profiling

    if args.threads:
        torch.set_num_threads(args.threads)
    rungs = tuple(parse_rung(r) for r in args.rungs) if args.rungs else LADDER
    model = resolve_model(args.model, revision=args.revision, cache_dir=args.cache_dir)
    csv = run_profiling(model.path, args.calibration, args.out, batch_size=args.batch_size, normalize=args.normalize, rungs=rungs,
                        fisher_samples=args.fisher_samples, device=args.device, rival_scores=args.rival_scores, dkld_windows=args.dkld_windows)
    print(csv)
    return 0
