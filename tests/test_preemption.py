"""Preemption and concurrency, with real processes: SIGKILL at points spread over every stage, then a
rerun that completes with the scores of an uninterrupted run; three pipeline runs at once on one model.

A kill is a failpoint (tasks/failpoints.py): the process sends itself SIGKILL there, so no handler and
no cleanup of ours runs, as in a spot preemption or an OOM kill, and the moment is reproducible. The
points are drawn at random (seeded, printed) from every stage; the profile is interrupted at least
twice in its forward pass and once in its backward pass.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # a dozen pipeline processes on a 4-layer model

REPO = Path(__file__).resolve().parent.parent
LAYERS = 4
CONF = {"backends": ["hqq"], "uniform_budgets": ["b4g64"], "methods": ["optimal"], "budgets": ["3.4"], "calibration_samples": 4,
        "calibration_seq_len": 128, "fisher_samples": 2, "eval_tokens": 1024, "protocols": ["paper"], "lm_eval_tasks": []}  # fmt: skip
STAGE_POINTS = ["calibration.build", "profiling.build", "quantized.build", "reference.build", "evaluation.build",
                "record.logged", "record.registered", "finish.reported"]  # fmt: skip


@pytest.fixture(scope="module")
def model4(tmp_path_factory, embedded_model):
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama4")
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_model.path / name, path / name)
    return path


def _env(home: Path, **extra) -> dict:
    env = {**os.environ, "QUANT_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
    env.pop("QUANT_ARTIFACT_ROOT", None)
    env.pop("QUANT_FAILPOINT", None)
    return {**env, **extra}


def _pipeline(config: dict, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tasks", "pipeline", "--config", json.dumps(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _run(config: dict, env: dict) -> tuple[int, str]:
    proc = _pipeline(config, env)
    _, err = proc.communicate(timeout=900)
    return proc.returncode, err


def _scores(home: Path) -> pd.DataFrame:
    (csv,) = (home / "artifacts" / "profiling").glob("*/scores.csv")
    return pd.read_csv(csv)


def _registry_and_runs(home: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    versions = client.search_model_versions("")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id], max_results=1000)]
    return versions, runs


def test_sigkill_at_random_moments_of_every_stage_then_a_rerun_completes_as_if_never_killed(model4, tmp_path):
    seed = int(os.environ.get("QUANT_FAULT_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    first, second = sorted(rng.sample(range(LAYERS - 1), 2))  # two forward kills, then one in the backward pass
    backward = rng.randrange(LAYERS)
    points = STAGE_POINTS[:1] + [f"profiling.layer.{first}", f"profiling.layer.{second}", f"profiling.backward.{backward}"]
    points += STAGE_POINTS[1:]
    print(f"fault seed {seed}: kills at {points}")
    config = {**CONF, "model": str(model4)}

    clean_home = tmp_path / "clean"
    rc, err = _run(config, _env(clean_home))
    assert rc == 0, err[-3000:]

    home = tmp_path / "killed"
    logs = []
    for point in points:
        rc, err = _run(config, _env(home, QUANT_FAILPOINT=point))
        assert rc == -9, f"{point}: expected the SIGKILL, got rc {rc}\n{err[-3000:]}"
        logs.append(err)
    rc, err = _run(config, _env(home))
    assert rc == 0, err[-3000:]

    # Each rerun's profile went on at the layer the kill interrupted: at most that one layer was redone.
    def first_profiled(log: str) -> int:  # the first layer this attempt profiled (0-based)
        assert re.search(r"profiling \S+: %d layers" % LAYERS, log), log[-2000:]
        resumed = re.search(r"resuming after (\d+) finished layer", log)
        return int(resumed.group(1)) if resumed else 0

    assert first_profiled(logs[1]) == 0
    assert first_profiled(logs[2]) == first, logs[2][-2000:]
    assert first_profiled(logs[3]) == second, logs[3][-2000:]
    assert f"resuming the backward pass at layer {backward}" in logs[4], logs[4][-2000:]
    assert "profiling: the interrupted attempt had finished" in logs[5], logs[5][-2000:]
    pd.testing.assert_frame_equal(_scores(home), _scores(clean_home), check_exact=True)  # to the last digit

    versions, runs = _registry_and_runs(home)
    hashes = [v.tags["model_hash"] for v in versions]
    assert len(hashes) == len(set(hashes)) == 2, "one version per quantized model, none duplicated"
    assert not [v for v in versions if "duplicate_of" in v.tags]
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == [], "no MLflow run left RUNNING"
    assert {r.info.status for r in runs} == {"FINISHED", "KILLED"}
    assert list(home.rglob("*.partial")) == [], "no partial output left behind"
    clean_versions, _ = _registry_and_runs(clean_home)
    assert sorted(hashes) == sorted(v.tags["model_hash"] for v in clean_versions), "the same quantized models"


def test_three_concurrent_runs_on_one_model_share_one_profile_and_never_duplicate_a_version(model4, tmp_path):
    home = tmp_path / "shared"
    env = _env(home)
    base = {**CONF, "model": str(model4)}
    configs = [{**base, "budgets": [budget]} for budget in ("3.4", "3.6", "4.0")]  # all three also hold uniform b4g64
    procs = [_pipeline(config, env) for config in configs]
    errs = [p.communicate(timeout=1200)[1] for p in procs]
    for proc, err in zip(procs, errs):
        assert proc.returncode == 0, err[-3000:]
        assert "database is locked" not in err
    profiled = [err for err in errs if re.search(r"profiling \S+: \d+ layers", err)]
    assert len(profiled) == 1, "one run profiles; the others wait for its scores"
    assert len(list((home / "artifacts" / "profiling").glob("*/scores.csv"))) == 1
    versions, runs = _registry_and_runs(home)
    hashes = [v.tags["model_hash"] for v in versions if "duplicate_of" not in v.tags]
    assert len(hashes) == len(set(hashes)) == 4, "uniform b4g64 once, and one optimal version per budget"
    assert not [v for v in versions if "duplicate_of" in v.tags]
    assert not [r for r in runs if r.info.status != "FINISHED"]
    assert list(home.rglob("*.partial")) == []
