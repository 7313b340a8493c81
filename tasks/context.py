"""What every stage is given besides its parameters: where things live, the device it runs on and the
tags that trace its MLflow runs to the orchestrator. Built once, at the boundary (the DAG task, the step
CLI, the in-process runner), from the environment; the stages themselves read no environment.

QUANT_DEVICE  cpu | cuda | cuda:N; default: cuda for the steps the table marks as GPU steps when torch
              sees one, else cpu
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

from tasks.settings import Settings

# Airflow exports the running task's DAG and DAG run to its environment.
AIRFLOW_CONTEXT_TAGS = {"AIRFLOW_CTX_DAG_ID": "airflow_dag_id", "AIRFLOW_CTX_DAG_RUN_ID": "airflow_dag_run_id"}


@dataclass(frozen=True)
class StageContext:
    settings: Settings
    device: str = "cpu"
    run_tags: dict = field(default_factory=dict)  # tags of the MLflow parent run (e.g. the Airflow DAG run)

    @classmethod
    def from_env(cls, gpu: bool = False, env: Mapping[str, str] | None = None) -> "StageContext":
        env = os.environ if env is None else env
        device = (env.get("QUANT_DEVICE") or "").strip() or (_cuda_device() if gpu else "cpu")
        tags = {tag: env[var] for var, tag in AIRFLOW_CONTEXT_TAGS.items() if env.get(var)}
        return cls(settings=Settings.from_env(), device=device, run_tags=tags)


def _cuda_device() -> str:
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"
