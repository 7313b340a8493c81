import pytest
import torch

from tasks.calibration import CalibrationParams, holdout_windows, load_ids, read_c4, read_text, run_calibration, sample_windows
from tasks.errors import PipelineError


def test_sample_windows_are_seeded_and_in_range():
    ids = torch.arange(10_000).reshape(1, -1)
    a = sample_windows(ids, 8, 128, seed=42)
    b = sample_windows(ids, 8, 128, seed=42)
    assert torch.equal(a, b) and a.shape == (8, 128)
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous windows
    assert not torch.equal(a, sample_windows(ids, 8, 128, seed=7))


def test_holdout_windows_share_no_token_with_the_calibration_windows():
    ids = torch.arange(10_000).reshape(1, -1)
    calib, held = sample_windows(ids, 8, 128, seed=42), holdout_windows(ids, 8, 128, seed=42)
    assert held.shape[1] == 128 and torch.all(held[:, 1:] - held[:, :-1] == 1)
    assert not set(calib.flatten().tolist()) & set(held.flatten().tolist())
    assert len(held) >= (10_000 - 8 * 128) // 128 - 8  # at most one window lost on each side of a calibration window
    assert torch.equal(held, holdout_windows(ids, 8, 128, seed=42)) and len(holdout_windows(ids, 8, 128, seed=42, limit=3)) == 3
    assert (holdout_windows(ids, 8, 128, seed=42, bos=7)[:, 0] == 7).all()
    assert holdout_windows(torch.arange(300), 4, 128, seed=1).shape[1] == 128  # covered text: none, still 2-D


def test_calibration_artifacts_and_cache(state, tiny_model_dir):
    params = CalibrationParams(samples=4, seq_len=64)
    uri = run_calibration(tiny_model_dir, params, state / "artifacts", "rev-a")
    calib = load_ids(f"{uri}/calibration.safetensors")
    assert calib.shape == (4, 64) and calib.dtype == torch.int64
    held = load_ids(f"{uri}/holdout.safetensors")
    assert held.shape == (256, 64) and not set(map(tuple, held.tolist())) & set(map(tuple, calib.tolist()))
    wiki = load_ids(f"{uri}/wikitext2.safetensors")
    assert wiki.shape[0] == 1 and wiki.shape[1] > 250_000  # the whole WikiText-2 test split
    assert run_calibration(tiny_model_dir, params, state / "artifacts", "rev-a") == uri  # cache hit
    assert run_calibration(tiny_model_dir, CalibrationParams(samples=5, seq_len=64), state / "artifacts", "rev-a") != uri


def test_calibration_text_never_overlaps_evaluation_text():
    """Every calibration window (as text, 12 words) is absent from both evaluation texts."""
    calib_lines = [l.strip() for l in read_text(CalibrationParams.calibration_text).splitlines() if len(l.split()) > 30]
    evaluation = read_text(CalibrationParams.wikitext2_text) + read_c4(CalibrationParams.c4_parquet)
    evaluation = " ".join(evaluation.split())
    probes = [" ".join(line.split()[5:17]) for line in calib_lines[::50] if "<unk>" not in " ".join(line.split()[5:17])]
    assert len(probes) > 20
    assert not [p for p in probes if p in evaluation]


def test_empty_evaluation_text_is_a_one_line_error(state, tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\r\n  \n")
    with pytest.raises(PipelineError, match="empty"):
        run_calibration(tiny_model_dir, CalibrationParams(wikitext2_text=str(empty), samples=2, seq_len=16), state / "a")
    with pytest.raises(PipelineError, match="not found"):
        run_calibration(tiny_model_dir, CalibrationParams(c4_parquet=str(tmp_path / "nope.parquet")), state / "a")
