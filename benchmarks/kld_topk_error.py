"""How far the cached KL divergence is from the exact one (the evaluation caches the base model's top
TOP_K = 64 log-probabilities and TAIL = 64 samples of the rest, instead of its whole distribution).

    python benchmarks/kld_topk_error.py [--tokens 2048] [--rungs b3g64,b4g64] [--k 16,64,256] [--write-docs]

Quantizes the embedded model (or --model) with HQQ at each uniform rung (cached stage outputs), scores
the first --tokens WikiText-2 test tokens under the paper protocol against the base model's full
distribution (exact KLD) and, for each k, against its top k with the rest merged into one outcome
(never above the exact value, by the log-sum inequality) and against its top k plus TAIL samples of the
rest (the evaluation's estimate, unbiased). Prints mean KLDs, their relative errors, and the base
model's mean probability mass outside the top k. --write-docs stores the rows as
docs/results/kld-topk-error.json and rewrites the table in docs/evaluation.md (its k = 64 rows).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rungs", default="b3g64,b4g64")
    ap.add_argument("--k", default="16,64,256")
    ap.add_argument("--write-docs", action="store_true", help="store the rows and rewrite the docs table (docs/evaluation.md)")
    args = ap.parse_args()

    from tasks.bitmap import uniform_bitmap
    from tasks.calibration import load_ids, run_calibration
    from tasks.evaluation.perplexity import PROTOCOLS, model_forward, score_stream
    from tasks.evaluation.reference import TAIL
    from tasks.evaluation.stage import load_for_eval
    from tasks.ladder import parse_rung
    from tasks.model_io import linear_param_counts, load_model, read_config, resolve_model
    from tasks.orchestration.config import PipelineConfig
    from tasks.orchestration.config import calibration_params
    from tasks.quantize.stage import run_quantize
    from tasks.settings import Settings

    settings = Settings.from_env()
    ref = resolve_model(args.model, None, settings.cache_dir)
    calibration = Path(run_calibration(ref.path, calibration_params(PipelineConfig(model=args.model)), settings.artifact_root, ref.revision))
    ids = load_ids(calibration / "wikitext2.safetensors").reshape(-1)[: args.tokens]
    proto = PROTOCOLS["paper"]
    base = load_model(ref.path).eval()
    vocab = base.config.vocab_size
    full = score_stream(model_forward(base), ids, proto, capture_top_k=vocab).captured
    refs = {}
    for k in (int(x) for x in args.k.split(",")):
        merged = score_stream(model_forward(base), ids, proto, capture_top_k=k).captured
        sampled = score_stream(model_forward(base), ids, proto, capture_top_k=k, capture_tail=TAIL).captured
        refs[k] = (merged, sampled, float((1 - merged.top_logp.double().exp().sum(1)).clamp_min(0).mean()))
    del base

    print(f"{ref.name}, first {args.tokens} WikiText-2 tokens, paper protocol, vocabulary {vocab}, {TAIL} tail samples")
    print(f"| {'variant':<14} | {'exact KLD':>9} | " + " | ".join(f"top-{k} merged | top-{k} + tail | mass outside" for k in refs) + " |")
    params = linear_param_counts(read_config(ref.path))
    rows = []
    for rung_name in args.rungs.split(","):
        rung = parse_rung(rung_name)
        bitmap_path = calibration.parent.parent / f"kld-bench-{rung.name}.json"
        uniform_bitmap(params, rung).save(bitmap_path)
        model_dir = run_quantize(ref.path, ref.revision, bitmap_path, "hqq", settings.artifact_root, calibration / "calibration.safetensors", {})
        model = load_for_eval(model_dir, "hqq")
        exact = score_stream(model_forward(model), ids, proto, reference=full).kld.mean()
        cells = []
        for k, (merged, sampled, outside) in refs.items():
            m = score_stream(model_forward(model), ids, proto, reference=merged).kld.mean()
            t = score_stream(model_forward(model), ids, proto, reference=sampled).kld.mean()
            rows.append({"variant": f"hqq {rung.name}", "k": k, "tail": TAIL, "tokens": args.tokens, "exact_kld": float(exact),
                         "merged_kld": float(m), "merged_error_pct": float(100 * (m / exact - 1)), "tail_kld": float(t),
                         "tail_error_pct": float(100 * (t / exact - 1)), "mass_outside": outside})  # fmt: skip
            cells.append(f"{m:.5f} ({100 * (m / exact - 1):+.1f}%) | {t:.5f} ({100 * (t / exact - 1):+.1f}%) | {outside:.4f}")
        print(f"| hqq {rung.name:<10} | {exact:9.5f} | " + " | ".join(cells) + " |")
        del model
    if args.write_docs:
        from tasks.reports.docs_tables import write_benchmark_docs

        write_benchmark_docs("kld-topk-error", rows, __file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
