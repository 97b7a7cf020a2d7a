"""A search folder, ``<runs_root>/<name>``: its layout (docs/architecture.md, "The search
folder") and the state a search records when it begins, which every later command reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tune.config import Config
from wsss.errors import UserError

STATE_FILE = "search.json"  # config, tracking URI, parent run id, stores in use
LOCK_FILE = ".search.lock"  # held by the search running in the folder (`tune.locking`)


def search_folder(cfg: Config) -> Path:
    return cfg.runtime.runs_root / cfg.name


def load_state(folder: Path) -> dict[str, Any]:
    """What a search recorded when it began: config, tracking URI, parent run id (and, after
    stage 0, the stores it uses)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not a search folder ({STATE_FILE} not found)")
    return json.loads(path.read_text())


def saved_config(folder: Path) -> Config:
    """The config a search in ``folder`` was started with."""
    return Config.model_validate(load_state(folder)["config"])
