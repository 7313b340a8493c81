"""`optimal`'s optional refinement (`method_options.optimal.refine`): EvoPress's search, started from the
knapsack's exact map and judged by measurement instead of the estimate.

The knapsack minimizes an estimate of the loss increase with modules taken as independent. The
refinement measures: each generation proposes `offspring` maps, each one to three moves from the current
one (a move: one knapsack item a rung up, another a rung down, the pair within the budget, so memory never
exceeds it); proposals are judged by a `fitness(choice, tokens)`, the model's KL divergence to the
unquantized model on held-out calibration windows (tokens the scores never saw), first on a few tokens,
then the best `survivors` on more (EvoPress's multi-stage selection: a proposal is not accepted on the
noise of a few tokens), and the best replaces the current map only if it beats it on the most tokens.

Moves are drawn where the estimate is least sure of itself: at the knapsack's optimum every move's
estimated cost increase is >= 0, and near-ties (moves the estimate barely rejects) are drawn most, with
weight exp(-increase / the median increase). The search stops after `generations` or `seconds`, whichever
comes first; with the same settings and measurements it is deterministic (seeded).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from tasks.errors import PipelineError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class RefineSettings:
    generations: int = 16
    seconds: float = 1800.0  # a cap on the search's wall time (the knapsack's map is kept if nothing beat it by then)
    offspring: int = 8  # proposals per generation
    stages: tuple[int, ...] = (2048, 16384)  # held-out tokens of each selection stage, growing
    survivors: int = 2  # proposals that go on from each stage but the last
    seed: int = 0

    @classmethod
    def of(cls, option) -> "RefineSettings | None":
        """The settings of a `refine` option value: None/false (off), true (the defaults) or an object."""
        if not option:
            return None
        settings = cls(**({} if option is True else {k: tuple(v) if k == "stages" else v for k, v in option.items()}))
        if list(settings.stages) != sorted(set(settings.stages)):
            raise PipelineError(f"optimal option refine: stages must grow, got {list(settings.stages)}")
        return settings

    def to_json(self) -> dict:
        return {**asdict(self), "stages": list(self.stages)}


Fitness = Callable[[np.ndarray, int], float]  # (choice per item, tokens) -> KL divergence


def search(costs: np.ndarray, sizes: np.ndarray, capacity: int, start: np.ndarray, fitness: Fitness,
           settings: RefineSettings) -> tuple[np.ndarray, dict]:  # fmt: skip
    """The refined choice (rung index per knapsack item) and what the search did. costs, sizes: [items,
    rungs] (the estimate, integer memory units); start: the knapsack's choice, within `capacity`."""
    rng = np.random.default_rng(settings.seed)
    started = time.perf_counter()
    measured: dict[tuple[bytes, int], float] = {}

    def fit(choice: np.ndarray, tokens: int) -> float:
        key = (choice.tobytes(), tokens)
        if key not in measured:
            measured[key] = fitness(choice, tokens)
        return measured[key]

    order = np.argsort(sizes, axis=1, kind="stable")  # per item, its rungs from the smallest
    rank = np.argsort(order, axis=1, kind="stable")
    current, last = start.copy(), settings.stages[-1]
    first = fit(current, last)
    generations = accepted = 0
    while generations < settings.generations and time.perf_counter() - started < settings.seconds:
        generations += 1
        seen = {current.tobytes()}
        pool = []
        for _ in range(settings.offspring):
            child = _mutate(current, costs, sizes, capacity, order, rank, rng)
            if child is not None and child.tobytes() not in seen:
                seen.add(child.tobytes())
                pool.append(child)
        for i, tokens in enumerate(settings.stages):
            bar = fit(current, tokens)
            ranked = sorted(((fit(c, tokens), k) for k, c in enumerate(pool)), key=lambda p: p[0])
            pool = [pool[k] for f, k in ranked if f < bar][: settings.survivors if i < len(settings.stages) - 1 else 1]
            if not pool or time.perf_counter() - started >= settings.seconds:
                break
        else:
            current, accepted = pool[0], accepted + 1
            log.info("refine: generation %d accepted a map with held-out KLD %.5f (%.5f at the start)", generations, fit(current, last), first)
            continue
        log.info("refine: generation %d: no proposal beat the current map (%.0f s)", generations, time.perf_counter() - started)
    facts = {**settings.to_json(), "generations_run": generations, "accepted": accepted, "measurements": len(measured),
             "search_seconds": round(time.perf_counter() - started, 1), "holdout_kld_start": first, "holdout_kld": fit(current, last),
             "moved_items": int((current != start).sum())}  # fmt: skip
    return current, facts


def _mutate(choice: np.ndarray, costs: np.ndarray, sizes: np.ndarray, capacity: int, order: np.ndarray, rank: np.ndarray,
            rng: np.random.Generator) -> np.ndarray | None:  # fmt: skip
    """One to three moves (1 + a geometric count), each drawn by its estimated cost increase."""
    child = choice.copy()
    for _ in range(min(3, rng.geometric(0.5))):
        move = _draw_move(child, costs, sizes, capacity, order, rank, rng)
        if move is None:
            break
        (up, r_up), (down, r_down) = move
        child[up], child[down] = r_up, r_down
    return None if np.array_equal(child, choice) else child


def _draw_move(choice, costs, sizes, capacity, order, rank, rng):
    items = np.arange(len(choice))
    here = rank[items, choice]
    top = sizes.shape[1] - 1
    up_items, down_items = items[here < top], items[here > 0]
    if not len(up_items) or not len(down_items):
        return None
    up_rung = order[up_items, here[up_items] + 1]
    down_rung = order[down_items, here[down_items] - 1]
    up_units = sizes[up_items, up_rung] - sizes[up_items, choice[up_items]]
    down_units = sizes[down_items, down_rung] - sizes[down_items, choice[down_items]]
    up_cost = costs[up_items, up_rung] - costs[up_items, choice[up_items]]
    down_cost = costs[down_items, down_rung] - costs[down_items, choice[down_items]]
    slack = capacity - int(sizes[items, choice].sum())
    fits = (up_units[:, None] + down_units[None, :] <= slack) & (up_items[:, None] != down_items[None, :])
    if not fits.any():
        return None
    increase = np.clip(up_cost[:, None] + down_cost[None, :], 0.0, None)[fits]
    scale = np.median(increase[increase > 0]) if (increase > 0).any() else 1.0
    weights = np.exp(-increase / scale)
    pick = rng.choice(len(weights), p=weights / weights.sum())
    i, j = (int(a[pick]) for a in np.nonzero(fits))
    return (int(up_items[i]), int(up_rung[i])), (int(down_items[j]), int(down_rung[j]))


def refine_bitmap(bitmap, scores, options: dict, fitness: Callable[[dict, int], float], ladder: str = "hqq"):
    """`optimal`'s map `bitmap` (allocated from `scores` with `options`) refined by `fitness(modules, tokens)`
    under `options["refine"]`, within the same budget; the map as given when refine is off. The search's
    account is the bit map's option `refine`."""
    from tasks.allocation.optimal import build_program
    from tasks.allocation.registry import ladder_options

    settings = RefineSettings.of(options.get("refine"))
    if settings is None:
        return bitmap
    allocator = {k: v for k, v in options.items() if k != "refine" and v is not None}
    if ladder != "hqq":
        allocator = ladder_options("optimal", scores, bitmap.budget, allocator, ladder)
    program, _ = build_program(scores, **allocator)
    capacity = program.check(bitmap.budget)
    position = {rung: j for j, rung in enumerate(program.rungs)}
    start = np.array([position[_chosen(bitmap, scores.keys, group, program)] for group in program.groups])

    def measure(choice: np.ndarray, tokens: int) -> float:
        return fitness({scores.keys[i]: program.written[i][j] for group, j in zip(program.groups, choice) for i in group}, tokens)

    choice, facts = search(program.knapsack.costs, program.knapsack.sizes, capacity, start, measure, settings)
    refined = program._bitmap(choice, bitmap.budget, 0.0, bitmap.options.get("solver", {}), {**bitmap.options, "refine": facts})
    refined.options["objective_knapsack"] = bitmap.options.get("objective")  # the estimate of the map the search started from
    return refined


def _chosen(bitmap, keys, group, program):
    """The candidate rung the knapsack chose for an item (written rungs map back through program.written)."""
    first = group[0]
    for j, rung in enumerate(program.rungs):
        if program.written[first][j] == bitmap.modules[keys[first]]:
            return rung
    raise PipelineError(f"refine: {keys[first]} holds {bitmap.modules[keys[first]].name}, not one of the candidate rungs")
