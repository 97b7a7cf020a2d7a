"""Ray Tune function trainables. Stage 1: one (BG, FG) trial reporting after every epoch;
stage 2: DeepLabv3+ on a promoted pair's pseudo-labels, reporting after every epoch.

Workers reopen the stages' memory-mapped stores from their paths (every node must read the same
path); nothing large travels through Ray's object store. A checkpoint per report (the
refiner's state, the epoch) lets Tune resume a trial where it stopped instead of retraining it.
Trials do not talk to MLflow: the driver logs their reports (`tune.tracking.TrialRuns`).
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ray import tune

from tune.space import Pair
from wsss.objectives import driving_value
from wsss.refine import RefineSpec
from wsss.segmentation import SegmentationSpec, build_model, train_segmentation
from wsss.stage0 import Prepared, PreparedRef, TrialSpec
from wsss.trial import Trial, run_trial

CHECKPOINT_FILE = "trial.pt"


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a stage shares: where its inputs are, its specs and its budget."""

    inputs: PreparedRef
    trial: TrialSpec
    refine: RefineSpec
    objective: str
    rank_epoch: str
    threads: int
    device: str
    segmentation: SegmentationSpec | None = None  # stage 2 only

    def open(self) -> Prepared:
        """The trial inputs, opened once per worker process (actors are reused)."""
        return _open_cached(self.inputs)

    def new_trial(self, prepared: Prepared, pair: Pair) -> Trial:
        return Trial(prepared, self.trial, self.refine, pair.bg, pair.fg, device=self.device)


_open_cached = functools.lru_cache(maxsize=2)(Prepared.open)


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


def stage1(config: dict[str, Any], context: TrialContext) -> None:
    """Train and score one pair, reporting every epoch. ``objective`` is the registered
    objective that drives the search, except for a degenerate pair (no neutral pixel), which
    reports 0 so that neither ASHA nor the sampler favours it; its honest ``tecm`` is logged."""
    torch.set_num_threads(context.threads)
    pair = Pair.of(config)
    trial = context.new_trial(context.open(), pair)
    keep_best = context.rank_epoch == "best"
    best: dict[str, Any] | None = None  # the best epoch so far: its objective and refiner
    if (state := _restored()) is not None:  # same weights and epoch
        trial.load_state_dict(state)
        best = state.get("best")
    for metrics in run_trial(trial):
        objective = driving_value(metrics, context.objective)
        if keep_best and (best is None or objective > best["objective"]):  # ties: earlier
            best = {"epoch": metrics["epoch"], "objective": objective,
                    "refiner": _on_cpu(trial.refiner.state_dict())}
        _report({**metrics, **pair._asdict(), "objective": objective},
                {**trial.state_dict(), "best": best})


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


def restored_trial(prepared: Prepared, specs: tuple[TrialSpec, RefineSpec], pair: Pair,
                   checkpoint: Path, rank_epoch: str, device: str) -> Trial:
    """A searched pair's trial rebuilt from its stage-1 checkpoint, with the refiner it was
    ranked by: what stage 2, label export and the report refine with."""
    trial = Trial(prepared, *specs, pair.bg, pair.fg, device=device)
    trial.load_state_dict(ranked_state(read_checkpoint(checkpoint), rank_epoch))
    return trial


def stage2(config: dict[str, Any], context: TrialContext) -> None:
    """One promoted pair: its stage-1 refiner makes pseudo-labels for the whole train split
    (frozen features computed on the fly), then DeepLabv3+ trains on them (255 ignored),
    reporting ``val_miou`` and checkpointing after every epoch, so a killed search resumes a
    long training where it stopped."""
    torch.set_num_threads(context.threads)
    prepared, seg = context.open(), context.segmentation
    candidate = config["candidate"]
    pair = Pair.of(candidate)
    resume = _restored()
    if resume is not None and resume["epoch"] >= seg.epochs:  # killed after its last report
        tune.report({**resume["metrics"], **pair._asdict(), "epoch": resume["epoch"]})
        return
    whole = prepared.whole_split(context.trial, context.refine.needs_features, context.device)
    trial = restored_trial(whole, (context.trial, context.refine), pair,
                           Path(candidate["checkpoint"]), context.rank_epoch, context.device)
    labels = dict(trial.pseudo_labels())
    model = build_model(seg, prepared.train.num_classes)
    ids = prepared.train.ids

    def on_epoch(epoch: int, metrics: dict[str, float], state: dict[str, Any]) -> None:
        _report({**metrics, **pair._asdict(), "epoch": epoch}, {**state, "metrics": metrics})

    train_segmentation(model, prepared.train, lambda i: labels[ids[i]], seg, context.device,
                       val=prepared.val, on_epoch=on_epoch, resume=resume)
