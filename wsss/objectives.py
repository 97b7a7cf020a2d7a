"""Registry of weakly supervised objectives: what a search maximises, computed without GT.

An objective maps a trial's per-image `wsss.metrics.transition_counts` to one number (higher is
better). Every registered objective is computed and logged for every trial; the config names the
one that drives the search, so adding a candidate objective is one `register` call and every past
search can be re-ranked by it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from wsss.errors import UserError
from wsss.metrics import self_pqs, tecm_aggregate

Counts = Sequence[dict[str, Any]]
OBJECTIVES: dict[str, Callable[[Counts], float]] = {}


def register(name: str, fn: Callable[[Counts], float]) -> None:
    """Add an objective; names are metric names too, so they must be unique."""
    if name in OBJECTIVES:
        raise ValueError(f"objective {name!r} is already registered")
    OBJECTIVES[name] = fn


def check_objective(name: str) -> str:
    """A config error naming the field when ``name`` is not registered."""
    if name not in OBJECTIVES:
        raise UserError(f"search.objective {name!r} is not registered; choose one of "
                        f"{sorted(OBJECTIVES)}")
    return name


def driving_value(metrics: dict[str, float], name: str) -> float:
    """What a search maximises for a trial: objective ``name``, except 0 for a degenerate pair
    (no neutral pixel), so that neither early stopping nor a sampler favours it."""
    return 0.0 if metrics["degenerate"] else metrics[name]


def all_objectives(counts: Counts) -> dict[str, float]:
    """Every registered objective on one trial's per-image counts."""
    return {name: fn(counts) for name, fn in OBJECTIVES.items()}


register("tecm", lambda counts: tecm_aggregate(counts, "image_mean")[0])
register("tecm_pooled", lambda counts: tecm_aggregate(counts, "pooled")[0])
register("spqs", self_pqs)
