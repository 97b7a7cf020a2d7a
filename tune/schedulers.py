"""Early stopping that survives a resume.

Ray Tune pickles the scheduler once, when the `Tuner` is made, and never saves its state again:
a restored ASHA starts with empty rungs and judges the resumed trials only against each other,
so it stops pairs an uninterrupted search would have kept. `ResumableASHA` keeps its rungs in a
file beside Tune's experiment state (docs/search.md, "Stopping and resuming").
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler

from wsss.files import atomic_write_bytes


class ResumableASHA(ASHAScheduler):
    """ASHA that writes its rungs and decisions to ``state_file`` after every result, reads
    them back when a restored Tuner adds its first trial, and repeats the decision it made
    for a (trial, iteration) that a resumed trial reports again (a trial killed between
    Tune's snapshots re-runs its last epochs)."""

    def __init__(self, state_file: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._state_file = str(state_file)
        self._decisions: dict[tuple[str, int], str] = {}
        self._loaded = False

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if not self._loaded:
            self._loaded = True
            path = Path(self._state_file)
            if path.is_file():
                (self._brackets, self._trial_info, self._num_stopped,
                 self._decisions) = pickle.loads(path.read_bytes())
        if trial.trial_id not in self._trial_info:
            super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        key = (trial.trial_id, int(result.get(self._time_attr, -1)))
        if key not in self._decisions:
            self._decisions[key] = super().on_trial_result(tune_controller, trial, result)
            self._save()
        return self._decisions[key]

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def _save(self) -> None:
        atomic_write_bytes(Path(self._state_file), pickle.dumps(
            (self._brackets, self._trial_info, self._num_stopped, self._decisions)))
