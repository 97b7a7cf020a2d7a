"""Ray Tune function trainables. Stage 1: one (BG, FG) trial reporting after every epoch.

Workers reopen the stages' memory-mapped stores from their paths (every node must read the same
path); nothing large travels through Ray's object store. A checkpoint per report (the
refiner's state, the epoch) lets Tune resume a trial where it stopped instead of retraining it.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from ray import tune

from tune import tracking
from wsss.data import DataSpec
from wsss.objectives import OBJECTIVES, driving_value
from wsss.refine import RefineSpec
from wsss.segmentation import SegmentationSpec, build_model, train_segmentation
from wsss.stage0 import Prepared, TrialSpec
from wsss.trial import Trial, run_trial

CHECKPOINT_FILE = "trial.pt"


STORE_KEYS = ("data", "trial", "refine", "cams", "features", "classifier")
Specs = tuple[TrialSpec, RefineSpec]


def trial_context(data: DataSpec, specs: Specs, prepared: Prepared, objective: str,
                  rank_epoch: str, threads: int, tracking_uri: str, parent_run_id: str,
                  device: str) -> dict[str, Any]:
    """The small, JSON-able description a worker needs to rebuild a trial's inputs."""
    classifier, features = prepared.classifier_path, prepared.features
    return {"data": data.model_dump(mode="json"), "trial": specs[0].model_dump(mode="json"),
            "refine": specs[1].model_dump(mode="json"), "cams": str(prepared.cams.path),
            "features": None if features is None else str(features.path),
            "classifier": None if classifier is None else str(classifier),
            "objective": objective, "rank_epoch": rank_epoch, "threads": threads,
            "tracking_uri": tracking_uri,
            "parent_run_id": parent_run_id, "device": device}


def _open(context: dict[str, Any]) -> tuple[Prepared, Specs]:
    """The trial inputs named by ``context`` (only its store keys matter for the cache)."""
    return _open_cached(json.dumps({k: context[k] for k in STORE_KEYS}, sort_keys=True))


@functools.lru_cache(maxsize=2)
def _open_cached(context_json: str) -> tuple[Prepared, Specs]:
    """Per worker process (actors are reused): open the stores once, not once per trial."""
    ctx = json.loads(context_json)
    data = DataSpec.model_validate(ctx["data"])
    trial = TrialSpec.model_validate(ctx["trial"])
    classifier = None if ctx["classifier"] is None else Path(ctx["classifier"])
    features = None if ctx["features"] is None else Path(ctx["features"])
    return (Prepared.open(data, Path(ctx["cams"]), features, classifier, trial.subset),
            (trial, RefineSpec.model_validate(ctx["refine"])))


def pair_of(config: dict[str, Any]) -> tuple[float, float]:
    """(BG, FG) from a grid config (``pair``) or a sampled one (``bg``, ``fg``)."""
    if "pair" in config:
        bg, fg = config["pair"]
    else:
        bg, fg = config["bg"], config["fg"]
    return float(bg), float(fg)


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """A trial's saved state, its tensors on the CPU (the trial or tool reading it may have no
    GPU even where the trial that wrote it had one)."""
    return torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


def _restored() -> dict[str, Any] | None:
    """The state of the checkpoint Tune restored this trial from, if any."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return read_checkpoint(Path(folder))


def _report(metrics: dict[str, Any], state: dict[str, Any]) -> None:
    """One report to Tune with a checkpoint of ``state`` (what a resumed trial continues from)."""
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, Path(folder) / CHECKPOINT_FILE)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def stage1(config: dict[str, Any], context: dict[str, Any]) -> None:
    """Train and score one pair, reporting every epoch. ``objective`` is the registered
    objective that drives the search, except for a degenerate pair (no neutral pixel), which
    reports 0 so that neither ASHA nor the sampler favours it; its honest ``tecm`` is logged."""
    torch.set_num_threads(context["threads"])
    prepared, specs = _open(context)
    bg, fg = pair_of(config)
    uri = context["tracking_uri"]
    trial = Trial(prepared, *specs, bg, fg, device=context["device"])
    run_id = tracking.start_child(uri, context["parent_run_id"], 1,
                                  tune.get_context().get_trial_id(), bg, fg)
    logged = tracking.logged_steps(uri, run_id)
    keep_best = context["rank_epoch"] == "best"
    best: dict[str, Any] | None = None  # the best epoch so far: its objective and refiner
    if (state := _restored()) is not None:  # same weights and epoch (and the same MLflow run)
        trial.load_state_dict(state)
        best = state.get("best")
    for metrics in run_trial(trial):
        objective = driving_value(metrics, context["objective"])
        report = {**metrics, "bg": bg, "fg": fg, "objective": objective}
        if keep_best and (best is None or objective > best["objective"]):  # ties: earlier
            best = {"epoch": metrics["epoch"], "objective": objective,
                    "refiner": _on_cpu(trial.refiner.state_dict())}
        if metrics["epoch"] not in logged:  # a degenerate pair's objectives are undefined
            skip = {"bg", "fg", "epoch", *(OBJECTIVES if metrics["degenerate"] else ())}
            tracking.log_epoch(uri, run_id, {k: v for k, v in report.items() if k not in skip},
                               metrics["epoch"])
        if metrics["epoch"] == trial.reports:  # before the last report: Tune may end us there
            tracking.finish(uri, run_id, stopped_early="false")
        _report({**report, "mlflow_run_id": run_id}, {**trial.state_dict(), "best": best})


def _on_cpu(state: Any) -> Any:
    """A copy of a (nested) state dict with its tensors on the CPU."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().clone()
    if isinstance(state, dict):
        return {k: _on_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_on_cpu(v) for v in state)
    return state


def ranked_state(state: dict[str, Any], rank_epoch: str) -> dict[str, Any]:
    """A stage-1 checkpoint as the trial state a ranked pair is judged by: the last epoch's,
    or (``rank_epoch: best``) the refiner of the epoch with the best objective."""
    if rank_epoch == "best" and state.get("best") is not None:
        return {**state, "refiner": state["best"]["refiner"]}
    return state


def restored_trial(prepared: Prepared, specs: Specs, bg: float, fg: float,
                   checkpoint: Path, rank_epoch: str, device: str) -> Trial:
    """A searched pair's trial rebuilt from its stage-1 checkpoint, with the refiner it was
    ranked by: what stage 2, label export and the report refine with."""
    trial = Trial(prepared, *specs, bg, fg, device=device)
    trial.load_state_dict(ranked_state(read_checkpoint(checkpoint), rank_epoch))
    return trial


def stage2(config: dict[str, Any], context: dict[str, Any]) -> None:
    """One promoted pair: its stage-1 refiner makes pseudo-labels for the whole train split
    (frozen features computed on the fly), then DeepLabv3+ trains on them (255 ignored),
    reporting ``val_miou`` and checkpointing after every epoch, so a killed search resumes a
    long training where it stopped. Its MLflow run is keyed by the pair: a stage 2 restarted
    from scratch finds the same run instead of duplicating it."""
    torch.set_num_threads(context["threads"])
    prepared, specs = _open(context)
    device = context["device"]
    candidate = config["candidate"]
    bg, fg = float(candidate["bg"]), float(candidate["fg"])
    uri = context["tracking_uri"]
    run_id = tracking.start_child(uri, context["parent_run_id"], 2, f"pair-{bg:g}-{fg:g}", bg, fg)
    seg = SegmentationSpec.model_validate(context["segmentation"])
    resume = _restored()
    if resume is not None and resume["epoch"] >= seg.epochs:  # killed after its last report
        tune.report({**resume["metrics"], "bg": bg, "fg": fg, "mlflow_run_id": run_id})
        return
    whole = prepared.whole_split(specs[0], specs[1].needs_features, device)
    trial = restored_trial(whole, specs, bg, fg,
                           Path(candidate["checkpoint"]), context["rank_epoch"], device)
    labels = dict(trial.pseudo_labels())
    data = DataSpec.model_validate(context["data"])
    val = data.open("val") if data.has_split("val") else None
    model = build_model(seg, prepared.train.num_classes)
    ids = prepared.train.ids
    logged = tracking.logged_steps(uri, run_id, "seg_loss")

    def on_epoch(epoch: int, metrics: dict[str, float], state: dict[str, Any]) -> None:
        if epoch not in logged:
            tracking.log_epoch(uri, run_id, metrics, epoch)
        if epoch == seg.epochs:
            tracking.finish(uri, run_id)
        _report({**metrics, "bg": bg, "fg": fg, "mlflow_run_id": run_id},
                {**state, "metrics": metrics})

    train_segmentation(model, prepared.train, lambda i: labels[ids[i]], seg, device, val=val,
                       on_epoch=on_epoch, resume=resume)
