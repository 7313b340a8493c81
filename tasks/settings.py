"""Where things live, from the environment: one place, so the CLI, the DAG and the tests agree.

QUANT_HOME             state directory of the embedded run (default: <repo>/.state)
QUANT_ARTIFACT_ROOT    artifact store: a directory or s3://bucket/prefix (default: $QUANT_HOME/artifacts)
QUANT_CACHE_DIR        converted checkpoints and hub downloads (default: $QUANT_HOME/cache)
MLFLOW_TRACKING_URI    tracking store (default: sqlite:///$QUANT_HOME/mlflow/mlflow.db)
QUANT_MLFLOW_ARTIFACTS local MLflow artifact directory for the default store ($QUANT_HOME/mlflow/artifacts)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    home: Path
    artifact_root: str
    cache_dir: Path
    tracking_uri: str
    mlflow_artifacts: Path

    @classmethod
    def from_env(cls) -> "Settings":
        home = Path(os.environ.get("QUANT_HOME", REPO_ROOT / ".state")).resolve()
        mlflow_dir = home / "mlflow"
        return cls(
            home=home,
            artifact_root=os.environ.get("QUANT_ARTIFACT_ROOT", str(home / "artifacts")),
            cache_dir=Path(os.environ.get("QUANT_CACHE_DIR", home / "cache")),
            tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_dir / 'mlflow.db'}"),
            mlflow_artifacts=Path(os.environ.get("QUANT_MLFLOW_ARTIFACTS", mlflow_dir / "artifacts")),
        )
