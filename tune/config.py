"""One typed config for a whole search, loaded from YAML with ``--set key=value`` overrides.

Unknown keys and wrong types are errors naming the dotted key, so a typo in a 30-line YAML never
silently falls back to a default. Relative paths are resolved against the current directory when
the config is loaded, so every later stage (and every Ray worker) sees absolute paths.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from tune import locking
from tune.space import SamplerBounds, Space
from wsss.cam import CamSpec
from wsss.classifier import ClassifierSpec
from wsss.data import DataSpec
from wsss.errors import UserError
from wsss.interop import ImportSpec
from wsss.objectives import check_objective
from wsss.refine import RefineSpec
from wsss.regions import check_pair
from wsss.segmentation import SegmentationSpec
from wsss.spec import Spec
from wsss.stage0 import Prepared, TrialSpec, prepare


class Section(Spec):
    """A config section that belongs to the search system rather than to a pipeline stage."""


def _check_pairs(space: str, pairs: list[tuple[float, float]] | None, section: str) -> None:
    """An explicit ``pairs`` space needs valid pairs; errors name ``<section>.pairs[i].bg``."""
    if space == "pairs":
        if not pairs:
            raise ValueError("space 'pairs' needs a non-empty 'pairs' list")
        for i, (bg, fg) in enumerate(pairs):
            check_pair(bg, fg, where=f"{section}.pairs[{i}]")


class SurfaceConfig(Section):
    space: Literal["paper", "extended", "pairs"] = "paper"
    pairs: list[tuple[float, float]] | None = None

    @model_validator(mode="after")
    def _pairs_given(self) -> SurfaceConfig:
        _check_pairs(self.space, self.pairs, "surface")
        return self


class SearchConfig(Section):
    """Stage 1 (TECM trials under Ray Tune) and promotion to stage 2 (docs/search.md)."""

    space: Space = "paper"
    pairs: list[tuple[float, float]] | None = None
    bounds: SamplerBounds = Field(default_factory=SamplerBounds)
    num_samples: int = Field(16, ge=1, description="trials of the optuna / random spaces")
    warm_start_grid: bool = Field(False, description="optuna: evaluate the paper grid first")
    objective: str = "tecm"
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1)
    max_concurrent: int = Field(2, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0, description="stage 1: a fraction shares a GPU "
                                                         "(0.25: four trials on one GPU); 0: "
                                                         "trials run on CPU")
    stage2_gpus_per_trial: float | None = Field(
        None, ge=0, description="stage 2 (DeepLabv3+); None: 1 where the cluster has GPUs")
    stage2_cpus_per_trial: float | None = Field(None, gt=0, description="None: cpus_per_trial")
    stage2_max_concurrent: int | None = Field(None, ge=1, description="None: all candidates "
                                                                      "at once")
    top_k: int | Literal["all"] = Field(
        3, description="pairs promoted to stage 2; 'all': the oracle (DeepLabv3+ on every "
                       "finished non-degenerate pair: costly, measures the pick's true regret)")
    rank_epoch: Literal["last", "best"] = Field(
        "last", description="which epoch's objective ranks a trial (and whose edge head stage 2 "
                            "uses): the last epoch, or the trial's best one")
    policy: Literal["global", "per_bg"] = "global"
    stage2: bool = Field(True, description="train DeepLabv3+ on the promoted pairs")
    pick: Literal["objective", "val_miou"] = Field(
        "objective", description="final pick: weakly supervised (objective) or by val mIoU "
                                 "(uses ground truth; selection.json says so)")
    seed: int = 0

    @model_validator(mode="after")
    def _valid(self) -> SearchConfig:
        check_objective(self.objective)
        if isinstance(self.top_k, int) and self.top_k < 1:
            raise ValueError("top_k must be at least 1, or 'all'")
        _check_pairs(self.space, self.pairs, "search")
        return self


class RuntimeConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch threads; None = all cores")
    runs_root: Path = Path("runs")
    progress: bool = True


class Config(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    data: DataSpec
    classifier: ClassifierSpec = Field(default_factory=ClassifierSpec)
    cam: CamSpec = Field(default_factory=CamSpec)
    import_cams: ImportSpec | None = None
    trial: TrialSpec = Field(default_factory=TrialSpec)
    refine: RefineSpec = Field(default_factory=RefineSpec)
    surface: SurfaceConfig = Field(default_factory=SurfaceConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    segmentation: SegmentationSpec = Field(default_factory=SegmentationSpec)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)


PACKAGED = Path(__file__).with_name("configs")


def packaged_configs() -> list[str]:
    """Names of the configs shipped with the package (usable as ``--config NAME``)."""
    return sorted(p.stem for p in PACKAGED.glob("*.yaml"))


class _named(io.StringIO):
    """YAML text with a name, which PyYAML's errors print instead of "<unicode string>"."""

    def __init__(self, text: str, name: str) -> None:
        super().__init__(text)
        self.name = name


def _read_yaml(source: str | Path) -> tuple[dict[str, Any], str]:
    path = Path(source)
    if path.is_file():
        text, where = path.read_text(), str(path)
    elif str(source) in packaged_configs():
        text = (PACKAGED / f"{source}.yaml").read_text()
        where = f"packaged config {source!r}"
    else:
        raise UserError(f"config {str(source)!r} not found: give a YAML file path or one of the "
                        f"packaged configs {packaged_configs()}")
    try:
        data = yaml.safe_load(_named(text, where))
    except yaml.YAMLError as e:
        raise UserError(f"{where} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{where} must hold a mapping of sections, got {type(data).__name__}")
    return data, where


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override; the value is parsed as YAML (``3``, ``[1, 2]``)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise UserError(f"--set {assignment!r}: expected key=value, e.g. classifier.epochs=3")
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: {'.'.join(parents[:i + 1])} is not a section")
        node = child
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise UserError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from None


def _resolve_paths(model: BaseModel, base: Path) -> None:
    for name, value in model:
        if isinstance(value, Path) and not value.is_absolute():
            setattr(model, name, (base / value).resolve())
        elif isinstance(value, BaseModel):
            _resolve_paths(value, base)


def _format_errors(err: ValidationError, where: str, overrides: Sequence[str] = ()) -> str:
    """One line per error, naming the dotted key and, when a ``--set`` gave it (or a key below
    or above it), that ``--set``: the YAML file is not to blame for a typo on the command line."""
    given = [a for a in overrides if "=" in a]
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        got = "" if e["type"] in ("extra_forbidden", "missing") else f" (got {e.get('input')!r})"
        by = [a for a in given if (k := a.partition("=")[0]) == key
              or k.startswith(f"{key}.") or key.startswith(f"{k}.")]
        lines.append(f"  {key}: {msg}{got}" + (f" [from --set {by[-1]}]" if by else ""))
    return f"invalid config {where}:\n" + "\n".join(lines)


MOVED = {"affinity": "the 'affinity' section was split: subset, seed, backbone, "
                     "backbone_weights, output_stride and levels moved to 'trial'; the edge "
                     "head, its training and the walk to 'refine.irn' (docs/refiners.md)"}


def load_config(source: str | Path, overrides: list[str] | tuple[str, ...] = (),
                base_dir: Path | None = None) -> Config:
    """Load a YAML file (or a packaged config by name), apply overrides, validate, resolve paths."""
    data, where = _read_yaml(source)
    for assignment in overrides:
        apply_override(data, assignment)
    for key, note in MOVED.items():
        if key in data:
            raise UserError(f"invalid config {where}: {note}")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise UserError(_format_errors(e, where, overrides)) from None
    _resolve_paths(cfg, (base_dir or Path.cwd()).resolve())
    return cfg


def stage0(cfg: Config, features: bool = True) -> Prepared:
    """`prepare` with the config's settings, cached under ``<runs_root>/stores`` (a second run
    trains nothing); ``features``: also the feature store the trials read, when the refiner
    trains on features."""
    return prepare(cfg.data, cfg.classifier, cfg.cam, cfg.runtime.runs_root / "stores",
                   trial=cfg.trial, features=features and cfg.refine.needs_features,
                   imported=cfg.import_cams, device=cfg.runtime.device,
                   progress=cfg.runtime.progress)


STORES_LOCK = ".stores.lock"


def stores_in_use(runs_root: Path) -> AbstractContextManager[None]:
    """Held (shared) by every command that builds or reads a runs root's stores while it runs,
    so that ``wsss-tune gc`` (which holds it exclusively) never removes a store in use; a
    command started during a collection waits for it to end."""
    return locking.held(runs_root / STORES_LOCK, shared=True)
