"""Promotion rules (pure) and a real stage-1 search on a local Ray cluster (slow, run in CI)."""

import json

import pandas as pd
import pytest

from tune.config import load_config
from tune.search import promote
from tune.space import DefineByRun, SamplerBounds
from wsss.errors import UserError


def table(rows):
    return pd.DataFrame(rows, columns=["bg", "fg", "objective", "degenerate",
                                       "training_iteration"])


def test_promote_global_and_per_bg_with_deterministic_ties():
    t = table([(0.1, 0.2, 0.9, 0, 3), (0.1, 0.3, 0.8, 0, 3), (0.2, 0.3, 0.8, 0, 3),
               (0.2, 0.2, 1.0, 1, 3),  # degenerate: never promoted
               (0.3, 0.5, 0.95, 0, 1),  # stopped early by ASHA: never promoted
               (0.05, 0.3, 0.8, 0, 3)])
    g = promote(t, k=3, policy="global", epochs=3)
    assert list(zip(g.bg, g.fg)) == [(0.1, 0.2), (0.05, 0.3), (0.1, 0.3)]  # ties: bg, fg asc
    p = promote(t, k=3, policy="per_bg", epochs=3)
    assert list(zip(p.bg, p.fg)) == [(0.1, 0.2), (0.05, 0.3), (0.2, 0.3)]  # one FG per BG


def test_failed_trials_are_never_promoted_and_trials_without_gpus_run_on_cpu():
    from tune.search import trial_device

    t = table([(0.1, 0.2, 0.9, 0, 3), (0.1, 0.3, 0.95, 0, 3)]).assign(failed=[0, 1])
    assert list(zip(*promote(t, k=2, policy="global", epochs=3)[["bg", "fg"]].values.T)) == [
        (0.1, 0.2)]
    assert trial_device("auto", 0) == "cpu" and trial_device("auto", 0.25) == "auto"
    assert trial_device("cpu", 1) == "cpu"


def test_promote_fewer_than_k_warns_and_none_is_an_error(caplog):
    t = table([(0.1, 0.2, 0.9, 0, 3), (0.2, 0.2, 1.0, 1, 3)])
    assert len(promote(t, k=3, policy="global", epochs=3)) == 1
    assert "only 1 trials qualify" in caplog.text
    with pytest.raises(UserError, match="1 stopped early, 1 degenerate"):
        promote(table([(0.1, 0.2, 0.9, 0, 1), (0.2, 0.2, 1.0, 1, 3)]), k=2, policy="global",
                epochs=3)


def test_sampled_space_respects_the_gap():
    import optuna

    bounds = SamplerBounds(bg_min=0.0, bg_max=0.7, min_gap=0.05, fg_max=0.95)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = DefineByRun(bounds)
    for _ in range(200):
        trial = study.ask()
        space(trial)
        bg, fg = trial.params["bg"], trial.params["fg"]
        assert 0 <= bg <= 0.7 and bg + 0.05 - 1e-12 <= fg <= 0.95
        study.tell(trial, 0.0)


@pytest.mark.slow
def test_optuna_search_on_local_ray(ci_config, ci_prepared, tmp_path):
    """TPE samples valid pairs under Tune, whose experiment snapshots pickle the sampler's space
    every second (a closure there once crashed every optuna search)."""
    import os

    from tune.cli import main

    runs = tmp_path / "runs"
    runs.mkdir()
    os.symlink(ci_config.runtime.runs_root / "stores", runs / "stores")
    assert main(["search", "--config", "ci", "--space", "optuna", "--set", "name=tpe",
                 "--set", "search.num_samples=3", "--set", "refine.irn.epochs=1",
                 "--set", "trial.subset=40", "--set", "search.stage2=false",
                 "--set", f"data.root={ci_config.data.root}",
                 "--set", f"runtime.runs_root={runs}"]) == 0
    t = pd.read_csv(runs / "tpe" / "stage1.csv")
    assert len(t) == 3 and len(set(zip(t.bg, t.fg))) == 3
    assert (t.bg.between(0, 0.7) & (t.fg >= t.bg + 0.05 - 1e-9) & (t.fg <= 0.95)).all()


@pytest.mark.slow
def test_two_stage_search_on_local_ray(ci_config, ci_prepared, capsys):
    from tune.cli import main
    from tune.folder import load_state

    pairs = "[[0.1, 0.35], [0.2, 0.45], [0.3, 0.3], [0.25, 0.5]]"
    runs = ci_config.runtime.runs_root  # the session's stores: stage 0 is all cached
    assert main(["search", "--config", "ci", "--space", "pairs", "--data",
                 str(ci_config.data.root), "--set", f"search.pairs={pairs}",
                 "--set", "refine.irn.epochs=2", "--set", "trial.subset=40",
                 "--set", "search.top_k=2", "--set", "segmentation.epochs=2",
                 "--set", "runtime.progress=true", "--set", f"runtime.runs_root={runs}"]) == 0
    printed = capsys.readouterr().out
    state = load_state(runs / "ci")
    out = {"tracking_uri": state["tracking_uri"], "parent_run_id": state["parent_run_id"]}
    t = pd.read_csv(runs / "ci" / "stage1.csv")
    assert state["config"]["data"]["synthetic"] is None  # --data: the user's dataset as is
    assert "stage 1: 4 trials (pairs space)" in printed and "[  4/4]" in printed
    assert "epoch  2/2" in printed and "regret of the pick" in printed
    assert sorted(zip(t.bg, t.fg)) == [(0.1, 0.35), (0.2, 0.45), (0.25, 0.5), (0.3, 0.3)]
    assert {"tecm", "tecm_pooled", "pqs_pseudo", "objective", "training_iteration"} <= set(t)
    assert (t.loc[t.degenerate == 1, "objective"] == 0).all()  # degenerate never drives
    assert t.training_iteration.between(1, 2).all()
    saved = json.loads((runs / "ci" / "candidates.json").read_text())
    assert saved["objective"] == "tecm" and 1 <= len(saved["candidates"]) <= 2
    best = t[(t.training_iteration == 2) & (t.degenerate == 0)].objective.max()
    assert saved["candidates"][0]["objective"] == pytest.approx(best)
    assert all(c["bg"] != c["fg"] for c in saved["candidates"])
    # MLflow (a real SQLite store): one parent, one child per trial, nothing left RUNNING
    from mlflow import MlflowClient

    client = MlflowClient(out["tracking_uri"])
    assert out["tracking_uri"] == f"sqlite:///{(runs / 'mlflow.db').resolve()}"
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["refine.irn.epochs"] == "2" and parent.data.tags["git_commit"]
    assert parent.data.params["refine.method"] == "irn"
    assert not any(k.startswith(("refine.psa", "refine.crf")) for k in parent.data.params)
    assert parent.data.tags["version.torch"] and parent.data.tags["config_hash"]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                                  f"and tags.stage = '1'")
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    assert sorted((c.data.params["bg"], c.data.params["fg"]) for c in children) == [
        ("0.1", "0.35"), ("0.2", "0.45"), ("0.25", "0.5"), ("0.3", "0.3")]
    for child in children:
        assert child.data.tags["stage"] == "1"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "tecm")]
        row = t[t.mlflow_run_id == child.info.run_id].iloc[0]
        if row.degenerate:  # its objectives are undefined: absent, so they never sort first
            assert steps == [] and "tecm" not in child.data.metrics
            assert child.data.metrics["degenerate"] == 1
        else:
            assert steps == list(range(1, int(row.training_iteration) + 1))
            assert child.data.metrics["tecm"] == pytest.approx(row.tecm)
        assert child.data.tags["stopped_early"] == ("false" if row.training_iteration == 2
                                                    else "true")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"stage1.csv", "candidates.json"} <= artifacts
    assert parent.info.artifact_uri.startswith((runs / "mlartifacts").as_uri())  # not ./mlruns
    # stage 2: DeepLabv3+ on each candidate's pseudo-labels, val mIoU per epoch, then selection
    stage2 = client.search_runs([parent.info.experiment_id],
                                f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                                f"and tags.stage = '2'")
    assert len(stage2) == len(saved["candidates"])
    assert {r.info.status for r in stage2} == {"FINISHED"}
    for run in stage2:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_miou")]
        assert steps == [1, 2] and 0 < run.data.metrics["val_miou"] < 1
    selection = json.loads((runs / "ci" / "selection.json").read_text())
    assert selection["pick"] == "objective" and selection["uses_ground_truth"] is False
    pair = (selection["pair"]["bg"], selection["pair"]["fg"])
    assert pair == (saved["candidates"][0]["bg"], saved["candidates"][0]["fg"])
    assert selection["regret_val_miou"] >= 0
    assert (f"selected (BG, FG) = ({pair[0]:g}, {pair[1]:g}) by tecm (no ground truth used)"
            in printed)
    assert f"regret of the pick {100 * selection['regret_val_miou']:.2f} points" in printed
    assert selection["regret_scope"] == "candidates" and "promoted candidates only" in printed
    # MLflow shows the selection: parent metrics, tags and note; the pick's runs tagged; the
    # promoted stage-1 runs hold val mIoU; sorting by ranked_tecm puts the pick first
    parent = client.get_run(out["parent_run_id"])
    assert parent.data.metrics["selected_bg"] == pair[0]
    assert parent.data.metrics["selected_fg"] == pair[1]
    assert parent.data.metrics["selected_val_miou"] == pytest.approx(
        selection["metrics"]["val_miou"])
    assert parent.data.metrics["regret_val_miou"] == pytest.approx(selection["regret_val_miou"])
    assert parent.data.tags["selected_pair"] == f"({pair[0]:g}, {pair[1]:g})"
    assert f"({pair[0]:g}, {pair[1]:g})" in parent.data.tags["mlflow.note.content"]
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert (f"/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}"
            f"?workflowType=machine_learning") in printed  # opens the parent run, training view
    by_rank = client.search_runs([parent.info.experiment_id],
                                 f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
                                 f"tags.stage = '1'", order_by=["metrics.ranked_tecm DESC"])
    assert (by_rank[0].data.params["bg"], by_rank[0].data.params["fg"]) == (
        f"{pair[0]:g}", f"{pair[1]:g}") and by_rank[0].data.tags["selected"] == "true"
    for run in by_rank:
        row = t[t.mlflow_run_id == run.info.run_id].iloc[0]
        assert ("ranked_tecm" in run.data.metrics) == bool(
            row.training_iteration == 2 and not row.degenerate)
        promoted = any(c["mlflow_run_id"] == run.info.run_id for c in saved["candidates"])
        assert ("val_miou" in run.data.metrics) == promoted
    assert [r.data.tags.get("selected") for r in stage2].count("true") == 1
    epochs = pd.read_csv(runs / "ci" / "stage1_epochs.csv")
    assert len(epochs) == t.training_iteration.sum()  # every epoch of every trial, once
    assert len(pd.read_csv(runs / "ci" / "stage2_epochs.csv")) == 2 * len(stage2)
    assert f"val mIoU {selection['metrics']['val_miou']:.2%}" in printed
    assert all(r["stage2_checkpoint"] for r in selection["ranked"])  # the trained DeepLabv3+
    assert {"stage1.csv", "candidates.json", "selection.json", "thresholds.yaml"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    # re-select without retraining: by val mIoU (uses GT), then another promotion policy
    from tune.cli import main

    assert main(["select", str(runs / "ci"), "--pick", "val_miou"]) == 0
    again = json.loads((runs / "ci" / "selection.json").read_text())
    assert again["uses_ground_truth"] is True and again["pick"] == "val_miou"
    assert again["pair"]["bg"] == selection["best_by_val_miou"]["bg"]
    assert again["pair"]["fg"] == selection["best_by_val_miou"]["fg"]
    assert main(["select", str(runs / "ci"), "--policy", "per_bg"]) == 0
    assert json.loads((runs / "ci" / "selection.json").read_text())["policy"] == "per_bg"
    # pseudo-labels of the whole train split for the selected pair, and a pair never searched
    labels = runs / "labels"
    assert main(["export-labels", str(runs / "ci"), "--out", str(labels)]) == 0
    assert len(list(labels.glob("*.png"))) == len(ci_prepared.train)
    assert main(["export-labels", str(runs / "ci"), "--out", str(labels), "--pair",
                 "0.5,0.9"]) == 2


def _kill_when(args: list[str], cwd, ready, what: str, limit: float = 300) -> None:
    """Run ``wsss-tune ARGS`` in its own process group and SIGKILL the whole group (driver,
    Ray, trial workers) as soon as ``ready()`` returns something true."""
    import os
    import signal
    import subprocess
    import sys
    import time

    log = cwd / f"search-{time.time_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tune.cli", *args], cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + limit
    try:
        while time.time() < deadline:
            if ready():
                time.sleep(3)  # > TUNE_GLOBAL_CHECKPOINT_S: Tune has recorded what finished
                return
            assert proc.poll() is None, (f"the search ended before {what}:\n"
                                         f"{log.read_text()[-3000:]}")
            time.sleep(0.5)
        raise AssertionError(f"not {what} within {limit} s")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended by itself (the assertion above says how)
            pass
        proc.wait()


def _finished_trials(stage_dir, epochs: int) -> list:
    return [p for p in stage_dir.glob("*/result.json")
            if len(p.read_text().splitlines()) >= epochs]


@pytest.mark.slow
def test_killed_search_resumes_without_rerunning_finished_trials(ci_config, ci_prepared,
                                                                  tmp_path):
    """SIGKILL during stage 1, resume (and SIGKILL that during stage 2), resume again: every
    trial of each stage appears once, finished ones are not retrained, nothing stays RUNNING."""
    import os

    from mlflow import MlflowClient

    from tune.cli import main
    from tune.folder import load_state

    runs = tmp_path / "runs"
    args = ["search", "--config", "ci", "--space", "pairs", "--set", "name=resume",
            "--set", "search.scheduler=none",
            "--set", "search.pairs=[[0.1,0.35],[0.15,0.4],[0.2,0.45],[0.25,0.5]]",
            "--set", "refine.irn.epochs=3", "--set", "trial.subset=40",
            "--set", "search.max_concurrent=1", "--set", "search.top_k=2",
            "--set", "segmentation.epochs=2",
            "--set", f"data.root={ci_config.data.root}", "--set", f"runtime.runs_root={runs}"]
    # stage 0 reuses the session's classifier and CAM store (same data, same settings)
    os.makedirs(runs, exist_ok=True)
    os.symlink(ci_config.runtime.runs_root / "stores", runs / "stores")
    folder = runs / "resume"
    _kill_when(args, tmp_path, lambda: _finished_trials(folder / "stage1", 3),
               "one stage-1 trial finished")
    done = _finished_trials(folder / "stage1", 3)
    finished_before = {
        f'{json.loads((p.parent / "params.json").read_text())["pair"]["bg"]:g}' for p in done}
    state = load_state(folder)
    client = MlflowClient(state["tracking_uri"])
    experiment = client.get_run(state["parent_run_id"]).info.experiment_id

    def children(stage: int) -> dict:
        return {r.info.run_id: r for r in client.search_runs(
            [experiment], f"tags.mlflow.parentRunId = '{state['parent_run_id']}' "
                          f"and tags.stage = '{stage}'")}

    before = children(1)
    assert finished_before  # something finished before the kill
    _kill_when(["search", "--resume", str(folder)], tmp_path,
               lambda: _finished_trials(folder / "stage2", 2), "one stage-2 trial finished")
    stage1, stage2_before = children(1), children(2)
    assert main(["search", "--resume", str(folder)]) == 0
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert sorted(c.data.params["bg"] for c in children(1).values()) == [
        "0.1", "0.15", "0.2", "0.25"]
    for child in children(1).values():  # each epoch reported once: no trial was trained twice
        assert child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "tecm")]
        assert steps == [1, 2, 3], (child.data.params, steps)
        assert child.info.end_time == stage1[child.info.run_id].info.end_time  # not rerun
        if child.data.params["bg"] in finished_before:
            assert child.info.end_time == before[child.info.run_id].info.end_time
    after = children(2)  # stage 2 started once: one run per candidate, finished ones kept
    candidates = json.loads((folder / "candidates.json").read_text())["candidates"]
    assert len(after) == len(candidates) == 2
    assert {r.info.status for r in after.values()} == {"FINISHED"}
    for run in after.values():
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_miou")]
        assert steps == [1, 2], steps
    finished2 = [r for r in stage2_before.values() if r.info.status == "FINISHED"]
    assert finished2 and all(after[r.info.run_id].info.end_time == r.info.end_time
                             for r in finished2)
    selection = json.loads((folder / "selection.json").read_text())
    assert all(row["val_miou"] is not None for row in selection["ranked"])


def test_reselect_says_which_candidates_never_reached_stage_two(tmp_path, capsys):
    from tune.cli import main
    from tune.search import reselect

    cfg = load_config("ci", ["search.top_k=2", "refine.irn.epochs=3"], base_dir=tmp_path)
    folder = tmp_path / "runs" / "ci"
    folder.mkdir(parents=True)
    (folder / "search.json").write_text(json.dumps({"config": cfg.model_dump(mode="json")}))
    stage1 = table([(0.1, 0.3, 0.9, 0, 3), (0.1, 0.4, 0.8, 0, 3), (0.2, 0.4, 0.7, 0, 3)])
    stage1.to_csv(folder / "stage1.csv", index=False)
    pd.DataFrame({"bg": [0.1, 0.1], "fg": [0.3, 0.4], "val_miou": [0.5, 0.6],
                  "seg_loss": [0.2, 0.2]}).to_csv(folder / "stage2.csv", index=False)
    selection, missing = reselect(folder, pick="val_miou")
    assert (selection["pair"]["bg"], selection["pair"]["fg"]) == (0.1, 0.4) and missing == []
    assert selection["regret_val_miou"] == 0
    selection, missing = reselect(folder, policy="per_bg", pick="objective")
    assert missing == [(0.2, 0.4)]  # per_bg promotes (0.2, 0.4), which stage 2 never trained
    assert (selection["pair"]["bg"], selection["pair"]["fg"]) == (0.1, 0.3)
    assert main(["select", str(folder), "--policy", "per_bg"]) == 0
    assert "never reached stage 2 (no val mIoU): (0.2, 0.4)" in capsys.readouterr().out
    assert main(["select", str(tmp_path / "nowhere")]) == 2


@pytest.mark.slow
def test_a_failed_trial_is_marked_failed_in_mlflow_and_said_in_one_line(tmp_path, caplog):
    """A trial that raises after its first report, under a real Tune run with the driver's
    `TrialRuns`: its child run holds that report and ends FAILED, and the search says why in
    one line."""
    from mlflow import MlflowClient
    from ray import tune

    from tune import tracking
    from tune.search import _failure, ray_session

    uri = tracking.default_uri(tmp_path)
    parent = tracking.start_parent(uri, "s", {"a": 1}, {})

    def crashes(config):
        tune.report({"bg": 0.1, "fg": 0.3, "epoch": 1, "tecm": 0.5})
        raise RuntimeError("CUDA out of memory")

    def reports(config):
        for epoch in (1, 2):
            tune.report({"bg": 0.1, "fg": 0.3, "epoch": epoch, "tecm": 0.5})

    def fit(trainable, name: str, parent_id: str) -> tune.ResultGrid:
        return tune.Tuner(trainable, param_space={"pair": {"bg": 0.1, "fg": 0.3}},
                          run_config=tune.RunConfig(
                              name=name, storage_path=str(tmp_path), verbose=0,
                              callbacks=[tracking.TrialRuns(uri, parent_id, 1, 2)])).fit()

    with ray_session(None):
        results = fit(crashes, "stage1", parent)
        # MLflow failing under the callback (here: no such parent run) costs records, not trials
        unrecorded = fit(reports, "unrecorded", "0" * 32)
    assert unrecorded[0].error is None and unrecorded[0].metrics["epoch"] == 2
    assert "MLflow: epoch 2 of stage-1 trial" in caplog.text and "the search goes on" in caplog.text
    result = results[0]
    assert _failure(result, 1) == "RuntimeError: CUDA out of memory"
    assert "stage-1 trial (0.1, 0.3) failed after 1 epochs and is not ranked" in caplog.text
    (run_id,) = tracking.child_runs(uri, parent, 1).values()
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.metrics == {"tecm": 0.5}
    assert (run.data.params["bg"], run.data.params["fg"]) == ("0.1", "0.3")
    assert tracking.close_children(uri, parent) == 0  # not re-closed as a finished stop
    clean = tune.Result(metrics=result.metrics, checkpoint=None, error=None, path=str(tmp_path))
    assert _failure(clean, 1) is None
    early = tune.Result(metrics=None, checkpoint=None, error=result.error, path=str(tmp_path))
    with pytest.raises(UserError, match="failed before its first report: RuntimeError: CUDA "
                                        "out of memory"):
        _failure(early, 1)


@pytest.mark.slow
def test_oracle_measures_the_regret_over_every_finished_pair(ci_config, ci_prepared, tmp_path,
                                                             capsys):
    """--oracle: no early stopping, DeepLabv3+ on every finished non-degenerate pair, and the
    regret of each objective's (and GT proxy's) pick against the best of them all."""
    import os

    from tune.cli import main

    runs = tmp_path / "runs"
    runs.mkdir()
    os.symlink(ci_config.runtime.runs_root / "stores", runs / "stores")
    assert main(["search", "--config", "ci", "--space", "pairs", "--oracle",
                 "--set", "search.pairs=[[0.1, 0.35], [0.2, 0.45], [0.25, 0.25], [0.3, 0.5]]",
                 "--set", "name=oracle", "--set", "refine.irn.epochs=1",
                 "--set", "trial.subset=40", "--set", "segmentation.epochs=1",
                 "--set", f"data.root={ci_config.data.root}",
                 "--set", f"runtime.runs_root={runs}"]) == 0
    printed = capsys.readouterr().out
    folder = runs / "oracle"
    stage2 = pd.read_csv(folder / "stage2.csv")
    assert sorted(zip(stage2.bg, stage2.fg)) == [(0.1, 0.35), (0.2, 0.45), (0.3, 0.5)]
    selection = json.loads((folder / "selection.json").read_text())
    assert selection["regret_scope"] == "all" and selection["regret_pairs"] == 3
    best = stage2.val_miou.max()
    assert selection["regret_val_miou"] == pytest.approx(
        best - stage2.loc[stage2.objective.idxmax(), "val_miou"])
    evaluation = selection["evaluation"]
    assert {"tecm", "tecm_pooled", "pqs_avg", "miou_pseudo"} <= set(evaluation)
    for name, q in evaluation.items():
        pick = stage2.sort_values([name, "bg", "fg"], ascending=[False, True, True]).iloc[0]
        assert (q["pick"]["bg"], q["pick"]["fg"]) == (pick.bg, pick.fg)
        assert q["regret"] == pytest.approx(best - pick.val_miou)
        assert q["recall"]["3"] is True and q["recall"]["1"] == (q["regret"] == 0)
        assert q["uses_ground_truth"] == (name in ("pqs_avg", "pqs_pseudo", "miou_pseudo"))
    assert "all 3 finished pairs (oracle)" in printed and "how each ranking would" in printed


def test_history_keeps_the_last_report_of_an_epoch_run_twice():
    from ray import tune

    from tune.search import _history

    history = pd.DataFrame({"epoch": [1, 2, 3, 2], "training_iteration": [1, 2, 3, 2],
                            "objective": [0.5, 0.7, 0.6, 0.8], "tecm": [0.5, 0.7, 0.6, 0.8],
                            "bg": 0.1, "fg": 0.3, "trial_id": "t", "time_this_iter_s": 1.0,
                            "config/pair/bg": 0.1})  # epoch 2 re-run: last wins
    result = tune.Result(metrics=history.iloc[2].to_dict(), checkpoint=None, error=None,
                         path="", metrics_dataframe=history)
    epochs = _history(result)
    assert list(epochs.epoch) == [1, 2, 3] and list(epochs.objective) == [0.5, 0.8, 0.6]
    assert "time_this_iter_s" not in epochs and "config/pair/bg" not in epochs


def test_rank_epoch_ranks_by_the_last_or_the_best_epoch_and_stage2_uses_that_head(
        finished_search):
    """The trials table from Tune's own `ResultGrid` of a real search: one row per trial at its
    last epoch, or at the epoch with the best objective (the earliest on ties), with the
    number of epochs trained kept either way (what promotion checks)."""
    import numpy as np
    import torch
    from ray.tune import ExperimentAnalysis, ResultGrid

    from tune import tracking
    from tune.folder import load_state
    from tune.search import trials_table
    from tune.trainables import ranked_state

    state = load_state(finished_search)
    results = ResultGrid(ExperimentAnalysis(str(finished_search / "stage1")))
    runs = tracking.child_runs(state["tracking_uri"], state["parent_run_id"], 1)
    last, curves = trials_table(results, runs, "last")
    best, _ = trials_table(results, runs, "best")
    saved = pd.read_csv(finished_search / "stage1.csv")
    assert list(zip(last.bg, last.fg)) == list(zip(saved.bg, saved.fg))
    assert list(last.objective) == pytest.approx(list(saved.objective))
    assert set(last.mlflow_run_id) == set(runs.values()) and len(last) == 4
    assert len(curves) == last.training_iteration.sum()
    for trial_id, curve in curves.groupby("trial_id"):
        at_last = last[last.trial_id == trial_id].iloc[0]
        at_best = best[best.trial_id == trial_id].iloc[0]
        k = int(np.argmax(curve.objective.to_numpy()))  # the first maximum
        assert at_last.objective == curve.objective.iloc[-1]
        assert at_last.rank_epoch == curve.epoch.iloc[-1] == at_last.training_iteration
        assert at_best.objective == curve.objective.iloc[k]
        assert at_best.rank_epoch == curve.epoch.iloc[k]
        assert at_best.training_iteration == at_last.training_iteration
    state = {"refiner": {"w": torch.zeros(1)}, "epoch": 3,
             "best": {"epoch": 2, "objective": 0.8, "refiner": {"w": torch.ones(1)}}}
    assert ranked_state(state, "last")["refiner"]["w"].item() == 0
    assert ranked_state(state, "best")["refiner"]["w"].item() == 1


def test_a_running_search_locks_its_folder(tmp_path, capsys):
    """A second search into the folder of a running one is refused in one line naming the
    holder, before stage 0 (the first holds the lock for its whole run); once the holder ends,
    however it ends, the lock is free again."""
    import subprocess
    import sys

    from tune.cli import main

    runs = tmp_path / "runs"
    folder = runs / "twin"
    folder.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from tune.locking import held; "
         "ctx = held(Path(sys.argv[1]), 'x'); ctx.__enter__(); print('held', flush=True); "
         "time.sleep(60)", str(folder / ".search.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["search", "--config", "ci", "--set", "name=twin",
                     "--set", f"runtime.runs_root={runs}"]) == 2
        err = capsys.readouterr().err
        assert f"search folder {folder} is in use by pid {holder.pid}" in err
        assert not (folder / "search.json").exists() and not (runs / "stores").exists()
    finally:
        holder.kill()  # SIGKILL: no cleanup, the kernel drops the lock
        holder.wait()
    from tune.locking import held

    with held(folder / ".search.lock", "x"):
        pass


def test_an_interrupted_stage_2_selects_nothing(tmp_path):
    """Ctrl-C in stage 2 used to end in a 'selected' pair from half-trained DeepLabv3+ runs: a
    training that neither finished nor failed now stops the search with the resume command."""
    from ray import tune

    from tune.search import stage2_rows

    def result(bg: float, epochs_done: int) -> tune.Result:
        history = pd.DataFrame({"training_iteration": range(1, epochs_done + 1),
                                "epoch": range(1, epochs_done + 1), "bg": bg, "fg": 0.5,
                                "seg_loss": 0.3, "val_miou": 0.5})
        last = history.iloc[-1].to_dict()
        return tune.Result(metrics=last, checkpoint=None, error=None, path="",
                           metrics_dataframe=history)

    runs = {"pair-0.1-0.5": "r1"}
    rows, curves = stage2_rows([result(0.1, 6), result(0.2, 6)], 6, runs, tmp_path)
    assert list(rows.stage2_failed) == [0, 0] and len(curves) == 12
    assert rows.stage2_run_id[0] == "r1" and pd.isna(rows.stage2_run_id[1])
    with pytest.raises(UserError, match=rf"1 of 2 DeepLabv3\+ trainings unfinished .*nothing is "
                                        rf"selected.*--resume {tmp_path}"):
        stage2_rows([result(0.1, 6), result(0.2, 3)], 6, runs, tmp_path)


def test_an_unreachable_tracking_server_fails_in_seconds(tmp_path, capsys):
    """MLflow retries an unreachable server for minutes and ends in a traceback; the search
    asks the server's /health first and stops in one line, before stage 0."""
    import socket

    from tune.cli import main

    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["search", "--config", "ci", "--tracking-uri", f"http://127.0.0.1:{port}",
                 "--set", f"runtime.runs_root={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert f"--tracking-uri http://127.0.0.1:{port}: the MLflow server did not answer" in err
    assert not (tmp_path / "runs" / "ci").exists()
