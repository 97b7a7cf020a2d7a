"""Benchmark: what Ray Tune costs on stage 1, against a plain process pool running the same trials.

Stage 1 runs every (BG, FG) trial under Ray Tune (`tune.search.Search.stage1`): the product's
trainable with an MLflow child run per trial on a real SQLite store (logged from the driver by
`tune.tracking.TrialRuns`), a checkpoint after every epoch, reused actors and Tune's experiment
snapshots. The reference runs the same trials as a plain loop over `wsss.trial.run_trial` in a
process pool with the same concurrency (`search.max_concurrent` = 2 worker processes) and the same
torch threads per trial (`search.cpus_per_trial` = 1); each worker opens the memory-mapped stores
once, as a reused Ray actor does. Both run the 8 fixed, non-degenerate pairs below with
`configs/demo.yaml`'s `refine` settings for every epoch (`search.scheduler=none`,
`search.space=pairs`), so the work is identical and the final objectives must agree (both on CPU,
`runtime.device=cpu`, where training is deterministic). Worker start-up counts on both sides
(spawned pool processes, Ray actors), and so do the product's progress lines; `ray.init` and
creating the MLflow store and parent run are one-off per search and are printed apart, outside the
ratio. Stage 0 (classifier, CAM and feature stores) is prepared once before timing in
`<repo>/runs/stores` (the default cache, shared with the demo) and handed to both sides; the search
runs in a temporary runs root (its MLflow store, Tune's results), so the user's MLflow store is not
touched. Target (issue #5): ratio Ray / plain <= 1.15x.

    python benchmarks/tune_overhead.py [--quick]    # --quick: 2 pairs, 2 epochs, 40 images
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from tune.config import Config, load_config
from wsss.objectives import driving_value
from wsss.refine import RefineSpec
from wsss.stage0 import Prepared, PreparedRef, TrialSpec
from wsss.trial import Trial, run_trial

REPO = Path(__file__).resolve().parents[1]
PAIRS = [(0.05, 0.30), (0.10, 0.20), (0.15, 0.40), (0.20, 0.45), (0.25, 0.35), (0.30, 0.55),
         (0.35, 0.75), (0.40, 0.65)]  # from the paper grid, BG < FG: none is degenerate
TARGET = 1.15
Pair = tuple[float, float]

# tune.search (Ray, MLflow, Optuna) is imported inside functions: the plain pool's spawned
# workers re-import this script and load only what a plain trial needs (torch, wsss)
_prepared: Prepared | None = None  # per plain worker process: the stores, opened once


def _open_stores(ref: PreparedRef, threads: int) -> None:
    global _prepared
    torch.set_num_threads(threads)
    _prepared = Prepared.open(ref)


def _final_objective(bg: float, fg: float, specs: tuple[TrialSpec, RefineSpec], objective: str,
                     device: str) -> float:
    """The plain trial: every epoch of `run_trial`; the objective as the trainable reports it."""
    *_, last = run_trial(Trial(_prepared, *specs, bg, fg, device=device))
    return driving_value(last, objective)


def plain(cfg: Config, prepared: Prepared, pairs: list[Pair]) -> dict[Pair, float]:
    """(BG, FG) -> final objective from a pool of ``max_concurrent`` spawned processes."""
    threads = max(1, int(cfg.search.cpus_per_trial))
    with ProcessPoolExecutor(cfg.search.max_concurrent, multiprocessing.get_context("spawn"),
                             initializer=_open_stores,
                             initargs=(prepared.ref(cfg.data, cfg.trial.subset),
                                       threads)) as pool:
        futures = {pair: pool.submit(_final_objective, *pair, (cfg.trial, cfg.refine),
                                     cfg.search.objective,
                                     cfg.runtime.device) for pair in pairs}
        return {pair: f.result() for pair, f in futures.items()}


def ray_tune(cfg: Config, prepared: Prepared) -> tuple[dict[Pair, float], dict[str, float]]:
    """(BG, FG) -> final objective from `Search.stage1`, and the times: mlflow, init, stage1."""
    from tune import tracking
    from tune.search import Search, ray_session

    search = Search(cfg)
    search.folder.mkdir(parents=True)
    start = time.perf_counter()
    search.begin()
    times = {"mlflow": time.perf_counter() - start}
    start = time.perf_counter()
    with ray_session(None):
        times["init"] = time.perf_counter() - start
        start = time.perf_counter()
        table = search.stage1(prepared)
        times["stage1"] = time.perf_counter() - start
    tracking.finish(search.uri, search.parent)
    if (table.training_iteration != cfg.refine.epochs).any() or table.degenerate.any():
        raise SystemExit(f"expected every trial to finish {cfg.refine.epochs} epochs, none "
                         f"degenerate:\n{table[['bg', 'fg', 'training_iteration', 'degenerate']]}")
    return {(r.bg, r.fg): r.objective for r in table.itertuples()}, times


def main() -> None:
    from tune.config import stage0

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 pairs, 2 epochs, 40 images")
    args = ap.parse_args()
    pairs = PAIRS[:2] if args.quick else PAIRS
    cfg = load_config("demo", [
        *(["refine.irn.epochs=2", "trial.subset=40"] if args.quick else []),
        "name=tune-overhead", "search.space=pairs", f"search.pairs={[list(p) for p in pairs]}",
        "search.scheduler=none", "search.stage2=false", "runtime.device=cpu"], base_dir=REPO)
    start = time.perf_counter()
    prepared = stage0(cfg)  # the default cache: built on the first run only
    print(f"stage 0 (untimed): {time.perf_counter() - start:.1f} s, cached in "
          f"{cfg.runtime.runs_root / 'stores'}")
    print(f"{len(pairs)} pairs x {cfg.refine.epochs} epochs on {len(prepared.features)} images; "
          f"{cfg.search.max_concurrent} workers x {max(1, int(cfg.search.cpus_per_trial))} torch "
          f"thread(s) each")
    start = time.perf_counter()
    ours = plain(cfg, prepared, pairs)
    t_plain = time.perf_counter() - start
    print(f"plain process pool (run_trial): {t_plain:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        runtime = cfg.runtime.model_copy(update={"runs_root": Path(tmp)})
        tuned, times = ray_tune(cfg.model_copy(update={"runtime": runtime}), prepared)
    print(f"Ray Tune Search.stage1: {times['stage1']:.1f} s (apart: ray.init "
          f"{times['init']:.1f} s, MLflow store + parent run {times['mlflow']:.1f} s)")
    diff = max(abs(ours[p] - tuned[p]) for p in pairs)
    print(f"final objective ({cfg.search.objective}) of {len(pairs)} pairs: max abs difference "
          f"{diff:.1e} (best {max(ours.values()):.4f})")
    if diff > 1e-6:
        raise SystemExit("the two paths trained different trials: the ratio compares nothing")
    print(f"tune_overhead: ratio={times['stage1'] / t_plain:.2f} (Ray Tune / plain process pool; "
          f"target <= {TARGET})")


if __name__ == "__main__":
    main()
