"""Benchmark: AffinityNet epochs Optuna TPE + ASHA needs to match the paper grid's best pair.

The reference is the full paper grid on the demo data (`configs/demo.yaml`, `search.space=paper`:
32 pairs, every epoch, `search.scheduler=none`); its best objective is the best final objective
of a non-degenerate grid pair. The search under test is Optuna TPE (`search.space=optuna`, no
warm start from the grid) with ASHA early stopping as configured by default (grace period 1,
reduction factor 2), `search.max_concurrent=2` as in the product. Measured per seed: the epochs
of all trials, counted in the chronological order they were reported, until a trial reaches the
full number of epochs with an objective within 1% of the grid's best
(``objective >= best - 0.01 * |best|``), as a fraction of the grid's total epochs
(32 x `refine.irn.epochs`). Both sides run through the product's `tune.search.run_search`
(stage 1 only), each search in its own folder of one temporary runs root, so the user's MLflow
store is untouched. Stage 0 (classifier, CAM and feature stores) is prepared once in
`<repo>/runs/stores`, the default cache, which the temporary root's `stores` links to.

Order of reports: Tune's ``timestamp`` is in whole seconds (epochs of two concurrent trials
often share one), so epochs are ordered by their MLflow metric timestamps (milliseconds), which
the product's trainable logs once per epoch just before reporting it to Tune; reports sharing
the finding report's millisecond count as before it. Two concurrent trials make the count
depend on timing as well as on the seed (which trial reports first decides what TPE has seen),
but each run's count is well defined, so the product's concurrency is kept.

A seed that never finds such a pair within ``search.num_samples`` trials (default 32, as many
as the grid has pairs) is printed "not found" and counts as infinitely many epochs, so failures
can only raise the median. Median over 5 seeds (`search.seed` 0-4). Target (issue #5):
median <= 0.5.

    python benchmarks/search_efficiency.py [--quick]   # --quick: 6 pairs, 2 epochs, 40 images,
                                                      # 2 seeds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from tune.config import load_config, stage0
from tune.search import SearchResult, run_search
from tune.space import grid_pairs

REPO = Path(__file__).resolve().parents[1]
TARGET, TOLERANCE = 0.5, 0.01
QUICK_PAIRS = [[0.05, 0.30], [0.10, 0.35], [0.15, 0.25], [0.20, 0.45], [0.25, 0.50],
               [0.30, 0.30]]  # one degenerate pair, as in the paper grid


def search(runs: Path, name: str, overrides: list[str]) -> SearchResult:
    """One stage-1 search through the product's driver (cached stage 0, no stage 2)."""
    cfg = load_config("demo", [*overrides, f"name={name}", "search.stage2=false",
                               f"runtime.runs_root={runs}", "runtime.progress=false"],
                      base_dir=REPO)
    return run_search(cfg)


def reports(out: SearchResult) -> pd.DataFrame:
    """Every epoch reported by every trial of a search: ``time_ms``, ``epoch``, ``objective``,
    in chronological order (the MLflow child run's per-epoch ``objective``)."""
    client = MlflowClient(out.tracking_uri)
    rows = [(m.timestamp, m.step, m.value) for run_id in out.table.mlflow_run_id
            for m in client.get_metric_history(run_id, "objective")]
    frame = pd.DataFrame(rows, columns=["time_ms", "epoch", "objective"]).sort_values("time_ms")
    if len(frame) != out.table.training_iteration.sum():
        raise SystemExit(f"MLflow holds {len(frame)} epoch reports, Tune "
                         f"{out.table.training_iteration.sum()}: cannot count epochs")
    return frame


def epochs_to_find(frame: pd.DataFrame, epochs: int, threshold: float) -> int | None:
    """Epochs reported up to the first trial finishing all ``epochs`` at ``>= threshold``."""
    hits = frame[(frame.epoch == epochs) & (frame.objective >= threshold)]
    return None if hits.empty else int((frame.time_ms <= hits.time_ms.iloc[0]).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="6 pairs instead of the paper grid, 2 epochs, 40 images, 2 seeds")
    ap.add_argument("--num-samples", type=int, default=32, help="TPE trials per seed")
    args = ap.parse_args()
    common = ["refine.irn.epochs=2", "trial.subset=40"] if args.quick else []
    grid = (["search.space=pairs", f"search.pairs={QUICK_PAIRS}"] if args.quick
            else ["search.space=paper"])
    seeds = range(2 if args.quick else 5)
    cfg = load_config("demo", [*common, *grid], base_dir=REPO)
    epochs, n_pairs = cfg.refine.epochs, len(grid_pairs(cfg.search.space, cfg.search.pairs))
    grid_epochs = n_pairs * epochs
    grace, samples = min(cfg.search.grace_period, epochs), args.num_samples
    stage0(cfg)  # the default cache: built on the first run only
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        runs.mkdir()
        (runs / "stores").symlink_to(cfg.runtime.runs_root / "stores")
        table = search(runs, "grid", [*common, *grid, "search.scheduler=none"])["table"]
        valid = table[(table.degenerate == 0) & (table.training_iteration == epochs)]
        best = valid.loc[valid.objective.idxmax()]
        threshold = best.objective - TOLERANCE * abs(best.objective)
        print(f"grid: {n_pairs} pairs x {epochs} epochs = {grid_epochs} epochs; best pair "
              f"({best.bg:g}, {best.fg:g}) {cfg.search.objective} {best.objective:.4f}; "
              f"found = a finished trial at >= {threshold:.4f}")
        print(f"Optuna TPE + ASHA (grace {grace}, reduction {cfg.search.reduction_factor:g}), "
              f"{samples} trials per seed, up to {cfg.search.max_concurrent} at a time")
        fractions = []
        for seed in seeds:
            out = search(runs, f"tpe-seed{seed}", [
                *common, "search.space=optuna", "search.warm_start_grid=false",
                "search.scheduler=asha", f"search.num_samples={samples}", f"search.seed={seed}"])
            frame = reports(out)
            used = epochs_to_find(frame, epochs, threshold)
            fractions.append(float("inf") if used is None else used / grid_epochs)
            done = out.table[out.table.training_iteration == epochs]
            top = done.loc[done.objective.idxmax()]
            what = "not found" if used is None else f"found after {used} epochs"
            print(f"  seed {seed}: {what} -> {fractions[-1]:.3f} of the grid's epochs "
                  f"(search used {len(frame)}; its best finished pair ({top.bg:.3f}, "
                  f"{top.fg:.3f}) {top.objective:.4f})")
    print(f"search_efficiency: median={statistics.median(fractions):.3f} of the grid's epochs "
          f"(per seed {', '.join(f'{f:.3f}' for f in fractions)}; target <= {TARGET})")


if __name__ == "__main__":
    main()
