"""MLflow tracking: one parent run per search, one child run per trial (DESIGN §1, §6).

All searches share one store under the runs root (``sqlite:////abs/runs/mlflow.db``, always an
absolute URI) so the MLflow UI compares them; a cluster passes a tracking server URI instead.
Trials log from their own worker with the `MlflowClient` (no global active run: reused Ray actors
run many trials) under the parent's id, and keep their run id in their checkpoint so a resumed
trial logs into the same run. `close_children` ends whatever a stopped trial left RUNNING.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag

EXPERIMENT = "wsss-tune"
PACKAGES = ("wsss-tune", "torch", "timm", "ray", "mlflow", "optuna", "numpy",
            "segmentation-models-pytorch")


def default_uri(runs_root: Path) -> str:
    """The shared SQLite store of every search under ``runs_root`` (absolute)."""
    return f"sqlite:///{(runs_root / 'mlflow.db').resolve()}"


def artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside it (MLflow's default, ``./mlruns``, depends on
    the current directory); a tracking server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def experiment_id(client: MlflowClient, uri: str) -> str:
    found = client.get_experiment_by_name(EXPERIMENT)
    if found:
        return found.experiment_id
    return client.create_experiment(EXPERIMENT, artifact_location=artifact_root(uri))


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
        if existing[0].info.status != "FINISHED":
            client.update_run(existing[0].info.run_id, status="RUNNING")
        return existing[0].info.run_id
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
    """End child runs still RUNNING (trials stopped early by ASHA end without a word): FINISHED
    with ``stopped_early=true``. Returns how many were closed."""
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    running = client.search_runs([parent.info.experiment_id],
                                 f"tags.mlflow.parentRunId = '{parent_id}' "
                                 f"and attributes.status = 'RUNNING'")
    for run in running:
        finish(uri, run.info.run_id, RunStatus.to_string(RunStatus.FINISHED),
               stopped_early="true")
    return len(running)


def log_artifacts(uri: str, run_id: str, paths: list[Path]) -> None:
    client = MlflowClient(uri)
    for path in paths:
        if path.exists():
            client.log_artifact(run_id, str(path))
