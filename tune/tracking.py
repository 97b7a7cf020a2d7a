"""MLflow tracking: one parent run per search, one child run per trial (docs/search.md).

All searches share one store under the runs root (``sqlite:////abs/runs/mlflow.db``, always an
absolute URI) so the MLflow UI compares them; a cluster passes a tracking server URI instead.
The driver logs every trial's reports into its child run (`TrialRuns`, a Tune callback) with the
`MlflowClient` (no global active run), so trials on other nodes never call MLflow; a resumed
trial finds its run again by its key. `close_children` ends whatever a stopped search left
RUNNING.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS, DONE, EXPERIMENT_TAG, SHOULD_CHECKPOINT, TRIAL_ID

from tune.progress import pct
from tune.space import Pair
from wsss.errors import UserError, first_line
from wsss.objectives import OBJECTIVES

log = logging.getLogger("tune")

EXPERIMENT = "wsss-tune"
PACKAGES = ("wsss-tune", "torch", "timm", "ray", "mlflow", "optuna", "numpy",
            "segmentation-models-pytorch")


def default_uri(runs_root: Path) -> str:
    """The shared SQLite store of every search under ``runs_root`` (absolute)."""
    return f"sqlite:///{(runs_root / 'mlflow.db').resolve()}"


def tracking_problem(uri: str, timeout_s: float) -> str | None:
    """Why an MLflow API call to ``uri`` fails from here (None when it works). A real API call,
    not ``/health``: the server's host check exempts ``/health`` but refuses the trials' calls."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                             "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                      MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(timeout_s)))
    try:
        MlflowClient(uri).search_experiments(max_results=1)
        return None
    except Exception as e:  # any failure is the answer
        text = str(e)
        cause = re.search(r"Caused by \w+\(\"?(.*?)\"?\)\)?\s*$", text, re.S)
        first = (cause.group(1) if cause else text).strip().splitlines()
        return (first[0] if first else type(e).__name__)[:300]
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """A tracking server that does not answer within ``timeout_s`` is a `UserError` now: MLflow
    itself retries for minutes and then fails with a traceback. Local stores are not asked."""
    if not uri.startswith(("http://", "https://")):
        return
    problem = tracking_problem(uri, timeout_s)
    if problem is not None:
        raise UserError(f"--tracking-uri {uri}: the MLflow server did not answer ({problem}); "
                        f"start one (mlflow server --host 127.0.0.1 --port N) or drop the "
                        f"flag to use the runs root's SQLite store")


def artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside it (MLflow's default, ``./mlruns``, depends on
    the current directory); a tracking server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


# MLflow 3 opens an experiment in its GenAI (traces) view: the experiment's kind says "model
# training", and MLflow 3.17's UI, whose GenAI / Model training switch is remembered per browser,
# takes the view from the link (`run_url`)
TRAINING_VIEW = {"mlflow.experimentKind": "custom_model_development"}
TRAINING_VIEW_QUERY = "?workflowType=machine_learning"


def experiment_id(client: MlflowClient, uri: str) -> str:
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is None:
        return client.create_experiment(EXPERIMENT, artifact_location=artifact_root(uri),
                                        tags=TRAINING_VIEW)
    for key, value in TRAINING_VIEW.items():  # stores made before the tag existed
        if found.tags.get(key) != value:
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def run_url(uri: str, run_id: str, server: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI page of a run, in the model-training view: on ``uri`` itself for a tracking
    server, else on ``server`` (where ``mlflow ui`` listens by default)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else server
    experiment = MlflowClient(uri).get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{experiment}/runs/{run_id}{TRAINING_VIEW_QUERY}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Config -> MLflow params (``classifier.epochs``); floats rounded so 0.1 + 0.2 logs 0.3."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(round(value, 6) if isinstance(value, float) else value)[:6000]
    return out


def provenance(seeds: dict[str, int], config_hash: str) -> dict[str, str]:
    """What a paper needs to reproduce a search: code version, packages, seeds, config hash."""
    tags = {"config_hash": config_hash, **{f"seed.{k}": str(v) for k, v in seeds.items()}}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10)
        tags["git_commit"] = commit.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        tags["git_commit"] = "unknown"
    for pkg in PACKAGES:
        try:
            tags[f"version.{pkg}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            tags[f"version.{pkg}"] = "absent"
    return tags


def start_parent(uri: str, name: str, config: dict[str, Any], tags: dict[str, str]) -> str:
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(client, uri), run_name=name,
                            tags={"search": name, "role": "search", **tags})
    params = [Param(k, v) for k, v in flatten(config).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    return run.info.run_id


def reopen(uri: str, run_id: str) -> None:
    """Mark a resumed search's parent run RUNNING again."""
    MlflowClient(uri).update_run(run_id, status="RUNNING")


def start_child(uri: str, parent_id: str, stage: int, trial_id: str, bg: float,
                fg: float) -> str:
    """The child run of one trial, keyed by its Tune trial id: a trial restarted after a
    crash (before its first checkpoint) finds its run again instead of duplicating it."""
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    existing = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}' and "
                                  f"tags.trial_id = '{trial_id}' and tags.stage = '{stage}'")
    if existing:  # a finished run stays finished (a restored trial may have nothing to do)
        run = existing[0]
        if run.info.status != "FINISHED":
            client.update_run(run.info.run_id, status="RUNNING")
            if "interrupted" in run.data.tags:  # it goes on now
                client.delete_tag(run.info.run_id, "interrupted")
        return run.info.run_id
    run = client.create_run(parent.info.experiment_id, run_name=f"bg={bg:g} fg={fg:g}",
                            tags={"mlflow.parentRunId": parent_id, "stage": str(stage),
                                  "trial_id": trial_id,
                                  "search": parent.data.tags.get("search", "")})
    client.log_batch(run.info.run_id, params=[Param("bg", f"{bg:g}"), Param("fg", f"{fg:g}")])
    return run.info.run_id


def logged_steps(uri: str, run_id: str, key: str = "objective") -> set[int]:
    """Steps already logged: a trial restarted after a crash re-runs epochs that reached MLflow
    but not a durable checkpoint; training is deterministic, so they are not logged twice."""
    return {m.step for m in MlflowClient(uri).get_metric_history(run_id, key)}


def log_epoch(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    MlflowClient(uri).log_batch(run_id, metrics=[
        Metric(k, float(v), now, step) for k, v in metrics.items()
        if isinstance(v, (int, float)) and v == v])  # NaN (undefined mIoU) is not logged


def finish(uri: str, run_id: str, status: str = "FINISHED", **tags: str) -> None:
    client = MlflowClient(uri)
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.set_terminated(run_id, status)


def close_children(uri: str, parent_id: str) -> int:
    """End the child runs a search leaves RUNNING when it stops before its trials end (an
    interrupt, an error): KILLED with ``interrupted=true``, which ``--resume`` reopens. Trials
    that end on their own close their runs (`TrialRuns`). Returns how many."""
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    running = client.search_runs([parent.info.experiment_id],
                                 f"tags.mlflow.parentRunId = '{parent_id}' "
                                 f"and attributes.status = 'RUNNING'")
    for run in running:
        finish(uri, run.info.run_id, "KILLED", interrupted="true")
    return len(running)


def log_artifacts(uri: str, run_id: str, paths: list[Path]) -> None:
    client = MlflowClient(uri)
    for path in paths:
        if path.exists():
            client.log_artifact(run_id, str(path))


def log_folder(uri: str, run_id: str, folder: Path, name: str) -> None:
    """A folder's files as the run's artifacts under ``name/``."""
    MlflowClient(uri).log_artifacts(run_id, str(folder), name)


def child_runs(uri: str, parent_id: str, stage: int) -> dict[str, str]:
    """A stage's child runs by the key they were started with (`start_child`'s ``trial_id``)."""
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent_id}' and "
                              f"tags.stage = '{stage}'", max_results=50000)
    return {r.data.tags["trial_id"]: r.info.run_id for r in runs}


def stage2_key(pair: Pair) -> str:
    """A DeepLabv3+ training's run key: its pair (a stage 2 restarted from scratch has new
    Tune trial ids but must find the same runs)."""
    return f"pair-{pair.bg:g}-{pair.fg:g}"


# what Tune adds to every report; the rest of a report is the trial's own metrics
NOT_LOGGED = frozenset({*AUTO_RESULT_KEYS, DONE, SHOULD_CHECKPOINT, TRIAL_ID, EXPERIMENT_TAG,
                        "bg", "fg", "epoch"})


class TrialRuns(Callback):
    """Every trial's MLflow child run, kept from the driver: trials need no MLflow access.

    A run is found or started when its trial starts (keyed by Tune's trial id in stage 1, by
    the pair in stage 2, so a resumed search reopens it), each report is logged at its
    ``epoch`` unless that step is already there (a trial resumed from an earlier checkpoint
    re-reports epochs; training is deterministic), and the run ends FINISHED at the last epoch,
    FINISHED with ``stopped_early=true`` when ASHA stops the trial, FAILED when it fails. The
    runs an interrupt leaves RUNNING are closed by `close_children`.
    """

    def __init__(self, uri: str, parent_id: str, stage: int, reports: int) -> None:
        self.uri, self.parent_id, self.stage, self.reports = uri, parent_id, stage, reports
        self._runs: dict[str, str] = {}  # Tune trial id -> run id
        self._logged: dict[str, set[int]] = {}

    def _run(self, trial: Any) -> str:
        if trial.trial_id not in self._runs:
            config = trial.config if self.stage == 1 else trial.config["candidate"]
            pair = Pair.of(config)
            key = trial.trial_id if self.stage == 1 else stage2_key(pair)
            run_id = start_child(self.uri, self.parent_id, self.stage, key, pair.bg, pair.fg)
            self._runs[trial.trial_id] = run_id
            self._logged[trial.trial_id] = logged_steps(
                self.uri, run_id, "objective" if self.stage == 1 else "seg_loss")
        return self._runs[trial.trial_id]

    @contextlib.contextmanager
    def _kept_going(self, trial: Any, what: str) -> Iterator[None]:
        """An MLflow failure (a locked SQLite file, a server that went away) costs that record,
        not the stage: Tune would end every trial on an error in a callback. The run is looked
        up again at the trial's next event; the search's own tables have every epoch."""
        try:
            yield
        except (MlflowException, OSError) as e:
            self._runs.pop(trial.trial_id, None)
            log.warning("MLflow: %s of stage-%d trial %s not recorded (%s); the search goes on",
                        what, self.stage, trial.trial_id, first_line(e))

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._kept_going(trial, "the start"):
            self._run(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        epoch = int(result["epoch"])
        with self._kept_going(trial, f"epoch {epoch}"):
            run_id = self._run(trial)
            if epoch not in self._logged[trial.trial_id]:
                skip = NOT_LOGGED | (OBJECTIVES.keys() if result.get("degenerate") else set())
                log_epoch(self.uri, run_id, {k: v for k, v in result.items() if k not in skip
                                             and not isinstance(v, bool)}, epoch)
                self._logged[trial.trial_id].add(epoch)
            if epoch >= self.reports:
                finish(self.uri, run_id,
                       **({"stopped_early": "false"} if self.stage == 1 else {}))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        if self.stage == 1 and result.get("epoch", 0) < self.reports:  # ASHA stopped it
            with self._kept_going(trial, "the early stop"):
                finish(self.uri, self._run(trial), stopped_early="true")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._kept_going(trial, "the failure"):
            finish(self.uri, self._run(trial), "FAILED")




def selection_note(selection: dict[str, Any]) -> str:
    """The parent run's description (Markdown): the pick, its rule and its evidence."""
    pair, m, name = selection["pair"], selection["metrics"], selection["objective"]
    rule = (f"the best {name} among the promoted pairs (no ground truth used)"
            if selection["pick"] == "objective" else "the best val mIoU (uses ground truth)")
    lines = [f"**Selected (BG, FG) = ({pair['bg']:g}, {pair['fg']:g})**, by {rule}; "
             f"each pair ranked by its {selection['rank_epoch']} epoch's {name}.",
             "", f"- {name}: {m.get('objective', float('nan')):.4f}",
             f"- PQS (avg of initial and pseudo-label): {pct(m.get('pqs_avg'))}",
             f"- val mIoU (DeepLabv3+): {pct(m.get('val_miou'))}"]
    if "regret_val_miou" in selection:
        scope = ("all finished pairs (oracle)" if selection["regret_scope"] == "all"
                 else "the promoted candidates only, not all searched pairs")
        lines.append(f"- regret of the pick: {100 * selection['regret_val_miou']:.2f} points "
                     f"of val mIoU, against {selection['regret_pairs']} pairs: {scope}")
    lines += ["", f"Child runs: sort by `ranked_{name}` (descending) to rank the pairs as the "
              "search did; tag `selected = true` marks the pick's runs, `promoted = true` the "
              "pairs trained in stage 2, whose stage-1 runs also hold `val_miou`. The `report/` "
              "artifacts hold the heatmaps, statistics and sample pseudo-labels."]
    return "\n".join(lines)


def record_selection(uri: str, parent_id: str, selection: dict[str, Any], table: pd.DataFrame,
                     candidates: pd.DataFrame, ranked: pd.DataFrame) -> None:
    """Make the selection visible in MLflow: the parent run gets the pick's numbers, tags and a
    description; every ranked stage-1 run ``ranked_<objective>`` (its ranking value; stopped,
    failed and degenerate trials none, so sorting by it puts the pick of the objective first);
    promoted stage-1 runs their stage-2 ``val_miou``; the pick's runs ``selected = true``."""
    client = MlflowClient(uri)
    pair, name, now = selection["pair"], selection["objective"], int(time.time() * 1000)
    chosen = (table.bg == pair["bg"]) & (table.fg == pair["fg"])
    for row in ranked.itertuples():
        client.log_batch(row.mlflow_run_id, metrics=[
            Metric(f"ranked_{name}", float(row.objective), now, 0)])
    for row in candidates.itertuples():
        val = getattr(row, "val_miou", float("nan"))
        client.log_batch(row.mlflow_run_id, tags=[RunTag("promoted", "true")], metrics=[
            Metric("val_miou", float(val), now, 0)] if val == val else [])
    selected = [*table.loc[chosen, "mlflow_run_id"]]
    if "stage2_run_id" in candidates:
        at = (candidates.bg == pair["bg"]) & (candidates.fg == pair["fg"])
        selected += [r for r in candidates.loc[at, "stage2_run_id"] if isinstance(r, str)]
    for run_id in selected:
        client.set_tag(run_id, "selected", "true")
    m = selection["metrics"]
    metrics = {"selected_bg": pair["bg"], "selected_fg": pair["fg"],
               f"selected_{name}": m.get("objective"), "selected_pqs_avg": m.get("pqs_avg"),
               "selected_val_miou": m.get("val_miou"),
               "regret_val_miou": selection.get("regret_val_miou")}
    for proxy, quality in selection.get("evaluation", {}).items():
        metrics[f"oracle_regret_{proxy}"] = quality["regret"]
        metrics.update({f"oracle_recall{k}_{proxy}": float(v)
                        for k, v in quality["recall"].items()})
    client.log_batch(parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()
                                         if v is not None and v == v], tags=[
        RunTag("selected_pair", f"({pair['bg']:g}, {pair['fg']:g})"),
        RunTag("selection_rule", f"{selection['pick']}:{name}:{selection['rank_epoch']}"),
        RunTag("mlflow.note.content", selection_note(selection))])
