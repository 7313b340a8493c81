"""Allocation stage: scores table + method + budget -> bit map (SPEC sections 4-6, issue 7).

One module per concern: `scores` reads and validates the table, `boost` holds uniform/SensiBoost/
KurtBoost, `layerwise` LIM/ZD, `knapsack` the exact multiple-choice knapsack, `program` its set-up on a
table, `mxq` and `optimal` the two knapsack methods, `registry` the method table and the stage
function, `cli` the command line.
"""

from tasks.allocation.boost import allocate_kurtboost, allocate_sensiboost, allocate_uniform, find_outliers
from tasks.allocation.layerwise import allocate_lim, allocate_zd
from tasks.allocation.mxq import allocate_mxq
from tasks.allocation.optimal import allocate_optimal, frontier
from tasks.allocation.registry import ALLOCATORS, allocate, run_allocation
from tasks.allocation.scores import Scores, read_scores, scores_from_frame

__all__ = [
    "ALLOCATORS",
    "Scores",
    "allocate",
    "allocate_kurtboost",
    "allocate_lim",
    "allocate_mxq",
    "allocate_optimal",
    "allocate_sensiboost",
    "allocate_uniform",
    "allocate_zd",
    "find_outliers",
    "frontier",
    "read_scores",
    "run_allocation",
    "scores_from_frame",
]
