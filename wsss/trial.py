"""One (BG, FG) trial, whatever the refiner: regions, refinement, pseudo-labels, every metric.

The refiner (``refine.method``, `wsss.refine`) turns the pair's confident regions and CAMs into
refined scores, training first when it trains; this module scores them all the same way, so the
objectives stay refiner-agnostic. State (the refiner's, and the epoch) round-trips through
`Trial.state_dict`, so a search can checkpoint after any report and resume. Deterministic for a
seed on CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from wsss.devices import resolve_device
from wsss.errors import UserError
from wsss.metrics import COUNTS, Transitions, confusion, region_metrics, transition_counts
from wsss.objectives import all_objectives
from wsss.pseudo_labels import pseudo_labels
from wsss.refine import RefineSpec, TrialImages, create_refiner
from wsss.regions import host
from wsss.stage0 import Prepared, TrialSpec

log = logging.getLogger("wsss")


class Trial:
    """A refiner bound to one pair's trial images; `step` trains an epoch (if the refiner
    trains) and evaluates. ``reports`` steps make the whole trial."""

    def __init__(self, prepared: Prepared, trial: TrialSpec, refine: RefineSpec, bg: float,
                 fg: float, *, device: str | torch.device = "cpu"):
        if refine.needs_features and prepared.features is None:
            raise ValueError(f"refine.method {refine.method} trains on frozen features, but "
                             f"these inputs have none: prepare them with features=True")
        self.images = TrialImages(prepared, bg, fg, resolve_device(device), trial.seed)
        self.bg, self.fg = self.images.bg, self.images.fg
        self.refiner = create_refiner(refine, self.images)
        self.reports = refine.reports
        self.epoch = 0  # steps done: training epochs, or the one evaluation of a crf trial
        self.batch_size = getattr(refine.section, "batch_size", 16)
        self._conf_initial: np.ndarray | None = None

    def step(self) -> dict[str, float]:
        """One report: an epoch of training (when the refiner trains), then every metric."""
        loss = {}
        if self.refiner.epochs:
            loss = {"affinity_loss": self.refiner.train_epoch(self.epoch)}
        self.epoch += 1
        metrics = {"epoch": self.epoch, **loss, **self.evaluate()}
        if self.epoch == 1 and self.images.device.type == "cuda" and self.refiner.epochs:
            kept = len(self.images.resident_features)
            log.info("trial (%g, %g): frozen features of %d of %d images resident on %s%s",
                     self.bg, self.fg, kept, len(self.images), self.images.device,
                     "" if kept == len(self.images) else "; the rest copied from pinned memory")
        return metrics

    def _refined(self, only: Sequence[int] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (trial image, pseudo-labels at image resolution, on the device) for every
        trial image, or for the trial images ``only`` (a report's few samples need not refine
        the whole subset)."""
        images = self.images
        chosen = range(len(images)) if only is None else [int(k) for k in only]
        for batch in images.batches(chosen, self.batch_size):
            for k, refined in zip(batch, self.refiner.refine(batch), strict=True):
                yield k, pseudo_labels(refined.to(images.device), images.keys(k),
                                       images.image_size(k), self.bg, self.fg)

    def evaluate(self) -> dict[str, float]:
        """The trial's metrics (names as in docs/definitions.md) over its images, pooled where
        pooled; those that need ground truth only where the train split has masks. Counted on
        the trial's device; the totals cross to the host once."""
        train, device = self.images.prepared.train, self.images.device
        c = train.num_classes
        first = self._conf_initial is None  # the initial regions' confusion never changes
        zeros = torch.zeros((c, c + 1), dtype=torch.int64, device=device)
        agreement, conf_i, conf_p = zeros.clone(), zeros.clone(), zeros.clone()
        rows = []
        for k, pseudo in self._refined():
            initial, gt = self.images.initial_and_truth(k)
            rows.append(transition_counts(initial, pseudo))
            agreement += confusion(pseudo, initial, c, validate=False)
            if gt is not None:
                if first:
                    conf_i += confusion(initial, gt, c, validate=False)
                conf_p += confusion(pseudo, gt, c, validate=False)
        per_image = torch.stack(rows)
        totals = host(torch.cat([per_image.reshape(-1), agreement.reshape(-1),
                                 conf_i.reshape(-1), conf_p.reshape(-1)]))
        n = per_image.numel()
        per_image, rest = totals[:n].reshape(-1, len(COUNTS)), totals[n:].reshape(3, c, c + 1)
        if first:
            self._conf_initial = rest[1]
        t = Transitions(per_image, rest[0])
        pixels = int(t["n_pixels"].sum())
        degenerate = not t["neutral_initial"].any()
        initial = region_metrics(self._conf_initial, pixels, int(t["neutral_initial"].sum()))
        pseudo = region_metrics(rest[2], pixels, int(t["neutral_refined"].sum()))
        unsupervised = {
            **all_objectives(t), "degenerate": float(degenerate),
            "npr_initial": initial["npr"], "npr_pseudo": pseudo["npr"],
            "n_to_b": float(t["n_to_b"].sum() / pixels),
            "n_to_f": float(t["n_to_f"].sum() / pixels)}
        if not train.has_masks:
            return unsupervised
        return {
            **unsupervised,
            "miou_nn_initial": initial["miou_nn"], "miou_nn_pseudo": pseudo["miou_nn"],
            "pqs_initial": initial["pqs"], "pqs_pseudo": pseudo["pqs"],
            "pqs_avg": (initial["pqs"] + pseudo["pqs"]) / 2, "miou_pseudo": pseudo["miou"],
        }

    def pseudo_labels(self, only: Sequence[int] | None = None):
        """Yield (image id, uint8 pseudo-label map, numpy) for every trial image (or those
        ``only``)."""
        for k, pseudo in self._refined(only):
            yield self.images.ids[k], host(pseudo)

    def state_dict(self) -> dict[str, Any]:
        return {"refiner": self.refiner.state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "refiner" not in state:  # an edge head saved before refiners were pluggable
            raise UserError("this trial checkpoint was written by an earlier wsss-tune (no "
                            "refiner state in it): run the search again instead of resuming it")
        self.refiner.load_state_dict(state["refiner"])
        self.epoch = int(state["epoch"])


def run_trial(trial: Trial) -> Iterator[dict[str, float]]:
    """Yield the metrics after each step until the trial is complete (what a Ray trainable
    reports for early stopping): ``{"epoch", "affinity_loss", "tecm", ...}``. A trial restored
    from a state continues where it stopped."""
    while trial.epoch < trial.reports:
        yield trial.step()
