"""The streaming profiler against a reference computed on the fully loaded transformers model.

Tiny random checkpoints (2-3 layers, hidden 64) of the llama family, grouped-query attention or not.
The reference follows docs/methods.md §3 literally: one full-precision forward of the whole model gives every
layer's input; each part's weights are quantized with tasks.quantize.hqq_ops.quant_dequant at b4g64 and
the part's block is re-run on that input.
"""

from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tasks.errors import PipelineError
from tasks.ladder import LADDER, MODULES, Rung
from tasks.profiling import COLUMNS, run_profiling
from tasks.quantize.hqq_ops import quant_dequant

B4G64 = Rung(4, 64)
VOCAB = 320


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(kind: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip
    if kind == "llama_gqa":
        return LlamaConfig(num_key_value_heads=2, **common)
    if kind == "llama_tied":  # the output embedding is the input one: no lm_head.weight in the file
        return LlamaConfig(num_key_value_heads=2, **{**common, "num_hidden_layers": 2, "tie_word_embeddings": True})
    if kind == "llama_mha":
        return LlamaConfig(num_key_value_heads=4, **{**common, "num_hidden_layers": 2})
    if kind == "qwen2":  # q/k/v biases
        return Qwen2Config(num_key_value_heads=2, **{**common, "num_hidden_layers": 2})
    if kind == "mistral":
        return MistralConfig(num_key_value_heads=2, sliding_window=64, **{**common, "num_hidden_layers": 2})
    if kind == "gemma2":  # scaled embeddings, soft-capped attention and logits, sliding and global layers
        from transformers import Gemma2Config

        return Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=64, attn_logit_softcapping=50.0,
                            final_logit_softcapping=30.0, **common)  # fmt: skip
    if kind == "gemma3_text":  # q/k norms, a local and a global rotary base per layer kind
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(num_key_value_heads=2, head_dim=16, sliding_window=64,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"], **common)  # fmt: skip
    raise ValueError(kind)


def _save(kind: str, path, seed: int = 0, zero_outputs_of_layer: int | None = None, shard: str | None = None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(kind))
    with torch.no_grad():
        for p in model.parameters():  # larger than the 0.02 init, so that b4g64 errors are clearly non-zero
            if p.dim() == 2:
                p.mul_(3.0)
        if zero_outputs_of_layer is not None:
            layer = model.model.layers[zero_outputs_of_layer]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("profiling-ckpt")
    return {kind: _save(kind, root / kind) for kind in ("llama_gqa", "llama_mha", "qwen2", "mistral", "llama_tied", "gemma2", "gemma3_text")}


@pytest.fixture(scope="module")
def calibration():
    # 5 samples with batch_size 2 leaves an uneven last batch; seq 80 > mistral's sliding window 64.
    return torch.randint(0, VOCAB, (5, 80), generator=torch.Generator().manual_seed(3))


def _mse(a, b) -> float:
    return (a.double() - b.double()).square().mean().item()


def inputs_and_output_gradients(model, ids) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per linear, its inputs and d sum-NLL / d output: plain autograd on the whole model, what the
    profiler streams backward one layer at a time."""
    seen, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        for m in MODULES:
            def keep(mod, args, out, key=f"{i}.{m}"):
                out.retain_grad()
                seen[key] = (args[0].detach(), out)

            handles.append(layer.get_submodule(m).register_forward_hook(keep))
    with torch.enable_grad():
        logits = model(ids).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").backward()
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    return {k: (x, out.grad) for k, (x, out) in seen.items()}


def output_gradient_squares(model, ids) -> dict[str, torch.Tensor]:
    """Per linear, sum over tokens of (d sum-NLL / d output)^2 per output feature."""
    return {k: g.double().square().sum(dim=(0, 1)) for k, (_, g) in inputs_and_output_gradients(model, ids).items()}


@torch.no_grad()
def reference(path, ids, rungs=LADDER, normalize=False, fisher_samples=5) -> dict:
    """Per layer: lim, zd, the four parts; per module: kurtosis, fnorm[rung], out_err[rung], fisher_dloss[rung]."""
    from transformers import AutoModelForCausalLM

    from transformers import AutoConfig

    eager = bool(getattr(AutoConfig.from_pretrained(path), "attn_logit_softcapping", None))  # what soft-capping needs
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **({"attn_implementation": "eager"} if eager else {})).eval()
    grad_squares = output_gradient_squares(model, ids[:fisher_samples])
    layers = model.model.layers
    seen: dict = {}

    def keep(name, output=False):
        def pre(mod, args):
            seen[name] = args[0]

        def post(mod, args, out):
            seen[name + ".in"] = args[0]
            seen[name + ".out"] = out[0] if isinstance(out, tuple) else out

        return post if output else pre

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(keep(f"{i}", output=True)))
        for m in ("self_attn.q_proj", "mlp.gate_proj"):
            handles.append(layer.get_submodule(m).register_forward_pre_hook(keep(f"{i}.{m}")))
        for m in ("self_attn.o_proj", "mlp.down_proj"):
            handles.append(layer.get_submodule(m).register_forward_hook(keep(f"{i}.{m}", output=True)))
    model(ids)
    for h in handles:
        h.remove()

    position_ids = torch.arange(ids.shape[1]).unsqueeze(0)
    result = {"layers": {}, "modules": {}}
    for i, layer in enumerate(layers):
        x_in, x_out = seen[f"{i}.in"], seen[f"{i}.out"]
        attn_x, mlp_x = seen[f"{i}.self_attn.q_proj"], seen[f"{i}.mlp.gate_proj"]
        ctx, attn_fp = seen[f"{i}.self_attn.o_proj.in"], seen[f"{i}.self_attn.o_proj.out"]
        act, mlp_fp = seen[f"{i}.mlp.down_proj.in"], seen[f"{i}.mlp.down_proj.out"]
        weights = {m: layer.get_submodule(m).weight.detach().clone() for m in MODULES}

        qattn = copy.deepcopy(layer.self_attn)
        for m in ("q_proj", "k_proj", "v_proj"):
            getattr(qattn, m).weight.copy_(quant_dequant(weights[f"self_attn.{m}"], B4G64))
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        types = getattr(model.config, "layer_types", None)
        kind = types[i] if types else ("sliding_attention" if getattr(model.config, "sliding_window", None) else "full_attention")
        if model.config.model_type == "gemma3_text":
            pe = model.model.rotary_emb(attn_x, position_ids, kind)
        else:
            pe = model.model.rotary_emb(attn_x, position_ids)
        make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
        mask = make(config=model.config, inputs_embeds=attn_x, attention_mask=None, past_key_values=None, position_ids=position_ids)
        attn_q = qattn(hidden_states=attn_x, attention_mask=mask, position_embeddings=pe, position_ids=position_ids)[0]
        qmlp = copy.deepcopy(layer.mlp)
        for m in ("gate_proj", "up_proj"):
            getattr(qmlp, m).weight.copy_(quant_dequant(weights[f"mlp.{m}"], B4G64))
        o_q = F.linear(ctx, quant_dequant(weights["self_attn.o_proj"], B4G64))
        down_q = F.linear(act, quant_dequant(weights["mlp.down_proj"], B4G64))
        pairs = {"attn_in": (attn_q, attn_fp), "attn_out": (o_q, attn_fp), "mlp_gate": (qmlp(mlp_x), mlp_fp),
                 "mlp_down": (down_q, mlp_fp)}  # fmt: skip
        if normalize:
            parts = {p: (q.double() - f.double()).square().sum().item() / f.double().square().sum().item() for p, (q, f) in pairs.items()}
        else:
            parts = {p: _mse(q, f) for p, (q, f) in pairs.items()}
        flat = torch.cat([w.reshape(-1) for w in weights.values()]).double()
        zd = ((flat - flat.mean()) / flat.std(unbiased=False) > 1).double().mean().item()
        lim = -F.cosine_similarity(x_in, x_out, dim=-1).double().mean().item()
        result["layers"][i] = {"lim": lim, "zd": zd, **parts}
        inputs = {"self_attn.q_proj": attn_x, "self_attn.k_proj": attn_x, "self_attn.v_proj": attn_x,
                  "self_attn.o_proj": ctx, "mlp.gate_proj": mlp_x, "mlp.up_proj": mlp_x, "mlp.down_proj": act}  # fmt: skip
        for m, w in weights.items():
            import scipy.stats

            entry = {"kurtosis": scipy.stats.kurtosis(w.double().numpy().ravel(), fisher=False, bias=True)}
            for rung in rungs:
                deq = quant_dequant(w, rung)
                entry[("fnorm", rung.name)] = torch.linalg.vector_norm((w - deq).double()).item()
                entry[("out_err", rung.name)] = F.linear(inputs[m], w - deq).double().square().mean().item()
                row_errors = F.linear(inputs[m], w - deq).double().square().sum(dim=(0, 1))
                entry[("fisher_dloss", rung.name)] = (
                    0.5 * (row_errors @ grad_squares[f"{i}.{m}"]).item() / (ids.numel() * ids[:fisher_samples].numel())
                )
            result["modules"][f"{i}.{m}"] = entry
    return result


def _check_against_reference(csv, ref, gqa: bool, rungs=LADDER):
    df = pd.read_csv(csv)
    for i, lay in ref["layers"].items():
        rows = df[df.layer == i]
        assert rows["lim"].nunique() == 1 and rows["zd"].nunique() == 1
        assert rows["lim"].iloc[0] == pytest.approx(lay["lim"], rel=1e-5, abs=1e-6)
        assert rows["zd"].iloc[0] == pytest.approx(lay["zd"], abs=1e-12)
        for part in ("attn_in", "attn_out", "mlp_gate", "mlp_down"):
            assert lay[part] > 0
            assert rows[f"sens_{part}"].iloc[0] == pytest.approx(lay[part], rel=2e-3), part
        expected_part = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
                         "self_attn.o_proj": "attn_in" if gqa else "attn_out", "mlp.gate_proj": "mlp_gate",
                         "mlp.up_proj": "mlp_gate", "mlp.down_proj": "mlp_down"}  # fmt: skip
        for m in MODULES:
            mrows = rows[rows.module == m]
            entry = ref["modules"][f"{i}.{m}"]
            assert len(mrows) == len(rungs)
            assert (mrows["sensitivity"] == mrows[f"sens_{expected_part[m]}"]).all(), m
            assert mrows["kurtosis"].iloc[0] == pytest.approx(entry["kurtosis"], rel=1e-9)
            for _, row in mrows.iterrows():
                name = Rung(int(row.nbit1), int(row.gsize1)).name
                assert row.fnorm == pytest.approx(entry[("fnorm", name)], rel=1e-6), (m, name)
                assert row.out_err == pytest.approx(entry[("out_err", name)], rel=1e-4), (m, name)
                assert row.fisher_dloss > 0
                assert row.fisher_dloss == pytest.approx(entry[("fisher_dloss", name)], rel=1e-3), (m, name)


@pytest.mark.parametrize("kind", ["llama_gqa", "llama_mha", "qwen2", "mistral", "gemma2", "gemma3_text"])
def test_streaming_profiler_matches_full_model_reference(kind, checkpoints, calibration, tmp_path):
    csv = run_profiling(checkpoints[kind], calibration, tmp_path / "out", batch_size=2)
    _check_against_reference(csv, reference(checkpoints[kind], calibration), gqa=kind != "llama_mha")


@pytest.mark.parametrize("kind", ["llama_gqa", "llama_tied"])
def test_fisher_on_a_subset_of_samples_matches_reference(kind, checkpoints, calibration, tmp_path):
    # 3 of 5 samples in batches of 2: the backward pass's last batch is uneven too.
    if kind == "llama_tied":
        from safetensors import safe_open

        with safe_open(str(checkpoints[kind] / "model.safetensors"), framework="pt") as f:
            assert "lm_head.weight" not in f.keys()
    csv = run_profiling(checkpoints[kind], calibration, tmp_path / "out", batch_size=2, rungs=(B4G64,), fisher_samples=3)
    _check_against_reference(csv, reference(checkpoints[kind], calibration, rungs=(B4G64,), fisher_samples=3),
                             gqa=True, rungs=(B4G64,))  # fmt: skip
    assert json.loads((tmp_path / "out" / "profiling.json").read_text())["fisher_samples"] == 3


def test_without_gradients_the_fisher_column_is_empty(checkpoints, calibration, tmp_path):
    df = pd.read_csv(run_profiling(checkpoints["llama_gqa"], calibration, tmp_path / "out", rungs=(B4G64,), fisher_samples=0))
    assert df["fisher_dloss"].isna().all() and df["out_err"].notna().all()
    assert not list((tmp_path / "out").glob("quant-stash-*")), "the stash of layer inputs is removed"


def test_normalized_parts_match_reference(checkpoints, calibration, tmp_path):
    rungs = (B4G64,)
    csv = run_profiling(checkpoints["llama_gqa"], calibration, tmp_path / "out", batch_size=3, normalize=True, rungs=rungs)
    ref = reference(checkpoints["llama_gqa"], calibration, rungs=rungs, normalize=True)
    df = pd.read_csv(csv)
    for i, lay in ref["layers"].items():
        row = df[df.layer == i].iloc[0]
        for part in ("attn_in", "attn_out", "mlp_gate", "mlp_down"):
            assert row[f"sens_{part}"] == pytest.approx(lay[part], rel=2e-3), part


def test_gqa_o_proj_takes_attn_in(checkpoints, calibration, tmp_path):
    df = pd.read_csv(run_profiling(checkpoints["llama_gqa"], calibration, tmp_path / "gqa", rungs=(B4G64,)))
    o = df[df.module == "self_attn.o_proj"]
    assert (o["sensitivity"] == o["sens_attn_in"]).all()
    assert (o["sensitivity"] != o["sens_attn_out"]).all()
    df = pd.read_csv(run_profiling(checkpoints["llama_mha"], calibration, tmp_path / "mha", rungs=(B4G64,)))
    o = df[df.module == "self_attn.o_proj"]
    assert (o["sensitivity"] == o["sens_attn_out"]).all()


def test_identity_layer_has_lim_minus_one(tmp_path, calibration):
    path = _save("llama_gqa", tmp_path / "ident", zero_outputs_of_layer=1)
    df = pd.read_csv(run_profiling(path, calibration, tmp_path / "out", rungs=(B4G64,)))
    lim = df.groupby("layer")["lim"].first()
    assert lim[1] == pytest.approx(-1.0, abs=1e-6)  # o_proj = down_proj = 0: the layer returns its input
    assert lim[0] > -0.999 and lim[2] > -0.999


def test_table_format_and_allocation_reader(checkpoints, calibration, tmp_path):
    csv = run_profiling(checkpoints["llama_gqa"], calibration, tmp_path / "out")
    df = pd.read_csv(csv)
    assert tuple(df.columns) == COLUMNS
    assert len(df) == 3 * len(MODULES) * len(LADDER)
    per_module = df.groupby(["layer", "module"]).size()
    assert (per_module == 12).all() and len(per_module) == 21
    assert set(zip(df.nbit1, df.gsize1)) == {(r.bits, r.group_size) for r in LADDER}
    assert (df.nbit2 == 8).all() and (df.gsize2 == 128).all()
    for _, row in df.iterrows():
        assert row.memmb == pytest.approx(Rung(int(row.nbit1), int(row.gsize1)).mib(int(row.params)))
    assert df[df.module == "self_attn.k_proj"].params.iloc[0] == 64 * 32  # 2 KV heads of 16
    # fnorm falls with bits at a fixed group size
    q = df[(df.layer == 0) & (df.module == "self_attn.q_proj") & (df.gsize1 == 64)].sort_values("nbit1")
    assert q.fnorm.is_monotonic_decreasing
    pq = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    pd.testing.assert_frame_equal(pq, df, check_dtype=False)
    summary = json.loads((tmp_path / "out" / "profiling.json").read_text())
    assert summary["samples"] == 5 and summary["seq_len"] == 80 and summary["layers"] == 3
    from tasks.allocation.scores import read_scores

    scores = read_scores(csv)
    assert len(scores.keys) == 21 and len(scores.rungs) == 12


def test_deterministic_and_batch_size_independent(checkpoints, calibration, tmp_path):
    a = pd.read_csv(run_profiling(checkpoints["llama_gqa"], calibration, tmp_path / "a", batch_size=2, rungs=(B4G64,)))
    b = pd.read_csv(run_profiling(checkpoints["llama_gqa"], calibration, tmp_path / "b", batch_size=2, rungs=(B4G64,)))
    c = pd.read_csv(run_profiling(checkpoints["llama_gqa"], calibration, tmp_path / "c", batch_size=5, rungs=(B4G64,)))
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(a, c, rtol=1e-4)


def test_sharded_checkpoint_and_calibration_file(tmp_path, calibration, checkpoints):
    sharded = _save("llama_gqa", tmp_path / "sharded", shard="60KB")
    assert (sharded / "model.safetensors.index.json").exists()
    calib_dir = tmp_path / "calib"
    calib_dir.mkdir()
    save_file({"input_ids": calibration}, str(calib_dir / "calibration.safetensors"))
    from_file = pd.read_csv(run_profiling(sharded, calib_dir / "calibration.safetensors", tmp_path / "f", rungs=(B4G64,)))
    from_dir = pd.read_csv(run_profiling(sharded, calib_dir, tmp_path / "d", rungs=(B4G64,)))
    whole = pd.read_csv(run_profiling(checkpoints["llama_gqa"], calibration, tmp_path / "w", rungs=(B4G64,)))
    pd.testing.assert_frame_equal(from_file, from_dir)
    pd.testing.assert_frame_equal(from_file, whole)  # same seed: the same weights, only split in files


def test_never_loads_the_whole_model(checkpoints, calibration, tmp_path, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the profiler must not load the whole model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", refuse)
    reads: list[list[str]] = []
    import tasks.profiling.checkpoint as ckpt

    original = ckpt.Checkpoint.read

    def spy(self, names, dtype=torch.float32):
        reads.append(list(names))
        return original(self, names, dtype)

    monkeypatch.setattr(ckpt.Checkpoint, "read", spy)
    run_profiling(checkpoints["llama_gqa"], calibration, tmp_path / "out", rungs=(B4G64,))
    # Forward: one read per decoder layer; backward: the final norm, then each layer again from the last.
    # Each read holds one layer's tensors (or the norm) only; the output embedding is read in row chunks.
    layers = [{n.split(".")[2] for n in names if n.startswith("model.layers.")} for names in reads]
    assert layers == [{"0"}, {"1"}, {"2"}, set(), {"2"}, {"1"}, {"0"}]
    assert reads[3] == ["model.norm.weight"]
    assert all(all(n.startswith(f"model.layers.{i}.") for n in names) for i, names in zip("012", reads[:3]))


def test_bad_inputs_raise_pipeline_errors(checkpoints, tmp_path):
    path = checkpoints["llama_gqa"]
    with pytest.raises(PipelineError, match="not found"):
        run_profiling(path, tmp_path / "missing.safetensors", tmp_path / "o")
    with pytest.raises(PipelineError, match=r"\[samples, seq_len\]"):
        run_profiling(path, torch.zeros(7, dtype=torch.long), tmp_path / "o")
    with pytest.raises(PipelineError, match="integers"):
        run_profiling(path, torch.zeros(2, 4), tmp_path / "o")
    with pytest.raises(PipelineError, match="outside the vocabulary"):
        run_profiling(path, torch.full((2, 4), VOCAB), tmp_path / "o")
    with pytest.raises(PipelineError, match="batch_size"):
        run_profiling(path, torch.zeros(2, 4, dtype=torch.long), tmp_path / "o", batch_size=0)
    save_file({"ids": torch.zeros(2, 4, dtype=torch.long)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(PipelineError, match="input_ids"):
        run_profiling(path, tmp_path / "bad.safetensors", tmp_path / "o")
    with pytest.raises(PipelineError, match="config.json"):
        run_profiling(tmp_path, torch.zeros(2, 4, dtype=torch.long), tmp_path / "o")


def test_cli_profile(checkpoints, calibration, tmp_path, monkeypatch, capsys):
    from tasks.__main__ import main

    monkeypatch.setenv("QUANT_CACHE_DIR", str(tmp_path / "cache"))
    save_file({"input_ids": calibration}, str(tmp_path / "calibration.safetensors"))
    out = tmp_path / "out"
    argv = ["profile", "--model", str(checkpoints["llama_gqa"]), "--calibration", str(tmp_path / "calibration.safetensors"),
            "--out", str(out), "--batch-size", "3", "--rungs", "b4g64", "3.25", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == str(out / "scores.csv")
    df = pd.read_csv(printed)
    assert sorted(set(zip(df.nbit1, df.gsize1))) == [(3, 64), (4, 64)]
    assert main(["profile", "--model", str(tmp_path / "nowhere"), "--calibration", "x", "--out", str(out)]) == 2
    assert math.isfinite(df.sensitivity.sum())


def test_module_parts_rule():
    from tasks.profiling.driver import module_parts

    gqa = module_parts(torch.Size([32, 64]), torch.Size([64, 64]))
    mha = module_parts(torch.Size([64, 64]), torch.Size([64, 64]))
    assert gqa["self_attn.o_proj"] == "attn_in" and mha["self_attn.o_proj"] == "attn_out"
    for parts in (gqa, mha):
        assert [parts[m] for m in MODULES if m != "self_attn.o_proj"] == ["attn_in"] * 3 + ["mlp_gate"] * 2 + ["mlp_down"]


def test_embedding_read_in_row_chunks(checkpoints, calibration):
    from safetensors.torch import load_file

    from tasks.profiling.checkpoint import Checkpoint

    path = checkpoints["llama_gqa"]
    table = load_file(str(path / "model.safetensors"))["model.embed_tokens.weight"]
    got = Checkpoint(path).embed(calibration, rows=7)  # many chunks, most ids outside each one
    assert torch.equal(got, table[calibration])


class _Killed(BaseException):
    """What SIGKILL does to run_profiling, in-process: it stops at the point, and no cleanup of its own runs."""


@pytest.mark.parametrize("point", ["profiling.layer.0", "profiling.layer.1", "profiling.backward.2", "profiling.backward.0"])
def test_an_interrupted_profile_resumes_at_the_layer_it_stopped_in(checkpoints, calibration, tmp_path, monkeypatch, point):
    from tasks.profiling import driver
    from tasks.profiling.progress import PROGRESS_DIR

    args = dict(batch_size=2, rungs=(B4G64, Rung(3, 128)), fisher_samples=3)
    whole = pd.read_csv(run_profiling(checkpoints["llama_gqa"], calibration, tmp_path / "whole", **args))

    def die(name):
        if name == point:
            raise _Killed(name)

    monkeypatch.setattr(driver, "failpoint", die)
    with pytest.raises(_Killed):
        run_profiling(checkpoints["llama_gqa"], calibration, tmp_path / "out", **args)
    assert (tmp_path / "out" / PROGRESS_DIR / "state.json").exists()
    assert not (tmp_path / "out" / "scores.csv").exists()
    monkeypatch.setattr(driver, "failpoint", lambda name: None)
    resumed = pd.read_csv(run_profiling(checkpoints["llama_gqa"], calibration, tmp_path / "out", **args))
    summary = json.loads((tmp_path / "out" / "profiling.json").read_text())
    kind, where = point.split(".")[1], int(point.rsplit(".", 1)[1])
    assert summary["resumed_at_layer"] == (where if kind == "layer" else 3), "at most the interrupted layer is redone"
    pd.testing.assert_frame_equal(resumed, whole, check_exact=True)  # identical to the last digit, Fisher column included
    assert not (tmp_path / "out" / PROGRESS_DIR).exists(), "the progress files go once the scores are written"


def test_progress_of_other_parameters_is_not_resumed(checkpoints, calibration, tmp_path, monkeypatch):
    from tasks.profiling import driver

    monkeypatch.setattr(driver, "failpoint", lambda name: (_ for _ in ()).throw(_Killed()) if name == "profiling.layer.1" else None)
    with pytest.raises(_Killed):
        run_profiling(checkpoints["llama_gqa"], calibration, tmp_path / "out", rungs=(B4G64,), fisher_samples=0)
    monkeypatch.setattr(driver, "failpoint", lambda name: None)
    run_profiling(checkpoints["llama_gqa"], calibration[:4], tmp_path / "out", rungs=(B4G64,), fisher_samples=0)
    assert json.loads((tmp_path / "out" / "profiling.json").read_text())["resumed_at_layer"] == 0


def test_rival_scores_match_a_whole_model_reference(checkpoints, calibration, tmp_path):
    """taylor_dloss (ModelOpt: 1/2 sum_t sum_o g^2 dY^2) and delta_loss (AutoScheme: sum over windows of
    |dL/dW * dW|), per gradient token, against plain autograd on the whole model."""
    from transformers import AutoModelForCausalLM

    path, rungs, windows = checkpoints["llama_gqa"], (B4G64, Rung(2, 32)), 3
    df = pd.read_csv(run_profiling(path, calibration, tmp_path / "out", batch_size=2, rungs=rungs, fisher_samples=windows,
                                   rival_scores=True))  # fmt: skip
    assert json.loads((tmp_path / "out" / "profiling.json").read_text())["phase_seconds"]["rivals"] > 0
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = calibration[:windows]
    seen = inputs_and_output_gradients(model, ids)
    for (i, m), rows in df.groupby(["layer", "module"]):
        x, g = seen[f"{i}.{m}"]
        g, w = g.double(), model.model.layers[i].get_submodule(m).weight.detach()
        for _, row in rows.iterrows():
            err = (w - quant_dequant(w, Rung(int(row.nbit1), int(row.gsize1)))).double()
            taylor = 0.5 * (g.square() * F.linear(x.double(), err).square()).sum().item() / ids.numel()
            delta = sum((g[b].t() @ x[b].double() * err).abs().sum().item() for b in range(windows)) / ids.numel()
            assert row.taylor_dloss == pytest.approx(taylor, rel=1e-3), (i, m)
            assert row.delta_loss == pytest.approx(delta, rel=1e-3), (i, m)
    # The default profile leaves both columns empty and costs no rivals phase.
    plain = pd.read_csv(run_profiling(path, calibration, tmp_path / "plain", rungs=(B4G64,), fisher_samples=windows))
    assert plain["taylor_dloss"].isna().all() and plain["delta_loss"].isna().all()


def test_dkld_matches_a_whole_model_measurement(checkpoints, calibration, tmp_path):
    """ExLlamaV3's measurement: dKLD of a group at a rung = KLD of (all at base, that group at the rung)
    minus KLD of (all at base), each against the unquantized model, on the first windows."""
    from transformers import AutoModelForCausalLM

    path, rungs, windows = checkpoints["gemma2"], (Rung(2, 64), Rung(4, 64)), 2
    df = pd.read_csv(run_profiling(path, calibration, tmp_path / "out", rungs=rungs, fisher_samples=0, dkld_windows=windows,
                                   dkld_rungs=rungs))  # fmt: skip
    ids = calibration[:windows]

    def kld_with(upgrade: tuple[int, str] | None) -> float:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            ref = F.log_softmax(model(ids).logits, dim=-1)
            for i, layer in enumerate(model.model.layers):
                for m in MODULES:
                    linear = layer.get_submodule(m)
                    up = upgrade == (i, m.split(".")[0])
                    linear.weight.copy_(quant_dequant(linear.weight, rungs[1] if up else rungs[0]))
            logp = F.log_softmax(model(ids).logits, dim=-1)
        return (ref.exp() * (ref - logp)).sum(-1).mean().item()

    base = kld_with(None)
    for (layer, group) in ((0, "self_attn"), (2, "mlp")):
        rows = df[(df.layer == layer) & df.module.str.startswith(group) & (df.nbit1 == 4)]
        assert rows["dkld"].nunique() == 1  # one value per group, on each member's row
        assert rows["dkld"].iloc[0] == pytest.approx(kld_with((layer, group)) - base, rel=1e-3, abs=1e-7)
    assert (df[df.nbit1 == 2]["dkld"] == 0).all()
