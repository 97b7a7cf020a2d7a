"""Shared fixtures: the `configs/ci.yaml` stage-0 artefacts are prepared once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tune.config import Config, load_config
from wsss.refine import RefineSpec
from wsss.stage0 import Prepared, prepare
from wsss.trial import Trial

torch.set_num_threads(2)  # this machine and CI: 2 cores; never oversubscribe


@pytest.fixture(scope="session")
def ci_config(tmp_path_factory) -> Config:
    base = tmp_path_factory.mktemp("ci")
    return load_config("ci", base_dir=base)


@pytest.fixture(scope="session")
def ci_prepared(ci_config) -> Prepared:
    c = ci_config
    return prepare(c.data, c.classifier, c.cam, c.runtime.runs_root / "stores",
                   trial=c.trial, features=True, device=c.runtime.device, progress=False)


@pytest.fixture(scope="session")
def finished_search(ci_config, ci_prepared, tmp_path_factory) -> Path:
    """A real two-stage search on the CI config, made by the CLI (stage 0 shared with the
    session: cached): 4 pairs, 2 promoted, DeepLabv3+ for 2 epochs. Tests read it; a test
    that changes a search folder changes a copy."""
    from tune.cli import main

    runs = tmp_path_factory.mktemp("finished") / "runs"
    runs.mkdir()
    os.symlink(ci_config.runtime.runs_root / "stores", runs / "stores")
    assert main(["search", "--config", "ci", "--space", "pairs",
                 "--set", "search.pairs=[[0.1, 0.35], [0.2, 0.45], [0.3, 0.3], [0.25, 0.5]]",
                 "--set", "refine.irn.epochs=2", "--set", "trial.subset=40",
                 "--set", "search.top_k=2", "--set", "segmentation.epochs=2",
                 "--set", f"runtime.runs_root={runs}",
                 "--set", f"data.root={ci_config.data.root}"]) == 0
    return runs / "ci"


def refine_spec(cfg: Config, method: str = "irn", **changes) -> RefineSpec:
    """``cfg.refine`` with ``method`` chosen and its section's fields changed."""
    section = getattr(cfg.refine, method).model_copy(update=changes)
    return cfg.refine.model_copy(update={"method": method, method: section})


def make_trial(cfg: Config, prepared: Prepared, bg: float, fg: float, method: str = "irn",
               **changes) -> Trial:
    return Trial(prepared, cfg.trial, refine_spec(cfg, method, **changes), bg, fg)
