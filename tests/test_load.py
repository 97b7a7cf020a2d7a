"""Load: a 200-trial random search through the real CLI completes, and MLflow holds exactly one
FINISHED stage-1 child run per trial (the driver's memory and per-trial overhead are measured by
`benchmarks/load.py`, figures in the README)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pandas as pd
import pytest

TRIALS = 200


@pytest.mark.slow
def test_a_200_trial_random_search_completes_with_one_run_per_trial(ci_config, ci_prepared,
                                                                    tmp_path):
    from mlflow import MlflowClient

    from tune.folder import load_state

    runs = tmp_path / "runs"
    for store in ci_prepared.cached:  # the session's classifier and CAMs: no stage-0 training
        shutil.copytree(store, runs / "stores" / store.name)
    sets = [f"runtime.runs_root={runs}", "name=load", "trial.subset=8", "refine.irn.epochs=1",
            f"search.num_samples={TRIALS}", "search.scheduler=none", "search.stage2=false",
            "runtime.progress=true"]
    done = subprocess.run([sys.executable, "-m", "tune.cli", "search", "--config", "ci",
                           "--space", "random", "--data", str(ci_config.data.root),
                           *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"[{TRIALS}/{TRIALS}]" in done.stdout
    table = pd.read_csv(runs / "load" / "stage1.csv")
    assert len(table) == TRIALS and table.trial_id.nunique() == TRIALS
    assert table.mlflow_run_id.nunique() == TRIALS and (table.failed == 0).all()
    assert (table.bg < table.fg).all()

    state = load_state(runs / "load")
    client = MlflowClient(state["tracking_uri"])
    parent = client.get_run(state["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  max_results=10_000)
    assert len(children) == TRIALS and {c.data.tags["stage"] for c in children} == {"1"}
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.info.run_id for c in children} == set(table.mlflow_run_id)
    assert parent.info.status == "FINISHED"
