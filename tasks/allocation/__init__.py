"""Allocation stage: scores table + method + budget -> bit map (docs/allocators.md, *The method ladder*).

One module per concern: `scores` reads and validates the table, `boost` holds uniform/SensiBoost/
KurtBoost, `layerwise` LIM/ZD, `knapsack` the exact multiple-choice knapsack, `program` its set-up on a
table, `mxq` and `optimal` the two knapsack methods, `registry` the method table and the stage
function, `cli` the command line.
`methods` the light method table (no numpy: the planner and the DAG read it).
"""

import importlib

# Re-exported lazily (PEP 562), so that `tasks.allocation.methods` imports without numpy or scipy.
_EXPORTS = {
    "allocate_kurtboost": "boost", "allocate_sensiboost": "boost", "allocate_uniform": "boost", "find_outliers": "boost",
    "allocate_lim": "layerwise", "allocate_zd": "layerwise",
    "allocate_mxq": "mxq",
    "allocate_optimal": "optimal", "frontier": "optimal",
    "ALLOCATORS": "registry", "allocate": "registry", "run_allocation": "registry",
    "Scores": "scores", "read_scores": "scores", "scores_from_frame": "scores",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tasks.allocation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tasks.allocation.{_EXPORTS[name]}"), name)
