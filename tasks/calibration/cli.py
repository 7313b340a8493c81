"""`python -m tasks calibrate [--model M] [--samples N] [--seq-len L]`: tokenize the calibration and evaluation sets."""

from __future__ import annotations

from tasks.calibration import CalibrationParams, run_calibration


def configure_calibrate(parser) -> None:
    parser.add_argument("--model", default="embedded", help="'embedded', a checkpoint directory or a hub id")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--samples", type=int, default=CalibrationParams.samples)
    parser.add_argument("--seq-len", type=int, default=CalibrationParams.seq_len)
    parser.add_argument("--seed", type=int, default=CalibrationParams.seed)
    parser.add_argument("--calibration-text", default=CalibrationParams.calibration_text)
    parser.add_argument("--wikitext2-text", default=CalibrationParams.wikitext2_text)
    parser.add_argument("--c4-parquet", default=CalibrationParams.c4_parquet)
    parser.add_argument("--artifacts", default=None, help="artifact root (default: $QUANT_HOME/artifacts)")


def run_calibrate(args) -> int:
    from tasks.model_io import resolve_model
    from tasks.settings import Settings

    settings = Settings.from_env()
    model = resolve_model(args.model, args.revision, settings.cache_dir)
    params = CalibrationParams(args.calibration_text, args.wikitext2_text, args.c4_parquet, args.samples, args.seq_len, args.seed)
    print(run_calibration(model.path, params, args.artifacts or settings.artifact_root, model.revision))
    return 0
