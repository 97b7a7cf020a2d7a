"""Registry of weakly supervised objectives: what a search maximises, computed without GT.

An objective maps a trial's `wsss.metrics.Transitions` (per-image transition counts and the
pooled agreement of pseudo-labels with initial regions) to one number (higher is better). Every
registered objective is computed and logged for every trial; the config names the one that drives
the search, so adding a candidate objective is one `register` call and every past
search can be re-ranked by it.
"""

from __future__ import annotations

from collections.abc import Callable

from wsss.errors import UserError
from wsss.metrics import Transitions, self_pqs, tecm_aggregate

OBJECTIVES: dict[str, Callable[[Transitions], float]] = {}


def register(name: str, fn: Callable[[Transitions], float]) -> None:
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


def all_objectives(t: Transitions) -> dict[str, float]:
    """Every registered objective on one trial's transition counts."""
    return {name: fn(t) for name, fn in OBJECTIVES.items()}


register("tecm", lambda t: tecm_aggregate(t, "image_mean")[0])
register("tecm_pooled", lambda t: tecm_aggregate(t, "pooled")[0])
register("spqs", self_pqs)
