"""Downstream scores with lm-eval: the shipped offline task, on a tiny in-memory model.

The pure helpers run everywhere; the lm-eval run is skipped where lm-eval is not installed (it is not in
the project's base environment: see tasks/downstream.py).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from tasks.evaluation.downstream import TASK_DIR, clean_metrics, metric_names, resolve_task_dir
from tasks.errors import PipelineError

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


def test_shipped_task_data_is_well_formed():
    lines = (TASK_DIR / "quant_facts.jsonl").read_text().splitlines()
    docs = [json.loads(line) for line in lines]
    assert len(docs) >= 50
    for doc in docs:
        assert len(doc["choices"]) == 4 and 0 <= doc["answer"] < 4 and doc["question"]
        assert len(set(doc["choices"])) == 4
    positions = [d["answer"] for d in docs]
    assert max(positions.count(k) for k in range(4)) - min(positions.count(k) for k in range(4)) <= 1
    assert "Licence" in (TASK_DIR / "README.md").read_text()


def test_task_dir_is_resolved_to_absolute_data_files(tmp_path):
    import yaml

    out = resolve_task_dir(TASK_DIR, tmp_path / "tasks")
    config = yaml.safe_load((out / "quant_facts.yaml").read_text())
    path = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert path.is_absolute() and path == (TASK_DIR / "quant_facts.jsonl").resolve()
    assert config["task"] == "quant_facts" and config["output_type"] == "multiple_choice"

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "t.yaml").write_text("task: t\ndataset_path: json\ndataset_kwargs:\n  data_files: missing.jsonl\n")
    with pytest.raises(PipelineError, match="data file not found"):
        resolve_task_dir(broken, tmp_path / "out")


def test_metrics_are_cleaned_and_named_for_mlflow():
    raw = {"alias": "quant_facts", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict-match": 0.2, "samples": 3}
    cleaned = clean_metrics(raw)
    assert cleaned == {"acc": 0.5, "acc_stderr": 0.1, "exact_match_strict-match": 0.2}
    names = metric_names({"quant_facts": {**cleaned, "acc_norm": math.nan}})
    assert names == {"lmeval_quant_facts_acc": 0.5, "lmeval_quant_facts_acc_stderr": 0.1,
                     "lmeval_quant_facts_exact_match_strict-match": 0.2}


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer(embedded_model):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.model_io import load_tokenizer

    tokenizer = load_tokenizer(embedded_model.path)  # the shared, once-converted embedded checkpoint
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is not installed (pip install lm-eval==0.4.13)")
def test_local_task_runs_offline_on_an_in_memory_model(tiny_model_and_tokenizer, tmp_path, monkeypatch):
    import torch

    from tasks.evaluation.downstream import run_downstream

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    torch.set_num_threads(2)
    model, tokenizer = tiny_model_and_tokenizer
    monkeypatch.chdir(tmp_path)  # the task's data file must not depend on the working directory
    scores = run_downstream(model, tokenizer, ["quant_facts"], limit=12, batch_size=8)
    assert set(scores) == {"quant_facts"}
    metrics = scores["quant_facts"]
    assert {"acc", "acc_norm", "acc_stderr"} <= set(metrics)
    assert 0.0 <= metrics["acc"] <= 1.0 and (metrics["acc"] * 12) == pytest.approx(round(metrics["acc"] * 12))
    again = run_downstream(model, tokenizer, ["quant_facts"], limit=12, batch_size=4)
    assert again["quant_facts"]["acc"] == metrics["acc"]  # deterministic, whatever the batch size
    assert "lmeval_quant_facts_acc" in metric_names(scores)


@pytest.mark.skipif(HAS_LM_EVAL, reason="lm-eval is installed")
def test_missing_lm_eval_is_a_one_line_error():
    from tasks.evaluation.downstream import run_downstream

    with pytest.raises(PipelineError, match="lm-eval is not installed"):
        run_downstream(None, None)
