import pytest

from tasks.bitmap import BitMap, uniform_bitmap
from tasks.errors import PipelineError
from tasks.ladder import LADDER, Rung, boost, parse_rung


def test_ladder_labels_are_the_papers_names():
    # docs/methods.md §2, in order.
    expected = "2.13 2.25 2.51 3.13 3.25 3.51 4.13 4.25 4.51 8.13 8.25 8.51".split()
    assert [r.label for r in LADDER] == expected
    assert [r.name for r in LADDER][:3] == ["b2g128", "b2g64", "b2g32"]


def test_bpp_formula_and_memory_match_the_authors_memmb():
    # fnorm-Llama-2-7b-hf.csv: q_proj (16777216 params) at b2g32 -> 5.015625 MiB, b2g64 -> 4.5078125 MiB
    assert Rung(2, 32).mib(16777216) == pytest.approx(5.015625)
    assert Rung(2, 64).mib(16777216) == pytest.approx(4.5078125)


def test_parse_rung_accepts_names_and_labels():
    assert parse_rung("b4g64") == Rung(4, 64) == parse_rung("4.25") == parse_rung(4.25)
    with pytest.raises(PipelineError, match="not a rung"):
        parse_rung("b5g64")
    with pytest.raises(PipelineError):
        parse_rung("4.3")


def test_boost_moves_up_and_clamps_at_the_top():
    assert boost(Rung(3, 64), 3) == Rung(4, 64)
    assert boost(Rung(8, 64), 3) == Rung(8, 32)


def test_bitmap_nominal_bpp_is_parameter_weighted(tmp_path):
    params = {"0.self_attn.q_proj": 100, "0.mlp.down_proj": 300}
    bm = uniform_bitmap(params, Rung(3, 64))
    bm.modules["0.self_attn.q_proj"] = Rung(8, 128)
    expected = (100 * Rung(8, 128).bpp + 300 * Rung(3, 64).bpp) / 400
    assert bm.nominal_bpp == pytest.approx(expected)
    assert bm.extra_pct == pytest.approx(100 * (expected - Rung(3, 64).bpp) / Rung(3, 64).bpp)
    path = bm.save(tmp_path / "bm.json")
    again = BitMap.load(path)
    assert again.modules == bm.modules and again.nominal_bpp == pytest.approx(expected)


def test_malformed_bitmap_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"modules": {"0.mlp.up_proj": {"bits": 4}}}')
    with pytest.raises(PipelineError, match="malformed"):
        BitMap.load(bad)
    with pytest.raises(PipelineError, match="not found"):
        BitMap.load(tmp_path / "missing.json")
