"""Bytes stored per registered variant, with and without the store-once hard links (issue 17).

    python benchmarks/storage_per_variant.py [--home .state]

For each registered model version of the state directory's MLflow store: the pipeline's quantized stage
output (`artifacts/quantized/...`), the version's MLflow model (`model/` of its run), and what the two
occupy on disk together, counting each inode once (`after`), against what two independent copies would
occupy (`before`: the stage output plus the MLflow model's apparent size). Local stores only: on S3 the
two copies remain (docs/operations.md, Storage).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", default=".state", help="the QUANT_HOME of the run (default .state)")
    args = ap.parse_args()
    from mlflow import MlflowClient

    from tasks.registry.dedup import local_dir

    home = Path(args.home).resolve()
    # The pipeline's default store under the home (README), unless MLFLOW_TRACKING_URI says otherwise.
    client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"))
    owner: dict[tuple[int, int], Path] = {}  # inode -> the quantized stage output directory holding it
    for stage_dir in (home / "artifacts" / "quantized").glob("*/*"):
        if stage_dir.is_dir() and not stage_dir.name.endswith(".partial"):
            for p in _files(stage_dir):
                owner[(p.stat().st_dev, p.stat().st_ino)] = stage_dir
    rows, totals = [], [0, 0]
    for mv in sorted(client.search_model_versions(""), key=lambda v: (v.name, int(v.version))):
        model = local_dir(client.get_model_version_download_uri(mv.name, mv.version))  # the version's MLflow model
        if model is None or not model.is_dir():
            continue
        files = _files(model)
        stage = next((owner[(p.stat().st_dev, p.stat().st_ino)] for p in files if (p.stat().st_dev, p.stat().st_ino) in owner), None)
        stage_bytes = sum(p.stat().st_size for p in _files(stage)) if stage else 0
        model_bytes = sum(p.stat().st_size for p in files)
        inodes = {(p.stat().st_dev, p.stat().st_ino): p.stat().st_size for p in files + (_files(stage) if stage else [])}
        before, after = stage_bytes + model_bytes, sum(inodes.values())
        totals[0] += before
        totals[1] += after
        rows.append((f"{mv.name} v{mv.version}", mv.tags.get("variant", ""), stage_bytes, model_bytes, before, after))
    if not rows:
        print(f"no registered version with a local MLflow model under {home}")
        return 1
    mib = 2**20
    print(f"{'version':<28} {'variant':<24} {'stage MiB':>10} {'mlflow MiB':>11} {'before MiB':>11} {'after MiB':>10} {'ratio':>6}")
    for name, variant, stage_bytes, model_bytes, before, after in rows:
        print(f"{name:<28} {variant:<24} {stage_bytes / mib:>10.1f} {model_bytes / mib:>11.1f} {before / mib:>11.1f} {after / mib:>10.1f} {after / before:>6.2f}")
    print(f"{'total':<53} {'':>11} {totals[0] / mib:>11.1f} {totals[1] / mib:>10.1f} {totals[1] / totals[0]:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
