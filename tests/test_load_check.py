"""The reload check's clean process: it serves a run's checks one after another, a bad version fails
with its reason, and a process that dies fails only the check it was on (the next starts a new one)."""

from __future__ import annotations

import os

import pytest

from tasks.registry import load_check


def _request(tmp_path) -> dict:
    return {"model_uri": "models:/no-such-model/1", "calibration": str(tmp_path), "eval_tokens": 16, "expected": 10.0, "protocol": "paper"}


@pytest.mark.slow  # over 15 s on 2 cores: make test-all
def test_one_clean_process_serves_every_check_and_reports_a_bad_version(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("QUANT_FAILPOINT", None)
    checker = load_check._checker(env)
    try:
        first = checker.check(_request(tmp_path))
        second = load_check._checker(env).check(_request(tmp_path))
        assert load_check._checker(env) is checker and checker.alive(), "the same process answered both"
    finally:
        load_check._close_checkers()
    for result in (first, second):
        assert not result["passed"] and result["detail"].startswith("does not reload:"), result
        assert "no-such-model" in result["detail"], result
    assert not checker.alive()


@pytest.mark.slow  # over 15 s on 2 cores: make test-all
def test_a_checking_process_that_dies_fails_that_check_and_the_next_one_starts_afresh(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "QUANT_FAILPOINT": "verify.check"}
    try:
        died = load_check._checker(env).check(_request(tmp_path))
        assert not died["passed"] and died["detail"].startswith("the checking process died"), died
        env.pop("QUANT_FAILPOINT")
        again = load_check._checker(env).check(_request(tmp_path))  # a new process, without the failpoint
    finally:
        load_check._close_checkers()
    assert again["detail"].startswith("does not reload:"), again


def test_the_task_context_airflow_sets_per_task_keeps_the_same_process(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "AIRFLOW_CTX_TASK_ID": "verify"}
    env.pop("QUANT_FAILPOINT", None)
    try:
        first = load_check._checker(env)
        same = load_check._checker({**env, "AIRFLOW_CTX_TASK_ID": "verify", "AIRFLOW_CTX_MAP_INDEX": "3"})
        other = load_check._checker({**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'other.db'}"})
    finally:
        load_check._close_checkers()
    assert same is first and other is not first and not first.alive()
