"""Stop signals and kills at any point of a search: one line, exit 128 + signal, nothing left
RUNNING or running, nothing selected from unfinished stages, and a resume that ends as if the
search had never stopped (docs/search.md, "Stopping and resuming")."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from tune.schedulers import ResumableASHA


def _asha(tmp_path: Path) -> ResumableASHA:
    return ResumableASHA(tmp_path / "asha.pkl", time_attr="it", metric="m", mode="max",
                         max_t=4, grace_period=1, reduction_factor=2)


def _decide(scheduler, events):
    trials = {}
    out = []
    for trial_id, it, value in events:
        if trial_id not in trials:
            trials[trial_id] = SimpleNamespace(trial_id=trial_id)
            scheduler.on_trial_add(None, trials[trial_id])
        out.append(scheduler.on_trial_result(None, trials[trial_id], {"it": it, "m": value}))
    return out


EVENTS = [("a", 1, 0.9), ("a", 2, 0.9), ("b", 1, 0.5), ("c", 1, 0.95), ("c", 2, 0.2),
          ("d", 1, 0.1), ("d", 2, 0.1)]


def test_resumable_asha_decides_after_a_restore_as_without_one(tmp_path):
    """Tune restores the scheduler pickled when the Tuner was made (empty rungs): a plain ASHA
    then judges resumed trials against each other only; this one reloads its rungs, and repeats
    the decision it made for a report a resumed trial sends again."""
    for name in ("whole", "resumed"):
        (tmp_path / name).mkdir()
    whole = _decide(_asha(tmp_path / "whole"), EVENTS)
    assert "STOP" in whole  # the events exercise stopping
    fresh = _asha(tmp_path / "resumed")
    as_made = pickle.dumps(fresh)  # what tuner.pkl holds
    first = _decide(fresh, EVENTS[:4])
    restored = pickle.loads(as_made)
    again = _decide(restored, [EVENTS[3], *EVENTS[4:]])  # "c" re-sends its epoch 1
    assert first + again[1:] == whole and again[0] == first[3]
    plain = pickle.loads(as_made)
    plain._state_file = str(tmp_path / "none.pkl")  # nothing saved: what Tune's ASHA knows
    assert _decide(plain, EVENTS[4:]) != whole[4:]


def test_a_stage_killed_before_tune_recorded_it_starts_again(tmp_path):
    """Tune writes tuner.pkl a moment before its experiment state; restoring from the
    first alone failed for ever (KeyError 'bg')."""
    from tune.search import restorable

    stage = tmp_path / "stage1"
    stage.mkdir()
    (stage / "tuner.pkl").write_bytes(b"x")
    assert not restorable(stage) and not stage.exists()
    assert not restorable(stage)


def test_a_stage_recorded_by_another_version_is_a_one_line_error(tmp_path):
    """A stage whose pickles name a class this version no longer has (an older search's Tune
    callback) cannot be restored: said in one line, not as a traceback from Tune."""
    import pickle
    import types

    from tune.search import tuner_for
    from wsss.errors import UserError

    gone = types.ModuleType("wsss_tune_gone")

    class Callback:
        pass

    Callback.__module__, Callback.__qualname__ = gone.__name__, "Callback"
    gone.Callback = Callback
    sys.modules[gone.__name__] = gone
    try:
        blob = pickle.dumps({"callbacks": [Callback()]})
    finally:
        del sys.modules[gone.__name__]
    stage = tmp_path / "stage1"
    stage.mkdir()
    (stage / "tuner.pkl").write_bytes(blob)
    (stage / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    with pytest.raises(UserError, match=rf"{stage} was recorded by another version of "
                                        r"wsss-tune .*wsss_tune_gone.*new name"):
        tuner_for(stage, lambda config: None, {}, lambda: None, resume=True)



def _start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "tune.cli", *args], cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _signal_when(args, cwd: Path, ready, signum: int, limit: float = 300) -> tuple[int, str]:
    """Run ``wsss-tune ARGS`` in its own session (as a terminal or a scheduler would), send
    ``signum`` to its whole process group once ``ready(output)`` holds, and return its exit
    code and output, after checking that no process of the session outlives it."""
    log = cwd / f"run-{time.time_ns()}.log"
    proc = _start(args, cwd, log)
    deadline = time.time() + limit
    while not ready(log.read_text(errors="replace")):
        assert proc.poll() is None, f"ended before the signal:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, "the moment to signal never came"
        time.sleep(0.02)
    os.killpg(proc.pid, signum)
    code = proc.wait(timeout=120)
    for _ in range(30):  # Ray's idle workers notice a SIGKILLed raylet within seconds
        time.sleep(0.5)
        left = subprocess.run(["ps", "-eo", "sid=,args="], capture_output=True,
                              text=True).stdout
        alive = [line for line in left.splitlines()  # a <defunct> one is dead, not reaped
                 if line.split()[0] == str(proc.pid) and not line.endswith("<defunct>")]
        if not alive:
            break
    assert not alive, f"processes of the search outlived it: {alive}"
    return code, log.read_text(errors="replace")


def _statuses(folder: Path) -> dict[str, str]:
    from mlflow import MlflowClient

    state = json.loads((folder / "search.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    parent = client.get_run(state["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {"parent": parent.info.status,
            **{f"{c.data.tags['stage']}:{c.data.params['bg']}": c.info.status for c in children}}


def _epochs_logged(folder: Path) -> dict[str, list[int]]:
    """Each child run's logged steps of its per-epoch metric, by stage and pair."""
    from mlflow import MlflowClient

    state = json.loads((folder / "search.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    parent = client.get_run(state["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {f"{c.data.tags['stage']}:{c.data.params['bg']}": sorted(
        m.step for m in client.get_metric_history(
            c.info.run_id, "affinity_loss" if c.data.tags["stage"] == "1" else "seg_loss"))
        for c in children}


@pytest.mark.slow
def test_signals_and_kills_at_every_stage_then_resume_as_if_never_stopped(ci_config, ci_prepared,
                                                                          tmp_path):
    """The same ASHA search, uninterrupted and then stopped five times: SIGKILL right after
    Tune wrote tuner.pkl, Ctrl-C (SIGINT to the process group) as stage 0 / Ray start, SIGTERM
    to the group in stage 1, SIGINT in stage 2 and after selection; each resumed. Stage 1
    ends with the same epochs and objectives (ASHA decided alike) and the same pair is
    selected."""
    from tune.cli import main

    runs = tmp_path / "runs"
    runs.mkdir()
    os.symlink(ci_config.runtime.runs_root / "stores", runs / "stores")  # stage 0 cached
    pairs = "[[0.05,0.3],[0.1,0.35],[0.15,0.4],[0.2,0.45],[0.25,0.5]]"
    common = ["--space", "pairs", "--set", f"search.pairs={pairs}", "--set",
              "refine.irn.epochs=3", "--set", "trial.subset=40", "--set",
              "search.max_concurrent=1", "--set", "search.top_k=2", "--set",
              "segmentation.epochs=2", "--set", f"data.root={ci_config.data.root}",
              "--set", f"runtime.runs_root={runs}", "--set", "runtime.progress=true"]
    assert main(["search", "--config", "ci", "--set", "name=whole", *common]) == 0
    whole = pd.read_csv(runs / "whole" / "stage1.csv")
    assert (whole.training_iteration < 3).any()  # ASHA stopped something: a real check

    folder = runs / "paused"
    resume = ["search", "--resume", str(folder)]
    code, _ = _signal_when(["search", "--config", "ci", "--set", "name=paused", *common],
                           tmp_path, lambda _: (folder / "stage1" / "tuner.pkl").exists(),
                           signal.SIGKILL)
    assert code == -signal.SIGKILL
    steps = [(resume, "stage 0:", signal.SIGINT, "stage 0"),
             (resume, "[  2/5]", signal.SIGTERM, "stage 1"),
             (resume, "epoch  1/2", signal.SIGINT, "stage 2")]
    for args, moment, signum, stage in steps:
        code, out = _signal_when(args, tmp_path, lambda text: moment in text, signum)
        name = signal.Signals(signum).name
        assert code == 128 + signum, out
        last = out.strip().splitlines()[-1]
        # Ray start follows stage 0 within a second: either is where the signal lands
        assert last.startswith(f"wsss-tune: search paused interrupted ({name}) in "), out
        assert stage in last or (stage == "stage 0" and "stage 1" in last), last
        assert last.endswith(f"continue it with: wsss-tune search --resume {folder}")
        assert "Traceback" not in out and "selected" not in out.replace("nothing was sel", "")
        assert not (folder / "selection.json").exists()
        assert not (folder / "thresholds.yaml").exists()
        statuses = _statuses(folder)
        assert "RUNNING" not in statuses.values() and statuses["parent"] == "KILLED", statuses
    # after selection (while the report is written): the pair is chosen, the rest is said
    code, out = _signal_when(resume, tmp_path, lambda text: "writing the report" in text,
                             signal.SIGINT)
    last = out.strip().splitlines()[-1]
    assert code == 130 and last.startswith("wsss-tune: search paused interrupted (SIGINT) in "
                                           "report: its pair is selected"), out
    assert last.endswith(f"continue it with: wsss-tune search --resume {folder}")
    assert (folder / "selection.json").exists() and _statuses(folder)["parent"] == "KILLED"
    assert main(resume) == 0
    statuses = _statuses(folder)
    assert set(statuses.values()) == {"FINISHED"}, statuses
    assert _epochs_logged(folder) == _epochs_logged(runs / "whole")  # none twice after resumes
    stopped = pd.read_csv(folder / "stage1.csv")
    keys = ["bg", "fg", "training_iteration"]
    assert stopped[keys].equals(whole[keys])
    assert stopped.objective.to_numpy() == pytest.approx(whole.objective.to_numpy(), abs=1e-6)
    pick = json.loads((folder / "selection.json").read_text())["pair"]
    assert pick == json.loads((runs / "whole" / "selection.json").read_text())["pair"]
