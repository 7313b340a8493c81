"""Mixture-of-experts models (Qwen3-MoE, Mixtral): every expert a module of its own, scored on its routed tokens.

References are whole-model computations with transformers' own model (experts unstacked only after
checking that this changes nothing): each expert's inputs and output gradients are taken from a full
forward and backward, so the streaming profiler's per-expert Gram matrices, routing and gradient-token
counts are checked against an independent path. Layer 0's router is built so that expert 4 never gets a
token: it must take the documented fallback, not a zero.
"""

from __future__ import annotations

import logging

import pandas as pd
import pytest
import torch

from tasks.bitmap import uniform_bitmap
from tasks.experts import unstack_experts, unstack_state
from tasks.families import layout_for
from tasks.ladder import Rung, fused_groups
from tasks.model_io import linear_param_counts, read_config

EXPERTS, DEAD = 5, 4
COMMON = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              num_experts_per_tok=2, max_position_embeddings=1024)  # fmt: skip
RUNG = Rung(3, 64)


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(family: str):
    import transformers as tf

    if family == "qwen3_moe":  # checkpoint names: mlp.experts.<e>.gate_proj ...
        return tf.Qwen3MoeConfig(**COMMON, intermediate_size=128, num_experts=EXPERTS, moe_intermediate_size=32)
    return tf.MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=EXPERTS)  # block_sparse_moe.experts.<e>.w1 ...


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe(request, tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(_config(request.param)).eval()
    with torch.no_grad():  # layer 0: experts 0/1 and 2/3 split the tokens by the sign of v.x and u.x; 4 scores 0, always third
        v, u = torch.nn.functional.normalize(torch.randn(2, COMMON["hidden_size"]), dim=1)  # small logits: no softmax underflow to ties
        model.model.layers[0].mlp.gate.weight.copy_(torch.stack([v, -v, u, -u, torch.zeros_like(v)]))
    path = tmp_path_factory.mktemp("moe") / request.param
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 512, (4, 48), generator=torch.Generator().manual_seed(1))


def _model(path):
    from tasks.model_io import load_model

    model = load_model(path)
    unstack_experts(model)
    return model


def test_unstacked_experts_compute_what_transformers_computes(moe, ids):
    from tasks.model_io import load_model

    stacked = load_model(moe)
    with torch.no_grad():
        a = stacked(ids).logits
        unstack_experts(stacked)
        b = stacked(ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert type(stacked.model.layers[0].mlp.experts[3].down_proj).__name__ == "Linear"


def test_stacked_expert_tensors_map_to_the_hub_names():
    gate_up, down = torch.randn(3, 8, 4), torch.randn(3, 4, 4)
    state = unstack_state({"mlp.experts.gate_up_proj": gate_up, "mlp.experts.down_proj": down, "mlp.gate.weight": torch.ones(3, 4)})
    assert torch.equal(state["mlp.experts.2.gate_proj.weight"], gate_up[2, :4])
    assert torch.equal(state["mlp.experts.2.up_proj.weight"], gate_up[2, 4:])
    assert torch.equal(state["mlp.experts.1.down_proj.weight"], down[1]) and "mlp.gate.weight" in state
    w = torch.randn(4, 4)
    mixtral = unstack_state({"block_sparse_moe.experts.3.w1.weight": w, "block_sparse_moe.experts.3.w3.weight": w + 1,
                             "block_sparse_moe.experts.3.w2.weight": w + 2, "block_sparse_moe.gate.weight": w})  # fmt: skip
    assert sorted(mixtral) == ["mlp.experts.3.down_proj.weight", "mlp.experts.3.gate_proj.weight", "mlp.experts.3.up_proj.weight",
                               "mlp.gate.weight"]  # fmt: skip
    assert torch.equal(mixtral["mlp.experts.3.up_proj.weight"], w + 1) and torch.equal(mixtral["mlp.experts.3.down_proj.weight"], w + 2)


def test_layout_lists_every_expert_with_its_own_inputs(moe):
    config = read_config(moe)
    layout = layout_for(config)
    assert layout.experts == EXPERTS and len(layout.modules) == 4 + 3 * EXPERTS and not layout.stacked
    assert layout.modules[4:7] == ("mlp.experts.0.gate_proj", "mlp.experts.0.up_proj", "mlp.experts.0.down_proj")
    assert [layout.input_of(m) for m in layout.modules[4:10]] == ["mlp.0", "mlp.0", "act.0", "mlp.1", "mlp.1", "act.1"]
    params = linear_param_counts(config)
    assert params["1.mlp.experts.4.down_proj"] == 64 * 32 and params["0.self_attn.q_proj"] == 64 * 64 and len(params) == 2 * 19
    with pytest.raises(Exception, match="every decoder layer must be a mixture of experts"):
        layout_for({**config, "mlp_only_layers": [1]})


def _reference(moe, ids, grad_samples):
    """Per (layer, expert, projection): its routed inputs over all windows, and over the first `grad_samples`
    windows the summed squared output gradients, the routed token count, the inputs and the gradients."""
    model = _model(moe)
    inputs, grads, outputs = {}, {}, {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for e, expert in enumerate(layer.mlp.experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                def keep(module, args, output, key=(i, e, proj)):
                    if output.requires_grad:
                        output.retain_grad()
                        outputs[key] = (args[0].detach(), output)
                    else:
                        inputs.setdefault(key, []).append(args[0].detach())
                hooks.append(getattr(expert, proj).register_forward_hook(keep))
    with torch.no_grad():
        model(ids)
    x = {k: torch.cat(v) for k, v in inputs.items()}
    inputs.clear()
    logits = model(ids[:grad_samples]).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:grad_samples, 1:].reshape(-1), reduction="sum")
    nll.backward()
    for key, (xg, out) in outputs.items():
        grads[key] = (out.grad.double().square().sum(dim=0), out.shape[0], xg, out.grad.detach())
    for h in hooks:
        h.remove()
    return model, x, grads


def test_profile_scores_each_expert_on_its_routed_tokens(moe, ids, tmp_path, caplog):
    from tasks.profiling import hqq_fast
    from tasks.profiling.driver import run_profiling

    with caplog.at_level(logging.WARNING):
        table = pd.read_csv(run_profiling(moe, ids, tmp_path / "p", batch_size=3, fisher_samples=2, rival_scores=True))
    assert len(table) == 2 * (4 + 3 * EXPERTS) * 12
    model, x, grads = _reference(moe, ids, grad_samples=2)
    assert (0, DEAD, "gate_proj") not in x and all((1, e, "gate_proj") in x for e in range(EXPERTS))  # the router did its job
    tokens = ids.numel()
    at = table[(table.nbit1 == RUNG.bits) & (table.gsize1 == RUNG.group_size)].set_index(["layer", "module"])
    checked = 0
    for (layer, e, proj), xs in x.items():
        w = getattr(model.model.layers[layer].mlp.experts[e], proj).weight.detach()
        dy = xs @ (w - hqq_fast.quant_dequant(w, RUNG)).t()  # the output error on the routed tokens
        row = at.loc[(layer, f"mlp.experts.{e}.{proj}")]
        assert row["out_err"] == pytest.approx(dy.square().sum().item() / (xs.shape[0] * w.shape[0]), rel=1e-4)
        if (layer, e, proj) in grads:
            sq, routed, xg, g = grads[(layer, e, proj)]
            expected = 0.5 * (dy.double().square().sum(dim=0) @ sq).item() / (tokens * routed)
            assert row["fisher_dloss"] == pytest.approx(expected, rel=1e-3)
            # The rivals on the gradient tokens (2 windows = one backward step): ModelOpt's token-wise product,
            # AutoScheme's |dL/dW * dW| with the step's gradient.
            dw, grad_tokens = w - hqq_fast.quant_dequant(w, RUNG), ids[:2].numel()
            taylor = 0.5 * ((xg @ dw.t()).square() * g.square()).sum().item() / grad_tokens
            assert row["taylor_dloss"] == pytest.approx(taylor, rel=1e-3)
            assert row["delta_loss"] == pytest.approx(((g.t() @ xg) * dw).abs().sum().item() / grad_tokens, rel=1e-3)
            checked += 1
    assert checked >= 20
    # The expert without a token: the layer's pooled expert inputs at the average expert's token count.
    w = model.model.layers[0].mlp.experts[DEAD].gate_proj.weight.detach()
    routed = [x[(0, e, "gate_proj")] for e in range(EXPERTS) if e != DEAD]
    pooled = torch.cat(routed)
    dy = pooled @ (w - hqq_fast.quant_dequant(w, RUNG)).t()
    dead = at.loc[(0, f"mlp.experts.{DEAD}.gate_proj")]
    assert dead["out_err"] == pytest.approx(dy.square().sum().item() / (pooled.shape[0] * w.shape[0]), rel=1e-4)
    assert dead["fisher_dloss"] > 0 and dead["sensitivity"] > 0
    assert any("got no calibration token" in r.getMessage() for r in caplog.records)


def test_experts_are_fused_and_tied_by_layer(moe, ids, tmp_path):
    from tasks.allocation.methods import METHODS
    from tasks.allocation.registry import allocate
    from tasks.allocation.scores import read_scores
    from tasks.profiling.driver import run_profiling

    keys = ["0.self_attn.q_proj", "0.self_attn.k_proj", "0.mlp.experts.0.gate_proj", "0.mlp.experts.0.up_proj",
            "0.mlp.experts.0.down_proj", "0.mlp.experts.1.gate_proj", "1.mlp.experts.0.gate_proj"]  # fmt: skip
    assert fused_groups(keys) == [[0, 1], [2, 3], [4], [5], [6]]
    assert fused_groups(keys, fused=False, experts=True) == [[0], [1], [2, 3, 4, 5], [6]]
    scores = read_scores(run_profiling(moe, ids, tmp_path / "p", batch_size=4, fisher_samples=2, dkld_windows=1, rival_scores=True))
    assert scores.keys[4:7] == ("0.mlp.experts.0.gate_proj", "0.mlp.experts.0.up_proj", "0.mlp.experts.0.down_proj")
    for method in ("optimal", "mxq", "sensiboost"):
        budget = 3.6 if method != "sensiboost" else "b3g64"
        free = allocate(scores, method, budget)
        tied = allocate(scores, method, budget, {"tie_experts": True})
        for layer in (0, 1):
            rungs = {r for k, r in tied.modules.items() if k.startswith(f"{layer}.mlp.experts.")}
            assert len(rungs) == 1, (method, layer, rungs)
        if method != "sensiboost":
            assert tied.nominal_bpp <= 3.6 and free.nominal_bpp <= 3.6 and tied.options["tie_experts"]
    greedy = allocate(scores, "dkld_greedy", 3.6)  # ExLlamaV3's groups: a layer's experts move as its MLP
    assert greedy.nominal_bpp <= 3.6
    for layer in (0, 1):
        assert len({r for k, r in greedy.modules.items() if k.startswith(f"{layer}.mlp.experts.")}) == 1
    for method, spec in METHODS.items():  # every allocator takes the expert modules
        if spec.external:
            continue
        bitmap = allocate(scores, method, "b3g64" if spec.budget == "rung" else 3.6)
        assert set(bitmap.modules) == set(scores.keys), method
        assert spec.budget == "rung" or bitmap.nominal_bpp <= 3.6, method


def test_hqq_quantizes_every_expert_at_its_rung_and_reloads_it(moe, ids, tmp_path):
    from tasks.quantize.hqq import HQQBackend

    bitmap = uniform_bitmap(linear_param_counts(read_config(moe)), Rung(4, 64))
    bitmap.modules["0.mlp.experts.2.down_proj"] = Rung(8, 32)
    bitmap.modules["1.mlp.experts.3.up_proj"] = Rung(2, 128)
    backend = HQQBackend()
    backend.quantize(moe, bitmap, None, tmp_path, {})
    loaded = backend.load(tmp_path)
    linears = {k: m for k, m in loaded.named_modules() if type(m).__name__ == "HQQLinear"}
    assert len(linears) == 2 * (4 + 3 * EXPERTS)
    assert linears["model.layers.0.mlp.experts.2.down_proj"].meta["nbits"] == 8
    assert linears["model.layers.1.mlp.experts.3.up_proj"].meta["nbits"] == 2
    assert linears["model.layers.1.mlp.experts.3.down_proj"].meta["nbits"] == 4
    assert type(loaded.model.layers[0].mlp.gate).__name__.endswith("Router")  # the router stays unquantized
    # The reloaded model is the full-precision model with each linear's dequantized weights (and the
    # tensors outside the decoder blocks' attention and MLP stored in 16-bit, as the backend stores them).
    reference = _model(moe)
    with torch.no_grad():
        for name, layer in linears.items():
            reference.get_submodule(name).weight.copy_(layer.dequantize().float())
        for name, param in reference.named_parameters():
            if ".self_attn." not in name and ".mlp." not in name:
                param.copy_(param.half().float())
        assert torch.allclose(loaded(ids).logits, reference(ids).logits, atol=1e-4)


@pytest.mark.parametrize("backend", ["gptq", "awq", "bnb"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_backends_without_expert_bit_maps_refuse_moe_in_one_line(backend, family):
    from tasks.quantize.registry import get_backend

    reason = get_backend(backend).family_refusal(family)
    assert reason and "\n" not in reason and "use hqq" in reason and family in reason
