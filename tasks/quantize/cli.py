"""`python -m tasks quantize --model M --bitmap FILE --backend NAME [--calibration DIR]`."""

from __future__ import annotations

from pathlib import Path


def configure_quantize(parser) -> None:
    from tasks.quantize.registry import BACKENDS

    parser.add_argument("--model", default="embedded", help="'embedded', a checkpoint directory or a hub id")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--bitmap", required=True, help="bit map JSON from `allocate`")
    parser.add_argument("--backend", default="hqq", choices=sorted(BACKENDS))
    parser.add_argument("--calibration", default=None, help="calibration artifact directory (GPTQ/AWQ)")
    parser.add_argument("--artifacts", default=None)


def run_quantize(args) -> int:
    from tasks.model_io import resolve_model
    from tasks.quantize import stage
    from tasks.settings import Settings

    settings = Settings.from_env()
    model = resolve_model(args.model, args.revision, settings.cache_dir)
    calib = Path(args.calibration) / "calibration.safetensors" if args.calibration else None
    print(stage.run_quantize(model.path, model.revision, args.bitmap, args.backend, args.artifacts or settings.artifact_root, calib))
    return 0
