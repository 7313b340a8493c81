"""Profiling overhead on a real model: time and peak memory of the profiling stage, relative to a forward pass.

Prints (each the fastest of --repeats interleaved runs):
    time ratio   = profiling wall time / wall time of one plain forward pass over the same tokens
    memory ratio = profiling peak memory / float32 model size (4 bytes x all parameters)

Definitions:
- calibration: the first samples x seq_len tokens of WikiText-2 validation
  (data/wikitext-2-valid-tokenized.txt) tokenized with the model's tokenizer;
- forward: `model(input_ids=batch, use_cache=False)` in float32 under no_grad over every mini-batch of
  the same batch size as profiling (logits for every position, as a plain forward computes them); the
  time excludes loading the model;
- profiling: `run_profiling(...)` end to end (its own reading of the checkpoint, all scores, writing);
- each runs in a fresh subprocess with the same torch thread count; peak memory = the process's peak
  resident set (VmHWM, reset after the imports) minus its resident set after importing torch and
  transformers and the architecture's modeling module (about 200 MiB of code for both), i.e. what the
  stage itself adds; mapped checkpoint pages that it touches count as resident.

It also prints the ratio without the Fisher pass (the `optimal` allocator's backward pass, beyond the
scores of docs/methods.md §3) and the floor from tasks/profiling/cost.py: SensiBoost's attn_in and mlp_gate parts re-run
every decoder linear with other weights or inputs, so any exact implementation does at least twice the
decoder linears' multiply-adds, 2 x 106.2M / 134.5M per token = 1.58 forwards on SmolLM2 (1.96 on
Llama-2-7B, whose forward spends less in the output embedding). The other exact parts have lower
bounds of their own (multiply-adds per token, SmolLM2): the input Gram matrices that out_err and
fisher_dloss need, only the blocks on and above the diagonal, (3 x 576^2 + 1536^2) / 2 per layer = 0.375
forwards; the Fisher pass, which within the memory bound must recompute each layer from its stashed input
and propagate the gradient back through it, at least two forwards over its 8 windows (0.5 at 32 windows,
0.125 at 128); the per-row output error of 12 rungs, d_out x d_in^2 / 2 per module and rung (Cholesky
halves it), 0.52 T multiply-adds per model (0.236 forwards at 32 x 512, 0.059 at 128 x 512). Exact scores
therefore cost at least 2.69 forwards at 32 x 512 and 2.14 at 128 x 512 (1.35 x the floor), before HQQ's
own iterations and any file I/O; the phases show how close each part gets.

Measured here (SmolLM2-135M, 32 x 512 tokens, batch 8, 2 idle cores, 2026-12-01): forward 16.1 s,
profiling 71.2 s, time ratio 4.41 (3.67 without the Fisher pass; floor 1.58); memory ratio 1.10
(profiling +565 MiB; the plain forward +1545 MiB because it materializes [batch, seq, vocab] logits).
Phases: full-precision layer pass 13.0 s and b4g64 re-runs of the attention and MLP blocks 13.0 s
(together 1.61 forwards: at the floor), Gram matrices 7.4 s, the Fisher backward pass (8 windows) 12.0 s,
and the per-model fixed cost of 12-rung HQQ (17.2 s) and out_err (7.4 s), which dominates on a model this
small and weighs less with more calibration tokens (128 x 512: see docs/allocators.md, Profiling).

    python benchmarks/profile_overhead.py                       # SmolLM2, 32 x 512 tokens
    python benchmarks/profile_overhead.py --samples 8 --threads 2   # a quicker run, on 2 idle cores
    python benchmarks/profile_overhead.py --threads 2 --write-docs  # also rewrite its row of docs/allocators.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = REPO / "data" / "wikitext-2-valid-tokenized.txt"


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def worker(args) -> dict:
    """Runs in a fresh interpreter: one measurement, printed as JSON on the last line."""
    import importlib

    import torch

    import tasks.profiling  # noqa: F401
    from tasks.model_io import read_config

    # Code, not data: the architecture's transformers module costs about 200 MiB of imports (both stages
    # need it), so it is imported before the baseline is taken.
    model_type = read_config(args.model_path)["model_type"]
    importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    torch.set_num_threads(args.threads)
    reset = _reset_peak()
    base = _rss_kib("VmRSS")
    from safetensors.torch import load_file

    ids = load_file(args.calibration)["input_ids"]
    start = time.perf_counter()
    if args.worker == "forward":
        from tasks.model_io import load_model

        model = load_model(args.model_path)
        start = time.perf_counter()
        with torch.no_grad():
            for b in range(0, ids.shape[0], args.batch_size):
                model(input_ids=ids[b : b + args.batch_size], use_cache=False)
        extra = {}
    else:
        from tasks.profiling import run_profiling

        run_profiling(args.model_path, args.calibration, args.out, batch_size=args.batch_size)
        extra = {"phase_seconds": json.loads((Path(args.out) / "profiling.json").read_text())["phase_seconds"]}
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "peak_mib": (peak - base) / 1024, "base_mib": base / 1024, "hwm_reset": reset, **extra}


def _run_worker(kind: str, args, calibration: Path, model_path: Path, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--model-path", str(model_path),
           "--calibration", str(calibration), "--out", str(out), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{kind} worker failed with status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _param_count(model_path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(model_path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                n = 1
                for d in handle.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


def _calibration(model_path: Path, text: Path, samples: int, seq_len: int, dest: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from tasks.model_io import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    need = samples * seq_len
    ids: list[int] = []
    with open(text, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                ids += tokenizer(line, add_special_tokens=False)["input_ids"]
            if len(ids) >= need:
                break
    if len(ids) < need:
        raise SystemExit(f"{text} has only {len(ids)} tokens, {need} needed")
    save_file({"input_ids": torch.tensor(ids[:need], dtype=torch.long).reshape(samples, seq_len)}, str(dest))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="'embedded' (SmolLM2-135M), a checkpoint directory or hub id")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in both measurements (default 1: on a shared, oversubscribed machine "
                             "2 OpenMP threads make many ops wait a scheduler tick, which distorts the ratio)")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="calibration text file")
    parser.add_argument("--cache-dir", default=None, help="model cache directory")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each; the fastest counts")
    parser.add_argument("--write-docs", action="store_true",
                        help="store the result as docs/results/profile-overhead-<samples>x<seq-len>.json and rewrite its docs table")
    parser.add_argument("--worker", choices=["forward", "profile"], help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--calibration", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    from tasks.model_io import resolve_model

    model = resolve_model(args.model, cache_dir=args.cache_dir)
    params = _param_count(model.path)
    fp32_mib = params * 4 / 2**20
    with tempfile.TemporaryDirectory(prefix="profile-overhead-") as tmp:
        calibration = Path(tmp) / "calibration.safetensors"
        _calibration(model.path, args.text, args.samples, args.seq_len, calibration)
        # Interleaved and the fastest of each kept, so that the ratio means the same on a busy machine.
        forwards, profiles = [], []
        for i in range(args.repeats):
            forwards.append(_run_worker("forward", args, calibration, model.path, Path(tmp) / "unused"))
            profiles.append(_run_worker("profile", args, calibration, model.path, Path(tmp) / f"profile-{i}"))
        forward = min(forwards, key=lambda r: r["seconds"])
        profile = min(profiles, key=lambda r: r["seconds"])

    from tasks.model_io import read_config
    from tasks.profiling.cost import exact_scores_floor_ratio, sensitivity_floor_ratio
    from tasks.profiling.driver import DEFAULT_FISHER_SAMPLES

    config = read_config(model.path)
    floor = sensitivity_floor_ratio(config)
    exact_floor = exact_scores_floor_ratio(config, args.samples, args.seq_len, DEFAULT_FISHER_SAMPLES)
    fisher = profile["phase_seconds"].get("backward", 0.0)
    result = {
        "model": model.name,
        "tokens": f"{args.samples} x {args.seq_len}",
        "batch_size": args.batch_size,
        "threads": args.threads,
        "params": params,
        "fp32_model_mib": round(fp32_mib, 1),
        "repeats": args.repeats,
        "forward_s": round(forward["seconds"], 2),
        "profiling_s": round(profile["seconds"], 2),
        "time_ratio": round(profile["seconds"] / forward["seconds"], 3),
        "time_ratio_without_fisher": round((profile["seconds"] - fisher) / forward["seconds"], 3),
        "time_ratio_floor": round(floor, 3),
        "time_ratio_exact_scores_floor": round(exact_floor, 3),
        "forward_peak_mib": round(forward["peak_mib"], 1),
        "profiling_peak_mib": round(profile["peak_mib"], 1),
        "memory_ratio": round(profile["peak_mib"] / fp32_mib, 3),
        "profiling_phase_s": profile["phase_seconds"],
    }
    print(f"model {result['model']} ({params / 1e6:.1f}M params, float32 {fp32_mib:.0f} MiB), "
          f"{result['tokens']} tokens, batch {args.batch_size}, {args.threads} thread(s)")  # fmt: skip
    spread = lambda runs: " / ".join(f"{r['seconds']:.1f}" for r in runs)  # noqa: E731
    print(f"forward pass     {forward['seconds']:8.1f} s   peak +{forward['peak_mib']:7.0f} MiB   (fastest of {spread(forwards)} s)")
    print(f"profiling        {profile['seconds']:8.1f} s   peak +{profile['peak_mib']:7.0f} MiB   (fastest of {spread(profiles)} s)")
    print("  phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in profile["phase_seconds"].items()))
    print(f"time ratio   (profiling / forward)          {result['time_ratio']:.2f}   = {result['time_ratio'] / floor:.2f} x SensiBoost's floor, {result['time_ratio'] / exact_floor:.2f} x the exact scores' floor")
    print(f"  without the Fisher pass (phase 'backward', for `optimal` only)   {result['time_ratio_without_fisher']:.2f}")
    print(f"  floor of any exact SensiBoost sensitivity (tasks/profiling/cost.py: every decoder linear twice)  {floor:.2f}")
    print(f"  floor of every exact score of the profile (tasks/profiling/cost.py: Gram matrices, Fisher pass, rung errors too)  {exact_floor:.2f}")
    print(f"memory ratio (profiling peak / fp32 model)  {result['memory_ratio']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.write_docs:
        from tasks.reports.docs_tables import write_benchmark_docs

        write_benchmark_docs(f"profile-overhead-{args.samples}x{args.seq_len}", [result], __file__, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
