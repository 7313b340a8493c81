import pytest
import torch

from tasks.calibration import CalibrationParams, load_ids, read_c4, read_text, run_calibration, sample_windows
from tasks.errors import PipelineError


def test_sample_windows_are_seeded_and_in_range():
    ids = torch.arange(10_000).reshape(1, -1)
    a = sample_windows(ids, 8, 128, seed=42)
    b = sample_windows(ids, 8, 128, seed=42)
    assert torch.equal(a, b) and a.shape == (8, 128)
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous windows
    assert not torch.equal(a, sample_windows(ids, 8, 128, seed=7))


def test_calibration_artifacts_and_cache(state, tiny_model_dir):
    params = CalibrationParams(samples=4, seq_len=64)
    uri = run_calibration(tiny_model_dir, params, state / "artifacts", "rev-a")
    calib = load_ids(f"{uri}/calibration.safetensors")
    assert calib.shape == (4, 64) and calib.dtype == torch.int64
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
