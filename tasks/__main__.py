"""`python -m tasks <stage> ...`: run one stage from the command line (also the containers' entry point).

Every command lives in the `cli.py` of its package, which defines `configure_<stage>(parser)` and
`run_<stage>(args) -> int`; this file only dispatches. A PipelineError becomes one line on stderr and
exit status 2: no traceback for bad input.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tasks.errors import PipelineError

# stage name -> (module, one-line help). Modules are imported only when their stage runs.
STAGES = {
    "calibrate": ("tasks.calibration.cli", "tokenize calibration and evaluation sets"),
    "profile": ("tasks.profiling.cli", "score every layer and module (kurtosis, sensitivity, errors, LIM, ZD)"),
    "allocate": ("tasks.allocation.cli", "turn a scores table and a budget into a bit map"),
    "frontier": ("tasks.allocation.cli", "the optimal allocator's bit maps and estimated loss for many budgets"),
    "quantize": ("tasks.quantize.cli", "quantize a model by a bit map with one backend"),
    "evaluate": ("tasks.evaluation.cli", "perplexity, size, memory and speed of a (quantized) model"),
    "promote": ("tasks.registry.cli", "move the champion alias to the best registered version"),
    "verify": ("tasks.registry.cli", "reload a registered version in this process and reproduce its perplexity"),
    "report": ("tasks.reports.cli", "comparison table and plots for a pipeline run"),
    "docs": ("tasks.reports.cli", "rewrite the generated tables of README.md and docs/ from stored results"),
    "pipeline": ("tasks.orchestration.cli", "run the whole pipeline in-process, without Airflow"),
    "downstream": ("tasks.evaluation.cli", "lm-eval task scores of a model variant"),
    "zoo": ("tasks.orchestration.cli", "validate, plan or run the model zoo (dags/zoo.yaml)"),
    "step": ("tasks.orchestration.cli", "run one pipeline step on JSON input (the containers' entry for DAG tasks)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m tasks", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    stage = next((a for a in argv if a in STAGES), None)
    for name, (module, help_text) in STAGES.items():
        stage_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == stage:
            getattr(importlib.import_module(module), f"configure_{name}")(stage_parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # torchao (pulled in by the quantization libraries) warns about GPU kernels on every CPU import.
    for noisy in ("torchao", "torchao.kernel.intmm", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return getattr(importlib.import_module(STAGES[args.stage][0]), f"run_{args.stage}")(args) or 0
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
