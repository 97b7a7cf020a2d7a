"""Shared fixtures: the `configs/ci.yaml` stage-0 artefacts are prepared once per session."""

from __future__ import annotations

import pytest
import torch

from tune.config import Config, load_config
from wsss.pipeline import Prepared, prepare

torch.set_num_threads(2)  # this machine and CI: 2 cores; never oversubscribe


@pytest.fixture(scope="session")
def ci_config(tmp_path_factory) -> Config:
    base = tmp_path_factory.mktemp("ci")
    return load_config("ci", base_dir=base)


@pytest.fixture(scope="session")
def ci_prepared(ci_config) -> Prepared:
    c = ci_config
    return prepare(c.data, c.classifier, c.cam, c.runtime.runs_root / "stores",
                   affinity=c.affinity, device=c.runtime.device, progress=False)
