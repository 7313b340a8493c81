"""Evaluation throughput against a plain batched forward over the same tokens (issue 14's target: >= 0.9).

    python benchmarks/eval_throughput.py [--tokens 8192] [--protocol paper] [--repeats 3] [--threads 2]

- plain: the protocol's windows, batched as the evaluation batches them, `model(input_ids=batch,
  use_cache=False)` under `torch.inference_mode` (logits at every position, nothing else);
- evaluation: `score_stream` exactly as the evaluation stage runs it on a quantized variant: logits only
  at the scored positions, log-softmax, NLL, and the KL divergence and top-1 agreement against the base
  model's cached top-k (computed once before timing).
Both run on the unquantized embedded model (or --model) in this process, interleaved, `--repeats` times;
each side's minimum is reported, so a busy machine slows both alike. Prints tokens/s and the ratio
evaluation throughput / plain throughput.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--tokens", type=int, default=8192, help="WikiText-2 test tokens")
    ap.add_argument("--protocol", default="paper", choices=["paper", "gptq"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch

    from tasks.calibration import load_ids, run_calibration
    from tasks.evaluation.perplexity import BATCH_TOKENS, PROTOCOLS, model_forward, score_stream, windows
    from tasks.evaluation.reference import TAIL, TOP_K
    from tasks.model_io import load_model, resolve_model
    from tasks.orchestration.config import PipelineConfig
    from tasks.orchestration.config import calibration_params
    from tasks.settings import Settings

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings.from_env()
    model_ref = resolve_model(args.model, None, settings.cache_dir)
    calibration = run_calibration(model_ref.path, calibration_params(PipelineConfig(model=args.model)), settings.artifact_root, model_ref.revision)
    ids = load_ids(Path(calibration) / "wikitext2.safetensors").reshape(-1)[: args.tokens]
    protocol = PROTOCOLS[args.protocol]
    model = load_model(model_ref.path).eval()
    spans = list(windows(ids.numel(), protocol))
    fed = sum(e - b for b, e, _ in spans)

    def plain() -> None:
        with torch.inference_mode():
            by_len: dict[int, list] = {}
            for b, e, _ in spans:
                by_len.setdefault(e - b, []).append(ids[b:e])
            for length, chunks in by_len.items():
                per = max(1, BATCH_TOKENS // length)
                for i in range(0, len(chunks), per):
                    model(input_ids=torch.stack(chunks[i : i + per]), use_cache=False).logits

    forward = model_forward(model)
    reference = score_stream(forward, ids, protocol, capture_top_k=TOP_K, capture_tail=TAIL).captured

    def evaluation() -> None:
        score_stream(forward, ids, protocol, reference=reference)

    times = {"plain": [], "evaluation": []}
    for r in range(args.repeats):
        for name, fn in (("plain", plain), ("evaluation", evaluation)):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
        print(f"repeat {r + 1}: plain {times['plain'][-1]:.2f} s, evaluation {times['evaluation'][-1]:.2f} s", flush=True)
    best = {k: min(v) for k, v in times.items()}
    print(f"\n{model_ref.name}, {args.protocol} protocol, {ids.numel()} tokens ({fed} fed), {torch.get_num_threads()} threads, "
          f"min of {args.repeats}")  # fmt: skip
    print(f"plain batched forward: {fed / best['plain']:8.1f} tok/s")
    print(f"evaluation (+KLD):     {fed / best['evaluation']:8.1f} tok/s")
    print(f"throughput ratio evaluation / plain: {best['plain'] / best['evaluation']:.3f}  (target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
