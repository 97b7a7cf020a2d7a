"""Benchmark: a many-trial search, through the real CLI: does the driver stay flat, and what does
each trial cost beyond its own work?

Runs ``wsss-tune search`` in a subprocess on `configs/ci.yaml` made tiny (8 trial images, one
AffinityNet epoch, a random space of ``--trials`` pairs, no early stopping, no stage 2) in a
temporary runs root, samples the driver process's resident memory every 0.2 s, and notes its peak
so far when the progress lines say 1, 50 and all trials have finished. Afterwards it checks MLflow
(one stage-1 child run per trial, none RUNNING) and measures the reference in the same run: the
same trial's work alone (`wsss.trial.run_trial` on the search's stores, one torch thread, as a
trial gets), median of 5 pairs. Overhead per trial = stage-1 wall time x concurrency / trials -
the trial alone; the ratio is stage-1 wall time per trial slot over the trial alone.

    python benchmarks/load.py [--trials 200]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(runs: Path, trials: int, concurrency: int) -> dict:
    """The search in a subprocess: peak driver RSS at 50 and ``trials`` finished trials, and
    the stage-1 wall time from its progress lines."""
    args = [sys.executable, "-m", "tune.cli", "search", "--config", "ci", "--space", "random",
            *[a for s in (f"runtime.runs_root={runs}", "name=load", "trial.subset=8",
                          "refine.irn.epochs=1", f"search.num_samples={trials}",
                          "search.scheduler=none", "search.stage2=false",
                          f"search.max_concurrent={concurrency}", "runtime.progress=true")
              for a in ("--set", s)]]
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    peak, marks, done = [0.0], {}, threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                peak[0] = max(peak[0], rss_mb(process.pid))
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    first = None
    for line in process.stdout:
        if m := re.search(r"\[\s*(\d+)/(\d+)\]", line):
            n = int(m.group(1))
            first = first or time.perf_counter()
            if n in (1, 50, trials):
                marks[n] = (rss_mb(process.pid), peak[0], time.perf_counter())
        if "Traceback" in line or "error" in line:
            print(line, end="")
    process.wait()
    done.set()
    if process.returncode != 0 or trials not in marks:
        raise SystemExit(f"the search failed (exit {process.returncode})")
    return {"at": {n: marks[n][:2] for n in sorted(marks)}, "rss_peak": peak[0],
            "stage1_s": marks[trials][2] - marks[1][2]}


def mlflow_children(runs: Path) -> tuple[int, int]:
    """(stage-1 child runs, of them RUNNING) of the search's parent run."""
    from mlflow import MlflowClient

    from tune.folder import load_state

    state = load_state(runs / "load")
    client = MlflowClient(state["tracking_uri"])
    parent = client.get_run(state["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
                                  f"tags.stage = '1'", max_results=10_000)
    return len(children), sum(c.info.status == "RUNNING" for c in children)


def trial_alone(runs: Path) -> float:
    """Median seconds of one trial's own work (no Ray, no MLflow) over 5 pairs."""
    from tune.config import stage0
    from tune.folder import saved_config
    from wsss.trial import Trial, run_trial

    torch.set_num_threads(1)
    cfg = saved_config(runs / "load")
    prepared = stage0(cfg)
    times = []
    for bg, fg in [(0.1, 0.3), (0.15, 0.4), (0.2, 0.5), (0.25, 0.55), (0.3, 0.6)]:
        start = time.perf_counter()
        for _ in run_trial(Trial(prepared, cfg.trial, cfg.refine, bg, fg, device="cpu")):
            pass
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        start = time.perf_counter()
        out = run(runs, args.trials, args.concurrency)
        whole = time.perf_counter() - start
        children, running = mlflow_children(runs)
        alone = trial_alone(runs)
    per_slot = out["stage1_s"] * args.concurrency / (args.trials - 1)
    print(f"{args.trials} trials of the tiny ci config, {args.concurrency} at a time, "
          f"{os.cpu_count()} cores")
    print(f"MLflow: {children} stage-1 child runs, {running} RUNNING "
          f"({'ok' if (children, running) == (args.trials, 0) else 'WRONG'})")
    for n, (now, peak) in out["at"].items():
        print(f"driver RSS when {n:>3} trials had finished: {now:.0f} MB (peak so far "
              f"{peak:.0f} MB)")
    print(f"driver peak RSS of the whole command: {out['rss_peak']:.0f} MB")
    print(f"stage 1: {out['stage1_s']:.1f} s from the first to the last finished trial; whole "
          f"command {whole:.0f} s (stage 0 built from scratch)")
    print(f"per trial slot {per_slot:.2f} s vs the trial alone {alone:.2f} s: overhead "
          f"{per_slot - alone:.2f} s per trial, ratio {per_slot / alone:.2f}x")


if __name__ == "__main__":
    main()
