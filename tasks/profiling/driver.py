"""The profiling stage: one streaming, layer-by-layer pass over a checkpoint that yields the scores table.

Only one decoder layer's weights and one mini-batch of its activations are held beyond the calibration
hidden states [samples, seq_len, hidden]. For each layer i (input: the full-precision output of layer
i-1, docs/methods.md §3):

1. weights only: Pearson kurtosis per matrix, ZD of the layer (docs/methods.md §5);
2. one full-precision pass of the calibration batches through the layer (transformers' own decoder-layer
   class), with hooks keeping the linears' inputs; from it LIM, the input Gram matrices H of the four
   distinct linear inputs, and the SensiBoost parts that need the nonlinear blocks: attn_in (q, k, v at
   HQQ b4g64, attention block output with o_proj in full precision) and mlp_gate (gate, up at b4g64,
   MLP output with down_proj in full precision);
3. per module and ladder rung: HQQ quantize-dequantize, Frobenius error, and the output MSE
   trace(dW H dW^T) / (tokens * out_features); the attn_out and mlp_down parts are this same quantity at
   b4g64 (exact, see activations.py), so neither quantized linear is ever run on the data.

Then, for `optimal`'s loss estimate, a backward pass of the calibration loss over the first
`fisher_samples` samples, streamed from the last layer to the first (fisher.py): each module's squared
output gradients weight its per-output error of every rung into `fisher_dloss`, the estimated increase
of the mean calibration NLL (nats per token) when that module alone is quantized at that rung.

Everything is float32, on the CPU unless a device is given, and deterministic for a given torch build, device
and thread count.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from tasks.artifacts import write_json_atomic
from tasks.errors import PipelineError
from tasks.failpoints import failpoint
from tasks.families import ATTN_IN, MLP_GATE, Layout, leaf
from tasks.ladder import GGUF_LADDER, LADDER, Rung
from tasks.profiling import dkld, hqq_fast, rivals
from tasks.profiling.gptq_errors import gptq_rung_errors
from tasks.profiling.fisher import TOKENS, InputStash, fisher_loss_delta, head_gradient, layer_backward
from tasks.profiling.activations import Gram, QuadraticForm, cosine_sum, squared_error, squared_norm
from tasks.profiling.checkpoint import Checkpoint, LayerFactory, load_config
from tasks.profiling.progress import ProfileProgress
from tasks.profiling.table import IMATRIX_FILE, PARTS, SUMMARY_FILE, row_rung, score_row, write_profile_imatrix, write_scores
from tasks.profiling.weights import kurtosis, zd_fraction

log = logging.getLogger(__name__)

SENSITIVITY_RUNG = Rung(4, 64)  # SensiBoost measures every part at HQQ b4g64
# Of the 32 default calibration windows. On SmolLM2's frontier benchmark 8 windows chose allocations as good
# as 16 (11/11 wins either way; lower perplexity at 6 points, at most 2.5% higher at 3) for half the cost.
DEFAULT_FISHER_SAMPLES = 8
# Samples per step of the backward pass: autograd keeps every intermediate of a layer (attention scores
# included) and the loss head a [tokens, vocab chunk] block, so it takes fewer samples than the forward;
# the sums it accumulates do not depend on the split.
GRAD_BATCH = 2
GPTQ_KEY = "gptq:"  # row_errors of GPTQ's rungs: under this prefix + the module's key
IMATRIX_KEY = "imatrix:"  # per module: [tokens, sum of squares of each input column], for llama.cpp's imatrix
CALIBRATION_FILE = "calibration.safetensors"


def load_calibration(calibration) -> torch.Tensor:
    """input_ids int64 [samples, seq_len] from a tensor, a calibration.safetensors file or its directory."""
    if isinstance(calibration, torch.Tensor):
        ids = calibration
    else:
        from safetensors.torch import load_file

        path = Path(calibration)
        if path.is_dir():
            path = path / CALIBRATION_FILE
        if not path.is_file():
            raise PipelineError(f"calibration file not found: {path}")
        tensors = load_file(str(path))
        if "input_ids" not in tensors:
            raise PipelineError(f"calibration file {path} has no 'input_ids' tensor (it has: {', '.join(tensors)})")
        ids = tensors["input_ids"]
    if ids.dim() != 2 or ids.numel() == 0:
        raise PipelineError(f"calibration input_ids must be a non-empty [samples, seq_len] tensor, got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise PipelineError(f"calibration input_ids must be integers, got {ids.dtype}")
    if int(ids.min()) < 0:
        raise PipelineError("calibration input_ids has negative token ids")
    return ids.long()


class _Capture:
    """Hooks on the full-precision layer keeping, for the current batch, every distinct linear input
    (`Layout.input_of`: q/k/v's, o's, the MLP's, down's; per expert for MoE, only the tokens routed to it)
    and the outputs of o_proj (attention block output) and of the MLP block."""

    def __init__(self, layer: torch.nn.Module, layout: Layout):
        self.store: dict[str, torch.Tensor] = {}

        def get(module):  # the stored linear holding the logical module (Phi-3: q in qkv_proj)
            return layer.get_submodule(layout.stored_name(module))

        self._handles = [
            get("self_attn.q_proj").register_forward_pre_hook(self._keep_input("attn")),
            get("self_attn.o_proj").register_forward_hook(self._keep_both("ctx", "attn_out")),
            layer.mlp.register_forward_pre_hook(self._keep_input("mlp")),
            layer.mlp.register_forward_hook(self._keep_output("mlp_out")),
        ]
        for module in layout.modules:  # the down projections' inputs; for MoE also each expert's own input
            key = layout.input_of(module)
            if key.startswith("act") or (key.startswith("mlp.") and leaf(module) == "gate_proj"):
                self._handles.append(get(module).register_forward_pre_hook(self._keep_input(key)))

    def _keep_output(self, name):
        def hook(module, args, output):
            self.store[name] = _first(output)

        return hook

    def _keep_input(self, name):
        def hook(module, args):
            self.store[name] = args[0]

        return hook

    def _keep_both(self, name_in, name_out):
        def hook(module, args, output):
            self.store[name_in] = args[0]
            self.store[name_out] = output

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.store.clear()


@contextmanager
def _phase(seconds: dict, name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] += time.perf_counter() - start


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def module_parts(v_shape: torch.Size, o_shape: torch.Size, modules=ATTN_IN + ("self_attn.o_proj",) + MLP_GATE + ("mlp.down_proj",)) -> dict[str, str]:
    """Which SensiBoost part scores each linear. With grouped-query attention (v_proj narrower than
    o_proj) the authors measure no attn_out part, and o_proj takes the attn_in score (docs/methods.md §3).
    The experts of an MoE layer take their layer's MLP parts (gate/up: mlp_gate, down: mlp_down)."""
    by_leaf = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_gate", "up_proj": "mlp_gate",
               "down_proj": "mlp_down", "o_proj": "attn_out" if tuple(v_shape) == tuple(o_shape) else "attn_in"}  # fmt: skip
    return {m: by_leaf[leaf(m)] for m in modules}


def _calibration_pass(index: int, layer, qlayer, factory: LayerFactory, hidden: torch.Tensor, batch_size: int,
                      grams: dict[str, Gram], normalize: bool, seconds: dict) -> dict[str, float]:  # fmt: skip
    """Run every mini-batch through the full-precision layer (advancing `hidden` in place) and through
    the b4g64 attention and MLP blocks; accumulate the Gram matrices and the sums LIM and the
    attn_in / mlp_gate parts need."""
    samples, seq_len = hidden.shape[:2]
    sums: dict[str, float] = defaultdict(float)
    position_ids = torch.arange(seq_len, device=hidden.device).unsqueeze(0)
    position_embeddings = factory.position_embeddings(index, hidden[:1], position_ids)
    capture = _Capture(layer, factory.layout)
    try:
        for start in range(0, samples, batch_size):
            h = hidden[start : start + batch_size]
            mask = factory.mask(index, h, position_ids)
            kwargs = dict(attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
            with _phase(seconds, "forward"):
                out = _first(layer(h, **kwargs))
            got = capture.store
            with _phase(seconds, "gram"):
                sums["cos"] += cosine_sum(h, out)
                for key, gram in grams.items():
                    if key in got:  # an expert no token of this batch was routed to has no input
                        gram.update(got[key])
            with _phase(seconds, "sensitivity"):
                attn_q = _first(qlayer.self_attn(hidden_states=got["attn"], **kwargs))
                sums["attn_in"] += squared_error(attn_q, got["attn_out"])
                del attn_q
                mlp_q = qlayer.mlp(got["mlp"])
                sums["mlp_gate"] += squared_error(mlp_q, got["mlp_out"])
                del mlp_q
                if normalize:
                    sums["attn_in_ref"] += squared_norm(got["attn_out"])
                    sums["mlp_gate_ref"] += squared_norm(got["mlp_out"])
            got.clear()
            hidden[start : start + batch_size] = out
            del out
    finally:
        capture.remove()
    return sums


def _parts(sums: dict[str, float], forms: dict[str, QuadraticForm], layout: Layout, weights: dict, sens_q: dict,
           tokens: int, normalize: bool) -> dict[str, float]:  # fmt: skip
    """The four SensiBoost parts: plain MSE over tokens and output features, or relative to |WX|^2.
    For MoE, mlp_down sums every expert's down-projection error over its routed tokens (before the
    router's weighting)."""
    o = "self_attn.o_proj"
    downs = [m for m in layout.modules if leaf(m) == "down_proj"]

    def down_total(delta) -> float:
        return sum(forms[layout.input_of(m)].total(delta(m)) for m in downs)

    raw = {
        "attn_in": sums["attn_in"],
        "attn_out": forms["ctx"].total(weights[o] - sens_q[o]),  # = sum_t ||dW_o x_t||^2, exactly
        "mlp_gate": sums["mlp_gate"],
        "mlp_down": down_total(lambda m: weights[m] - sens_q[m]),
    }
    if normalize:  # the paper's Eq. 10
        ref = {
            "attn_in": sums["attn_in_ref"],
            "attn_out": forms["ctx"].total(weights[o]),
            "mlp_gate": sums["mlp_gate_ref"],
            "mlp_down": down_total(lambda m: weights[m]),
        }
        return {p: raw[p] / ref[p] if ref[p] > 0 else math.nan for p in PARTS}
    width = weights[o].shape[0]  # the hidden size: both blocks' output width
    return {p: raw[p] / (tokens * width) for p in PARTS}


def _rung_errors(w: torch.Tensor, rungs: tuple[Rung, ...], known: dict[Rung, torch.Tensor], importance: torch.Tensor | None = None,
                 copies: dict[int, int] | None = None) -> torch.Tensor:  # fmt: skip
    """W - dequant(rung(W)) for every rung, stacked along the rows: [len(rungs) * out, in]. An HQQ rung by
    HQQ; a gguf rung by ggml's own quantizer with `importance` (llama.cpp's imatrix: the mean squared input
    per column) at the type llama-quantize writes for these rows. `copies` receives {k: j} for every rung k
    whose errors are rung j's (two gguf types with one fallback on these rows)."""
    out = w.shape[0]
    stack = torch.empty(len(rungs) * out, w.shape[1], device=w.device)
    done: dict[Rung, int] = {}  # gguf rungs written as the same type (a fallback) share one quantization
    for k, rung in enumerate(rungs):
        if rung.ggml:
            from tasks.quantize.ggml_quant import ggml_rung_error
            from tasks.quantize.ggml_types import written_rung

            written = written_rung(rung, w.shape[1])
            if written in done:
                stack[k * out : (k + 1) * out] = stack[done[written] * out : (done[written] + 1) * out]
                if copies is not None:
                    copies[k] = done[written]
            else:
                stack[k * out : (k + 1) * out] = ggml_rung_error(w, written, importance)
                done[written] = k
            continue
        deq = known[rung] if rung in known else hqq_fast.quant_dequant(w, rung)
        torch.sub(w, deq, out=stack[k * out : (k + 1) * out])
    return stack


def _distinct_errors(w: torch.Tensor, rungs: tuple[Rung, ...], importance: torch.Tensor | None) -> tuple[torch.Tensor, int, list[int] | None]:
    """(errors of the distinct rungs only [d * out, in], d, every rung's index among them): the arguments
    of rivals.accumulate after `errors`' (module, key, x, g)."""
    copies: dict[int, int] = {}
    errors = _rung_errors(w, rungs, {}, importance, copies)
    if not copies:
        return errors, len(rungs), None
    distinct, index = _distinct(len(rungs), copies)
    return errors.view(len(rungs), w.shape[0], -1)[distinct].reshape(-1, w.shape[1]), len(distinct), index


def _distinct(rungs: int, copies: dict[int, int]) -> tuple[list[int], list[int]]:
    """(the rungs whose errors are their own, every rung's index among those): `copies` as _rung_errors fills it."""
    distinct = [k for k in range(rungs) if k not in copies]
    return distinct, [distinct.index(copies.get(k, k)) for k in range(rungs)]


def _row_sums(form: QuadraticForm, errors: torch.Tensor, rungs: int, copies: dict[int, int]) -> torch.Tensor:
    """form.row_sums of every rung's errors [rungs, out], each distinct rung's computed once."""
    if not copies:
        return form.row_sums(errors).view(rungs, -1)
    distinct, index = _distinct(rungs, copies)
    blocks = errors.view(rungs, -1, errors.shape[1])
    sums = form.row_sums(blocks[distinct].reshape(-1, errors.shape[1])).view(len(distinct), -1)
    return sums[index]


def profile_layer(index: int, state: dict[str, torch.Tensor], factory: LayerFactory, hidden: torch.Tensor, *,
                  batch_size: int, rungs: tuple[Rung, ...], normalize: bool, seconds: dict,
                  gptq: bool = False, keep: dict | None = None) -> tuple[list[dict], dict[str, torch.Tensor]]:  # fmt: skip
    """Score decoder layer `index` and advance `hidden` in place to its full-precision output.

    Returns the layer's rows of the scores table (one per module and rung) and, per module, the summed
    squared output error of every rung per output feature [rungs, out] (for `fisher_dloss`); with `gptq`,
    also the rows' `out_err_gptq` and the same errors of GPTQ's rungs under `GPTQ_KEY + module`. A `keep`
    dict receives the layer's input Gram matrices and token counts ({"matrices": ..., "counts": ...}).
    """
    weights = factory.layout.weights(state)
    tokens = hidden.shape[0] * hidden.shape[1]
    with _phase(seconds, "weights"):
        kurt = {m: kurtosis(w) for m, w in weights.items()}
        zd = zd_fraction(weights.values())
    with _phase(seconds, "hqq"):
        sens_q = {m: hqq_fast.quant_dequant(w, SENSITIVITY_RUNG) for m, w in weights.items()}

    layout = factory.layout
    layer = factory.build(index, state).requires_grad_(False)
    block_in = [m for m in layout.modules if leaf(m) in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")]
    qlayer = factory.build(index, layout.with_weights(state, {m: sens_q[m] for m in block_in}))
    grams = {layout.input_of(m): Gram(weights[m].shape[1], device=hidden.device) for m in layout.modules}
    sums = _calibration_pass(index, layer, qlayer.requires_grad_(False), factory, hidden, batch_size, grams, normalize, seconds)
    del layer, qlayer

    with _phase(seconds, "out_err"):
        matrices, counts = _input_statistics(index, grams, layout)
        forms = {key: QuadraticForm(h) for key, h in matrices.items()}
        parts = _parts(sums, forms, layout, weights, sens_q, tokens, normalize)
    part_of = module_parts(weights["self_attn.v_proj"].shape, weights["self_attn.o_proj"].shape, layout.modules)
    lim = -sums["cos"] / tokens

    rows, row_errors = [], {}
    ggml = any(r.ggml for r in rungs)
    for m in layout.modules:
        w, source = weights[m], layout.input_of(m)
        if ggml:  # llama.cpp's importance matrix: per input column, the sum of squares and the tokens behind it
            row_errors[IMATRIX_KEY + m] = torch.cat([matrices[source].diagonal().new_tensor([counts[source]]), matrices[source].diagonal()]).float()
        with _phase(seconds, "hqq"):
            importance = matrices[source].diagonal().float() / max(counts[source], 1.0) if ggml else None
            copies: dict[int, int] = {}
            errors = _rung_errors(w, rungs, {SENSITIVITY_RUNG: sens_q[m]}, importance, copies)
        with _phase(seconds, "out_err"):  # all distinct rungs in one pass of block products
            row_errors[m] = _row_sums(forms[source], errors, len(rungs), copies)
            out_err = row_errors[m].sum(dim=1) / (counts[source] * w.shape[0])
            fnorm = [torch.linalg.vector_norm(e, dtype=torch.float64).item() for e in errors.view(len(rungs), -1)]
        for rung, f, e in zip(rungs, fnorm, out_err.tolist()):
            rows.append(
                score_row(index, m, rung, shape=tuple(w.shape), fnorm=f, kurtosis=kurt[m], sensitivity=parts[part_of[m]],
                          lim=lim, zd=zd, out_err=e, parts=parts)  # fmt: skip
            )
        del errors
    if gptq:
        _gptq_errors(rows, row_errors, weights, matrices, counts, forms, layout, rungs, seconds)
    if keep is not None:
        keep.update(matrices=matrices, counts=counts)
    return rows, row_errors


def _gptq_errors(rows: list[dict], row_errors: dict, weights: dict, matrices: dict, counts: dict, forms: dict, layout: Layout,
                 rungs: tuple[Rung, ...], seconds: dict) -> None:  # fmt: skip
    """`out_err_gptq` on the layer's HQQ rows and GPTQ's per-output errors into `row_errors` (gptq_errors.py)."""
    rungs = hqq_rungs(rungs)
    out_err = {}
    for key, members in _by_input(layout, weights).items():
        with _phase(seconds, "gptq"):
            errors = gptq_rung_errors(members, matrices[key], int(counts[key]), rungs)
        for m, e in errors.items():
            row_errors[GPTQ_KEY + m] = forms[key].row_sums(e).view(len(rungs), -1)
            out_err[m] = (row_errors[GPTQ_KEY + m].sum(dim=1) / (counts[key] * weights[m].shape[0])).tolist()
    for row, value in zip(rows, _rung_values(rows, rungs, lambda row: row["module"], out_err)):
        row["out_err_gptq"] = value


def _by_input(layout: Layout, weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The modules' weights grouped by the input they share (q/k/v; gate/up): one GPTQ solve per input."""
    by_input: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for m in layout.modules:
        by_input[layout.input_of(m)][m] = weights[m]
    return by_input


def _rung_values(rows: list[dict], rungs: tuple[Rung, ...], key, values: dict) -> list:
    """For each row, values[key(row)][the position of the row's rung in `rungs`] (values: one list per key)."""
    position = {r.name: i for i, r in enumerate(rungs)}
    return [values[key(row)][position[name]] if (name := row_rung(row).name) in position else None for row in rows]


def column_importance(row_errors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per module key, llama.cpp's importance of its input columns (mean squared activation), from its
    `imatrix:` entry (tokens, then sums)."""
    return {k.removeprefix(IMATRIX_KEY): v[1:] / max(float(v[0]), 1.0) for k, v in row_errors.items() if k.startswith(IMATRIX_KEY)}


def hqq_rungs(rungs: tuple[Rung, ...]) -> tuple[Rung, ...]:
    """The rungs of the HQQ ladder (the ones GPTQ's solver and the rivals' scores take)."""
    return tuple(r for r in rungs if not r.ggml)


def _row_key(row: dict) -> str:
    return f"{row['layer']}.{row['module']}"


def _input_statistics(index: int, grams: dict[str, Gram], layout: Layout) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Per captured input, its float64 Gram matrix and the tokens behind it.

    An expert that no calibration token was routed to would score zero everywhere and be given the lowest
    rung on data this calibration set does not cover. Instead it takes the pooled statistics of the layer's
    other experts (the sum of their Gram matrices per token) at the average expert's token count: what a
    typical expert of that layer sees (a warning names them)."""
    matrices = {key: gram.matrix(torch.float64) for key, gram in grams.items()}
    counts = {key: float(gram.tokens) for key, gram in grams.items()}
    if not layout.experts:
        return matrices, counts
    for kind in ("mlp", "act"):
        keys = [f"{kind}.{e}" for e in range(layout.experts)]
        routed = [k for k in keys if counts[k] > 0]
        empty = [k for k in keys if counts[k] == 0]
        if empty and routed:
            total = sum(counts[k] for k in routed)
            pooled = sum(matrices[k] for k in routed) / total
            for k in empty:
                counts[k] = total / len(keys)
                matrices[k] = pooled * counts[k]
            if kind == "mlp":
                log.warning("layer %d: %d expert(s) got no calibration token (%s); they take the layer's pooled expert "
                            "statistics", index, len(empty), ", ".join(k.split(".")[1] for k in empty))  # fmt: skip
    return matrices, counts


def _loss_head(checkpoint: Checkpoint, factory: LayerFactory, device: torch.device):
    """The final norm and a row reader of the output embedding (the input embedding when tied)."""
    config = factory.config
    norm = factory.build_norm(checkpoint.read([f"{checkpoint.prefix}norm.weight"])[f"{checkpoint.prefix}norm.weight"].to(device))
    name = "lm_head.weight" if checkpoint.has("lm_head.weight") else checkpoint.embed_name
    if name == checkpoint.embed_name and not getattr(config, "tie_word_embeddings", False):
        raise PipelineError(f"checkpoint {checkpoint.path} has no lm_head.weight and does not tie its embeddings")
    return norm, (lambda start, stop: checkpoint.read_rows(name, start, stop).to(device)), checkpoint.rows(name)


def _output_gradients(checkpoint: Checkpoint, factory: LayerFactory, stash: InputStash, hidden: torch.Tensor,
                      ids: torch.Tensor, batch_size: int, seconds: dict, progress: ProfileProgress,
                      rival_rungs: tuple[Rung, ...] = (), importance: dict[str, torch.Tensor] | None = None,
                      gptq_rungs: tuple[Rung, ...] = ()) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per module key, the sum over the gradient samples' tokens of its squared output gradients of the
    calibration NLL: the loss head, then one layer at a time from the last, each rebuilt from the
    checkpoint and fed its stashed input; `progress` is saved after each (and resumed from). With
    `rival_rungs`, also the rivals' sums over those rungs (tasks.profiling.rivals), under their own keys;
    `importance` (module key -> mean squared input per column) prices their gguf rungs. With `gptq_rungs`,
    the same per-token sums of GPTQ's own errors at those rungs (under GPTQ_KEY + module key), rebuilt by
    GPTQ's solver from the Gram matrices the forward pass stashed."""
    importance = importance or {}
    layers = factory.config.num_hidden_layers
    seq_len, device = hidden.shape[1], hidden.device
    position_ids = torch.arange(seq_len, device=device).unsqueeze(0)
    batch_size = min(batch_size, GRAD_BATCH)
    ids = ids.to(device)
    if progress.backward_next is not None:
        grad, squares = progress.load_backward(device)
        log.info("fisher: resuming the backward pass at layer %d", progress.backward_next)
    else:
        with _phase(seconds, "backward"):
            norm, read_rows, vocab = _loss_head(checkpoint, factory, device)
            grad = torch.empty_like(hidden)
            nll = 0.0
            for start in range(0, hidden.shape[0], batch_size):
                part = slice(start, start + batch_size)
                grad[part], batch_nll = head_gradient(hidden[part], ids[part], norm, read_rows, vocab, softcap=factory.logit_softcap)
                nll += batch_nll
        log.info("fisher: calibration loss %.4f nats/token on %d samples; backward through %d layers",
                 nll / (ids.shape[0] * (seq_len - 1)), ids.shape[0], layers)  # fmt: skip
        squares = {}
        progress.save_backward(layers - 1, grad, squares)
    for index in reversed(range(progress.backward_next + 1)):
        with _phase(seconds, "backward"):
            state = _on(checkpoint.layer_state(index), device)
            layer = factory.build(index, state).requires_grad_(False)
            position_embeddings = factory.position_embeddings(index, hidden[:1], position_ids)
            inputs = stash.get(index, device)
        errors, gptq_errors = {}, {}
        if rival_rungs:
            with _phase(seconds, "rivals"):
                errors = {m: _distinct_errors(w, rival_rungs, importance.get(f"{index}.{m}")) for m, w in factory.layout.weights(state).items()}
        if gptq_rungs:
            with _phase(seconds, "gptq"):
                gptq_errors = _stashed_gptq_errors(stash, index, factory.layout, state, gptq_rungs, device)
        for start in range(0, inputs.shape[0], batch_size):
            part = slice(start, start + batch_size)
            capture = {} if rival_rungs else None
            with _phase(seconds, "backward"):
                h = inputs[part]
                mask = factory.mask(index, h, position_ids)
                grad[part], sq = layer_backward(layer, factory.layout, h, grad[part], capture, attention_mask=mask,
                                                position_ids=position_ids, position_embeddings=position_embeddings)  # fmt: skip
                for m, value in sq.items():
                    key = f"{TOKENS}{index}.{m[len(TOKENS):]}" if m.startswith(TOKENS) else f"{index}.{m}"
                    squares[key] = squares[key] + value if key in squares else value
            if rival_rungs:
                with _phase(seconds, "rivals"):
                    for m, (x, g) in capture.items():
                        rivals.accumulate(squares, f"{index}.{m}", x, g, *errors[m])
                        if m in gptq_errors:
                            rivals.accumulate(squares, f"{GPTQ_KEY}{index}.{m}", x, g, gptq_errors[m], len(gptq_rungs))
        del layer, inputs, state, errors, gptq_errors
        if factory.layout.experts:
            _unrouted_gradients(squares, index, factory.layout)
        failpoint(f"profiling.backward.{index}")
        progress.save_backward(index - 1, grad, squares)
        if index % 10 == 0 or index == layers - 1:
            log.info("fisher: layer %d back-propagated", index)
    return squares


def _stashed_gptq_errors(stash: InputStash, index: int, layout: Layout, state: dict, rungs: tuple[Rung, ...],
                         device: torch.device) -> dict[str, torch.Tensor]:  # fmt: skip
    """W - GPTQ_rung(W) of every module of layer `index` (the forward pass's solve, again: it keeps per-output
    sums only), from the Gram matrices it stashed."""
    matrices, counts = stash.get_grams(index, device)
    errors = {}
    for key, members in _by_input(layout, layout.weights(state)).items():
        errors.update(gptq_rung_errors(members, matrices[key].double(), int(counts[key]), rungs))
    return errors


def _unrouted_gradients(squares: dict[str, torch.Tensor], index: int, layout: Layout) -> None:
    """Give each expert of layer `index` that no gradient token was routed to the pooled per-token squared
    gradients of the layer's experts (same projection) at the average expert's token count, and the mean of
    their rival sums: the same fallback as the forward pass's (`_input_statistics`), never a silent zero."""
    for projection in ("gate_proj", "up_proj", "down_proj"):
        keys = [f"{index}.mlp.experts.{e}.{projection}" for e in range(layout.experts)]
        routed = [k for k in keys if f"{TOKENS}{k}" in squares]
        empty = [k for k in keys if k not in routed]
        if not empty or not routed:
            continue
        total = sum(squares[f"{TOKENS}{k}"] for k in routed)
        average = total / len(keys)
        pooled = sum(squares[k] for k in routed) / total
        rival_keys = sorted({name.split(":", 1)[0] for name in squares if name.endswith(f":{routed[0]}") and not name.startswith(TOKENS)})
        for k in empty:
            squares[k], squares[f"{TOKENS}{k}"] = pooled * average, average.clone()
            for column in rival_keys:
                squares[f"{column}:{k}"] = sum(squares[f"{column}:{r}"] for r in routed) / len(routed)
        if projection == "gate_proj":
            log.warning("fisher: layer %d: %d expert(s) got no gradient token; they take the layer's pooled expert gradients",
                        index, len(empty))  # fmt: skip


def _add_fisher_column(rows: list[dict], rungs: tuple[Rung, ...], row_errors: dict[str, torch.Tensor],
                       squares: dict[str, torch.Tensor], tokens: int, grad_tokens: int) -> None:  # fmt: skip
    """fisher_dloss per row (and fisher_dloss_gptq from GPTQ's errors, where profiled); an expert's squared
    gradients are means over the gradient tokens routed to it, scaled by its routed share:
    1/2 sum_o rowerr_o * sq_o / (tokens * routed gradient tokens)."""
    by_column: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for k, e in row_errors.items():
        if k.startswith(IMATRIX_KEY):
            continue
        by_column["fisher_dloss_gptq" if k.startswith(GPTQ_KEY) else "fisher_dloss"][k.removeprefix(GPTQ_KEY)] = e
    for column, errors in by_column.items():
        routed = {k: float(squares[f"{TOKENS}{k}"]) if f"{TOKENS}{k}" in squares else grad_tokens for k in errors}
        dloss = {k: fisher_loss_delta(e, squares[k], tokens, routed[k]).tolist() for k, e in errors.items()}
        for row, value in zip(rows, _rung_values(rows, hqq_rungs(rungs) if column.endswith("_gptq") else rungs, _row_key, dloss)):
            row[column] = value


def _add_rival_columns(rows: list[dict], rungs: tuple[Rung, ...], sums: dict[str, torch.Tensor], grad_tokens: int,
                       gptq: bool = False) -> None:  # fmt: skip
    """taylor_dloss and delta_loss per row; with `gptq`, also taylor_dloss_gptq (the per-token product with
    GPTQ's own errors, on the HQQ ladder's rungs)."""
    keys = list(dict.fromkeys(map(_row_key, rows)))
    per_module = {key: rivals.columns(sums, key, grad_tokens) for key in keys}
    for column in rivals.COLUMNS:
        values = {key: columns[column] for key, columns in per_module.items()}
        for row, value in zip(rows, _rung_values(rows, rungs, _row_key, values)):
            row[column] = value
    if gptq:
        values = {key: rivals.columns(sums, GPTQ_KEY + key, grad_tokens)["taylor_dloss"] for key in keys}
        for row, value in zip(rows, _rung_values(rows, hqq_rungs(rungs), _row_key, values)):
            row["taylor_dloss_gptq"] = value


def _error_key(index: int, module: str) -> str:
    """'3.mlp.down_proj', or 'gptq:3.mlp.down_proj' for GPTQ's errors of that module (and 'imatrix:3.mlp.down_proj')."""
    prefix = next((p for p in (GPTQ_KEY, IMATRIX_KEY) if module.startswith(p)), "")
    return f"{prefix}{index}.{module[len(prefix):]}"


def _on(state: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return state if device.type == "cpu" else {k: v.to(device) for k, v in state.items()}


def run_profiling(model_path, calibration, out_dir, *, batch_size: int = 8, normalize: bool = False,
                  rungs: tuple[Rung, ...] = LADDER, fisher_samples: int = DEFAULT_FISHER_SAMPLES,
                  device: str = "cpu", rival_scores: bool = False, dkld_windows: int = 0,
                  dkld_rungs: tuple[Rung, ...] = dkld.DEFAULT_RUNGS, gptq_errors: bool = False, gguf_errors: bool = False) -> Path:  # fmt: skip
    """Profile the checkpoint at `model_path` on `calibration` (tensor, calibration.safetensors or its
    directory); write scores.csv, scores.parquet and profiling.json into `out_dir`; return the CSV path.

    batch_size: calibration samples per mini-batch (memory vs. matrix-product efficiency).
    normalize: SensiBoost parts relative to |WX|^2 (the paper's Eq. 10) instead of the plain MSE that
        the authors' code uses and that reproduces their allocations.
    rungs: ladder rungs to score (fnorm, out_err); the default is the 12-rung ladder.
    fisher_samples: calibration samples (the first ones) of the backward pass behind `fisher_dloss`;
        0 skips it (the column is then empty and `optimal` falls back to its sensitivity weighting).
    device: where the layers run (cpu, cuda, cuda:N); the checkpoint is read on the CPU, one layer at a
        time, and only that layer and the calibration hidden states live on the device.
    rival_scores: also measure, in the backward pass, the scores of ModelOpt's and AutoRound's allocators
        (columns taylor_dloss and delta_loss; tasks.profiling.rivals); needs fisher_samples > 0.
    dkld_windows: with more than 0, also ExLlamaV3's measured KLD change per layer group and rung of
        `dkld_rungs` on that many calibration windows (column dkld; tasks.profiling.dkld; loads the
        whole model).
    gptq_errors: also price every rung by the error GPTQ leaves (columns out_err_gptq and
        fisher_dloss_gptq, and with rival_scores taylor_dloss_gptq; tasks.profiling.gptq_errors), for
        `optimal` on the gptq backend.
    gguf_errors: also score every rung of the gguf ladder (llama.cpp's types, by ggml's own quantizer with
        the calibration set's importance matrix, which is written beside the scores as imatrix.gguf).
    """
    if gguf_errors:
        rungs = tuple(dict.fromkeys((*rungs, *GGUF_LADDER)))
    rungs = _checked(model_path, batch_size, rungs, fisher_samples, rival_scores, dkld_windows, gptq_errors)
    started = time.perf_counter()
    device = torch.device(device)
    ids = load_calibration(calibration)
    checkpoint = Checkpoint(model_path)
    factory = LayerFactory(load_config(model_path))
    layers = factory.config.num_hidden_layers
    seconds: dict[str, float] = defaultdict(float)
    log.info("profiling %s: %d layers, %d x %d calibration tokens", model_path, layers, *ids.shape)

    grad_samples = min(fisher_samples, ids.shape[0])
    token_gptq = bool(grad_samples) and rival_scores and gptq_errors  # GPTQ's errors priced per token too
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    signature = {"calibration": hashlib.sha256(ids.numpy().tobytes()).hexdigest(), "shape": list(ids.shape), "layers": layers,
                 "batch_size": batch_size, "normalize": normalize, "rungs": [r.name for r in rungs], "fisher_samples": grad_samples,
                 "device": device.type, "rival_scores": rival_scores, "gptq_errors": gptq_errors, **({"token_gptq": True} if token_gptq else {})}  # fmt: skip
    progress = ProfileProgress(out_dir, signature)
    resumed_at = progress.forward_done if progress.backward_next is None else layers
    stash = InputStash(progress.stash_dir) if grad_samples else None  # beside the output: the same disk
    with torch.no_grad():
        rows, row_errors, hidden = _forward(checkpoint, factory, ids, device, progress, stash, grad_samples, seconds, keep_grams=token_gptq,
                                            batch_size=batch_size, rungs=rungs, normalize=normalize, gptq=gptq_errors)  # fmt: skip
        if stash:
            squares = _output_gradients(checkpoint, factory, stash, hidden[:grad_samples], ids[:grad_samples], batch_size, seconds, progress,
                                        rungs if rival_scores else (), column_importance(row_errors), hqq_rungs(rungs) if token_gptq else ())  # fmt: skip
            _add_fisher_column(rows, rungs, row_errors, squares, ids.numel(), ids[:grad_samples].numel())
            if rival_scores:
                _add_rival_columns(rows, rungs, squares, ids[:grad_samples].numel(), gptq=token_gptq)
    del hidden
    if stash:
        stash.close()
    if dkld_windows:
        with _phase(seconds, "dkld"):
            measured = dkld.measure_dkld(model_path, ids[:dkld_windows], tuple(r for r in dkld_rungs if r in rungs))
        for row in rows:
            row["dkld"] = measured.get((row["layer"], dkld.group_of(row["module"]), row_rung(row)))
    progress.remove()

    csv = write_scores(rows, out_dir)
    if any(r.ggml for r in rungs):
        write_profile_imatrix(row_errors, factory.config, ids, Path(out_dir) / IMATRIX_FILE)
    total = time.perf_counter() - started
    summary = {
        "model": str(model_path), "samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "layers": layers, "batch_size": batch_size,
        "normalize": normalize, "sensitivity_rung": SENSITIVITY_RUNG.name, "rungs": [r.name for r in rungs], "fisher_samples": grad_samples,
        "rival_scores": rival_scores, "dkld_windows": min(dkld_windows, int(ids.shape[0])), "gptq_errors": gptq_errors, "device": str(device),
        "resumed_at_layer": resumed_at, "seconds": round(total, 3), "phase_seconds": {k: round(v, 3) for k, v in sorted(seconds.items())},
    }  # fmt: skip
    write_json_atomic(Path(out_dir) / SUMMARY_FILE, summary)
    log.info("profiling done in %.1fs: %s", total, csv)
    return csv


def _checked(model_path, batch_size: int, rungs, fisher_samples: int, rival_scores: bool, dkld_windows: int, gptq_errors: bool) -> tuple[Rung, ...]:
    """run_profiling's options, checked (one PipelineError line each); the rungs as a tuple."""
    if dkld_windows < 0:
        raise PipelineError(f"dkld_windows must be 0 or more, got {dkld_windows}")
    if rival_scores and fisher_samples == 0:
        raise PipelineError("rival_scores needs the backward pass: fisher_samples must be at least 1")
    if gptq_errors and LayerFactory(load_config(model_path)).layout.experts:
        raise PipelineError("gptq_errors: the GPTQ backend does not quantize mixture-of-experts models; profile without it")
    if batch_size < 1:
        raise PipelineError(f"batch_size must be at least 1, got {batch_size}")
    if fisher_samples < 0:
        raise PipelineError(f"fisher_samples must be 0 or more, got {fisher_samples}")
    rungs = tuple(rungs)
    if not rungs or any(r not in LADDER + GGUF_LADDER for r in rungs):
        raise PipelineError(f"rungs must be ladder rungs, got {[getattr(r, 'name', r) for r in rungs]}")
    if any(r.ggml for r in rungs) and LayerFactory(load_config(model_path)).layout.experts:
        raise PipelineError("gguf rungs: the gguf backend does not quantize mixture-of-experts models here; profile without them")
    return rungs


def _forward(checkpoint: Checkpoint, factory: LayerFactory, ids: torch.Tensor, device: torch.device, progress: ProfileProgress,
             stash: InputStash | None, grad_samples: int, seconds: dict, keep_grams: bool = False, **options) -> tuple[list[dict], dict, torch.Tensor]:  # fmt: skip
    """The forward pass, one layer at a time (resumed after the layers a killed attempt finished): every
    layer's score rows and rung errors, and the last hidden states; the backward pass's layer inputs go
    to `stash` (with `keep_grams`, also every layer's input Gram matrices)."""
    if progress.forward_done:
        rows, row_errors, hidden = progress.load_forward(device)
        log.info("profiling: resuming after %d finished layer(s) of an interrupted attempt", progress.forward_done)
    else:
        with _phase(seconds, "embed"):
            hidden = factory.scale_embeddings(checkpoint.embed(ids)).to(device)
        rows, row_errors = [], {}
    layers = factory.config.num_hidden_layers
    for index in range(progress.forward_done, layers):
        t0 = time.perf_counter()
        with _phase(seconds, "read"):
            state = _on(checkpoint.layer_state(index), device)
        if stash:
            with _phase(seconds, "backward"):
                stash.put(index, hidden[:grad_samples])
        grams: dict | None = {} if keep_grams else None
        layer_rows, errors = profile_layer(index, state, factory, hidden, seconds=seconds, keep=grams, **options)
        if grams:
            with _phase(seconds, "backward"):
                stash.put_grams(index, grams["matrices"], grams["counts"])
        rows += layer_rows
        errors = {_error_key(index, m): e for m, e in errors.items()}
        row_errors.update(errors)
        del state
        failpoint(f"profiling.layer.{index}")
        with _phase(seconds, "checkpoint"):
            progress.save_layer(index, layer_rows, errors, hidden)
        log.info("layer %d/%d profiled in %.1fs", index + 1, layers, time.perf_counter() - t0)
    return rows, row_errors, hidden
