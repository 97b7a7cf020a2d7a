"""Shared fixtures: the `configs/ci.yaml` stage-0 artefacts are prepared once per session."""

from __future__ import annotations

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


def refine_spec(cfg: Config, method: str = "irn", **changes) -> RefineSpec:
    """``cfg.refine`` with ``method`` chosen and its section's fields changed."""
    section = getattr(cfg.refine, method).model_copy(update=changes)
    return cfg.refine.model_copy(update={"method": method, method: section})


def make_trial(cfg: Config, prepared: Prepared, bg: float, fg: float, method: str = "irn",
               **changes) -> Trial:
    return Trial(prepared, cfg.trial, refine_spec(cfg, method, **changes), bg, fg)
