"""The search: one `Search` object with one method per phase — stage 0 (prepare), stage 1
(TECM trials under Ray Tune), promotion, stage 2 (DeepLabv3+ on the candidates), selection,
report — run in one Ray session, ending in a `SearchResult`.

Promotion and selection are pure functions of the stage tables, so they can be re-run (and
tested) without Ray. A trial that fails is never ranked: it is marked failed (in its table and
its MLflow run), and ``--resume`` retries it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import ray
import yaml
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from tune import cluster, interrupts, locking, tracking
from tune.config import Config, SearchConfig, stage0, stores_in_use
from tune.folder import LOCK_FILE, STATE_FILE, load_state, saved_config, search_folder
from tune.progress import Stage1Progress, Stage2Progress, say
from tune.schedulers import ResumableASHA
from tune.space import DefineByRun, Pair, grid_pairs
from tune.trainables import TrialContext, restored_trial, stage1, stage2
from wsss.analysis import GROUND_TRUTH_PROXIES, finished_pairs, pick_quality
from wsss.classifier import create_backbone
from wsss.errors import UserError, first_line
from wsss.files import (
    atomic_write_bytes,
    digest,
    output_folder,
    write_csv_atomic,
    write_json_atomic,
)
from wsss.objectives import OBJECTIVES
from wsss.pseudo_labels import export_labels
from wsss.segmentation import build_model
from wsss.stage0 import Prepared

log = logging.getLogger("tune")
GRID_SPACES = ("paper", "extended", "pairs")
ASHA_STATE = "asha-state.pkl"  # `ResumableASHA`'s rungs, beside Tune's experiment state
# Tune reads these from the environment only; `ray_session` sets them for its own duration:
# experiment snapshots every second make resume exact (docs/search.md), so no warning for them;
# and Tune's console output, which its newer engine prints in part even at ``verbose=0`` (an
# experiment table and paths per stage, between our own progress lines): the older one does not
TUNE_ENVIRONMENT = {"TUNE_GLOBAL_CHECKPOINT_S": "1",
                    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
                    "RAY_AIR_NEW_OUTPUT": "0"}


@dataclass(frozen=True)
class SearchResult:
    """A finished search: its folder and MLflow parent run, the stage-1 table (one row per
    trial), the candidates (with their stage-2 results when stage 2 ran), the selection and
    the report."""

    folder: Path
    tracking_uri: str
    parent_run_id: str
    table: pd.DataFrame
    candidates: pd.DataFrame
    selection: dict[str, Any]
    report: Path


class Search:
    """A search in ``<runs_root>/<name>``: `run` checks everything it can before any work,
    then runs the phases under the folder's lock in one Ray session (a local cluster unless
    ``address`` or ``RAY_ADDRESS`` names one). ``resume`` continues a search that was stopped:
    finished trials are not rerun, stopped ones continue from their checkpoint."""

    def __init__(self, cfg: Config, *, address: str | None = None,
                 tracking_uri: str | None = None, resume: bool = False) -> None:
        self.cfg, self.resume = cfg, resume
        self.address = cluster.resolve_address(address)
        self.folder = search_folder(cfg)
        self.phase = "stage 0"
        if resume:  # a wrong folder fails here, before anything is created in it
            self.state = load_state(self.folder)
        else:
            uri = tracking_uri or tracking.default_uri(cfg.runtime.runs_root)
            self.state = {"config": cfg.model_dump(mode="json"), "tracking_uri": uri}

    @property
    def uri(self) -> str:
        return self.state["tracking_uri"]

    @property
    def parent(self) -> str:
        return self.state["parent_run_id"]

    def check(self) -> None:
        """Every input that can be checked without computing: a missing optional package, an
        unwritable runs root, a wrong model name or weights file, an unreachable tracking
        server fail now, not after stage 0 or 1 has trained something."""
        cfg = self.cfg
        cfg.refine.check_available()
        output_folder(cfg.runtime.runs_root, "runtime.runs_root")
        if cfg.import_cams is None:  # else no classifier is trained
            cfg.classifier.backbone()
        if cfg.trial.backbone is not None and cfg.trial.backbone_weights is not None:
            create_backbone(cfg.trial.backbone, cfg.trial.output_stride,
                            cfg.trial.backbone_weights,
                            keys=("trial.backbone", "trial.backbone_weights"))
        if cfg.search.stage2:
            build_model(cfg.segmentation, num_classes=2)  # the class count does not matter
        tracking.check_reachable(self.uri)

    def run(self) -> SearchResult:
        self.check()
        with ray_session(self.address):  # a wrong address fails before anything is written
            self.folder.mkdir(parents=True, exist_ok=True)
            with (stores_in_use(self.cfg.runtime.runs_root),
                  locking.held(self.folder / LOCK_FILE, f"search folder {self.folder}")):
                return self._phases()

    def _phases(self) -> SearchResult:
        """Every phase in order; the parent run ends FINISHED, FAILED or KILLED."""
        self.begin()
        status, selection = "FAILED", None
        try:
            prepared = self.stage0()
            table = self.stage1(prepared)
            candidates = self.promotion(table)
            if self.cfg.search.stage2:
                candidates = self.stage2(prepared, candidates)
            selection = self.selection(table, candidates)
            report = self.report()
            status = "FINISHED"
        except UserError:
            if self.phase == "stage 0" and not self.resume:  # no trial ran: the corrected
                (self.folder / STATE_FILE).unlink()  # command, not a resume, starts afresh
            raise
        except KeyboardInterrupt as e:  # Ctrl-C, or a stop signal (`tune.interrupts`)
            status = "KILLED"
            raise self._interrupted(getattr(e, "signum", signal.SIGINT),
                                    selection is not None) from None
        finally:
            tracking.close_children(self.uri, self.parent)
            tracking.finish(self.uri, self.parent, status)
        return SearchResult(self.folder, self.uri, self.parent, table, candidates, selection,
                            report)

    def _interrupted(self, signum: int, selected: bool) -> interrupts.Interrupted:
        done = ("its pair is selected (selection.json), its report and MLflow records are not "
                "finished" if selected else "nothing was selected from it")
        return interrupts.Interrupted(
            signum, f"search {self.cfg.name} interrupted ({signal.Signals(signum).name}) in "
                    f"{self.phase}: {done}; continue it with: wsss-tune search --resume "
                    f"{self.folder}")

    def begin(self) -> None:
        """A new search: its MLflow parent run and the state a resume needs (atomic); a
        resumed one: its parent run RUNNING again."""
        if self.resume:
            tracking.reopen(self.uri, self.parent)
            return
        if (self.folder / STATE_FILE).exists():
            raise UserError(f"search folder {self.folder} already holds a search: resume it "
                            f"with --resume {self.folder}, or give this one another name "
                            f"(--set name=...)")
        self.state["parent_run_id"] = start_parent(self.cfg, self.uri)
        try:
            write_json_atomic(self.folder / STATE_FILE, self.state)
        except BaseException:  # no search began: its parent run must not stay RUNNING
            tracking.finish(self.uri, self.parent, "KILLED")
            raise

    def stage0(self) -> Prepared:
        """Data, classifier, CAMs and frozen features, cached under ``<runs_root>/stores``;
        the stores it uses are recorded (what `wsss-tune gc` keeps)."""
        cfg = self.cfg
        if cfg.runtime.progress:
            say(f"stage 0: data, classifier, CAMs and frozen features (cached in "
                f"{cfg.runtime.runs_root / 'stores'})")
        prepared = stage0(cfg)
        self.state["stores"] = sorted(p.name for p in prepared.cached)
        write_json_atomic(self.folder / STATE_FILE, self.state)
        return prepared

    def _trainable(self, fn: Callable[..., None], prepared: Prepared, cpus: float,
                   gpus: float, **extra: Any) -> Any:
        """A stage's function trainable: its trials' shared context and resources."""
        cfg = self.cfg
        context = TrialContext(prepared.ref(cfg.data, cfg.trial.subset), cfg.trial, cfg.refine,
                               cfg.search.objective, cfg.search.rank_epoch, max(1, int(cpus)),
                               trial_device(cfg.runtime.device, gpus), **extra)
        return tune.with_resources(tune.with_parameters(fn, context=context),
                                   {"cpu": cpus, "gpu": gpus})

    def _check_cluster(self) -> None:
        """Before a phase runs trials on a cluster, every node must read the folders they
        write and find the dataset (`tune.cluster`); nodes may join between phases."""
        if self.address is not None:
            cfg = self.cfg
            cluster.check_cluster({"search folder": self.folder,
                                   "stores folder": cfg.runtime.runs_root / "stores"},
                                  present={"data.root": cfg.data.root})

    def stage1(self, prepared: Prepared) -> pd.DataFrame:
        """Every stage-1 trial under Ray Tune; writes ``stage1.csv`` (one row per trial: its
        metrics at the ranking epoch) and ``stage1_epochs.csv`` (one row per trial and epoch)."""
        self.phase = "stage 1"
        self._check_cluster()
        cfg, search = self.cfg, self.cfg.search
        param_space, algo, num_samples = stage1_space(search)
        reports, stage_dir = cfg.refine.reports, self.folder / "stage1"
        scheduler = None
        if search.scheduler == "asha" and reports > 1:  # one report (crf): nothing to stop
            scheduler = ResumableASHA(stage_dir / ASHA_STATE, time_attr="training_iteration",
                                      max_t=reports,
                                      grace_period=min(search.grace_period, reports),
                                      reduction_factor=search.reduction_factor)
        trainable = self._trainable(stage1, prepared, search.cpus_per_trial,
                                    search.gpus_per_trial)
        total = len(param_space["pair"]["grid_search"]) if param_space else num_samples

        def new() -> tune.Tuner:
            if cfg.runtime.progress:
                stopping = ("ASHA" if scheduler else "no early stopping" + (
                    f" ({cfg.refine.method} does not train: one report per trial)"
                    if reports == 1 and search.scheduler == "asha" else ""))
                say(f"stage 1: {total} trials ({search.space} space), refiner "
                    f"{cfg.refine.method}, objective {search.objective}, {stopping}, up to "
                    f"{search.max_concurrent} at a time")
            return tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(metric="objective", mode="max",
                                            scheduler=scheduler, search_alg=algo,
                                            num_samples=num_samples,
                                            max_concurrent_trials=search.max_concurrent,
                                            reuse_actors=True),
                run_config=self._run_config(1, reports,
                                            Stage1Progress(total, reports, search.objective)))

        results = fit(tuner_for(stage_dir, trainable, param_space, new, self.resume))
        runs = tracking.child_runs(self.uri, self.parent, 1)
        table, curves = trials_table(results, runs, search.rank_epoch)
        write_csv_atomic(table, self.folder / "stage1.csv")
        write_csv_atomic(curves, self.folder / "stage1_epochs.csv")
        return table

    def _run_config(self, stage: int, reports: int, progress: tune.Callback) -> tune.RunConfig:
        """Stage ``stage``'s Tune run in the search folder: the driver logs its trials to
        MLflow, and prints ``progress`` lines when asked to."""
        callbacks = [tracking.TrialRuns(self.uri, self.parent, stage, reports)]
        if self.cfg.runtime.progress:
            callbacks.append(progress)
        return tune.RunConfig(name=f"stage{stage}", storage_path=str(self.folder), verbose=0,
                              checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                              callbacks=callbacks)

    def promotion(self, table: pd.DataFrame) -> pd.DataFrame:
        """The candidates for stage 2 (`promote`), recorded in ``candidates.json``."""
        self.phase = "promotion"
        search = self.cfg.search
        candidates = promote(table, k=search.top_k, policy=search.policy,
                             epochs=self.cfg.refine.reports)
        write_json_atomic(self.folder / "candidates.json", {
            "objective": search.objective, "policy": search.policy, "top_k": search.top_k,
            "mlflow_parent_run_id": self.parent,
            "candidates": candidates[["bg", "fg", "objective", "trial_id", "mlflow_run_id"]]
            .to_dict(orient="records")})
        return candidates

    def stage2(self, prepared: Prepared, candidates: pd.DataFrame) -> pd.DataFrame:
        """DeepLabv3+ on each candidate's pseudo-labels (whole train split); returns the
        candidates with their last ``val_miou`` and the checkpoint holding the trained model,
        and writes ``stage2.csv`` and ``stage2_epochs.csv``."""
        self.phase = "stage 2"
        self._check_cluster()
        cfg, search, seg = self.cfg, self.cfg.search, self.cfg.segmentation
        cpus = search.stage2_cpus_per_trial or search.cpus_per_trial
        gpus = search.stage2_gpus_per_trial
        if gpus is None:  # a whole GPU per DeepLabv3+ training wherever the cluster has one
            gpus = (1.0 if cfg.runtime.device != "cpu"
                    and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0)
        trainable = self._trainable(stage2, prepared, cpus, gpus, segmentation=seg)
        grid = [{"pair": Pair(r.bg, r.fg)._asdict(), "checkpoint": r.checkpoint}
                for r in candidates.itertuples()]
        param_space = {"candidate": tune.grid_search(grid)}

        def new() -> tune.Tuner:
            if cfg.runtime.progress:
                say(f"stage 2: DeepLabv3+ ({seg.encoder}) on {len(grid)} candidates' "
                    f"pseudo-labels, {seg.epochs} epochs each")
            return tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=search.stage2_max_concurrent or len(grid),
                    reuse_actors=True),
                run_config=self._run_config(2, seg.epochs, Stage2Progress(seg.epochs)))

        # a resumed search: finished trainings stay done (stage 2 is never resumed from
        # another search's state: it only exists once stage 1 finished here)
        results = fit(tuner_for(self.folder / "stage2", trainable, param_space, new, True))
        rows, curves = stage2_rows(results, seg.epochs, tracking.child_runs(
            self.uri, self.parent, 2), self.folder)
        candidates = candidates.merge(rows, on=["bg", "fg"], how="left")
        write_csv_atomic(candidates.drop(columns=["checkpoint"]), self.folder / "stage2.csv")
        write_csv_atomic(curves, self.folder / "stage2_epochs.csv")
        return candidates

    def selection(self, table: pd.DataFrame, candidates: pd.DataFrame) -> dict[str, Any]:
        """The pair and its evidence (``selection.json``, ``thresholds.yaml``), also recorded
        on the MLflow runs."""
        self.phase = "selection"
        cfg = self.cfg
        selection = write_selection(cfg, self.folder, candidates, cfg.search.pick,
                                    cfg.search.policy)
        tracking.record_selection(self.uri, self.parent, selection, table, candidates,
                                  finished_pairs(table, cfg.refine.reports))
        return selection

    def report(self) -> Path:
        """The HTML report (`tune.report`) and the search's tables, also logged as the parent
        run's artifacts."""
        from tune.report import write_report

        self.phase = "report"
        if self.cfg.runtime.progress:
            say("writing the report ...")
        index = write_report(self.folder)
        tracking.log_folder(self.uri, self.parent, index.parent, "report")
        tracking.log_artifacts(self.uri, self.parent, [self.folder / n for n in (
            "stage1.csv", "stage1_epochs.csv", "candidates.json", "stage2.csv",
            "stage2_epochs.csv", "selection.json", "thresholds.yaml")])
        return index


def run_search(cfg: Config, *, address: str | None = None, tracking_uri: str | None = None,
               resume: bool = False) -> SearchResult:
    """`Search` ``(cfg, ...).run()``."""
    return Search(cfg, address=address, tracking_uri=tracking_uri, resume=resume).run()


def start_parent(cfg: Config, uri: str) -> str:
    """The search's MLflow parent run: its config as params (only the chosen refiner's
    section: the others would be noise) and what reproducing it needs as tags."""
    config = cfg.model_dump(mode="json")
    method = cfg.refine.method
    logged = {**config, "refine": {k: v for k, v in config["refine"].items()
                                   if k in ("method", method)}}
    seeds = {"classifier": cfg.classifier.seed, "trial": cfg.trial.seed,
             "search": cfg.search.seed}
    # the first search under a runs root creates its MLflow database; two at once would race
    with locking.held(cfg.runtime.runs_root / ".mlflow.lock"):
        return tracking.start_parent(uri, cfg.name, logged,
                                     tracking.provenance(seeds, digest(config)))


def stage1_space(search: SearchConfig) -> tuple[dict[str, Any], OptunaSearch | None, int]:
    """(param_space, search algorithm, num_samples) for the configured space."""
    if search.space in GRID_SPACES:
        pairs = grid_pairs(search.space, search.pairs)
        return {"pair": tune.grid_search([p._asdict() for p in pairs])}, None, 1
    sampler = (optuna.samplers.TPESampler(seed=search.seed) if search.space == "optuna"
               else optuna.samplers.RandomSampler(seed=search.seed))
    gap = search.bounds.min_gap
    warm = ([p._asdict() for p in grid_pairs("paper") if p.fg - p.bg >= gap]
            if search.warm_start_grid else None)
    algo = OptunaSearch(space=DefineByRun(search.bounds), metric="objective", mode="max",
                        sampler=sampler, points_to_evaluate=warm)
    return {}, algo, search.num_samples


def trial_device(device: str, gpus: float) -> str:
    """A trial uses a GPU only when Ray gave it one: Ray leaves ``CUDA_VISIBLE_DEVICES`` alone
    for a trial without GPUs, so ``auto`` would put every such trial on GPU 0 unaccounted."""
    return device if gpus > 0 else "cpu"


def restorable(stage_dir: Path) -> bool:
    """Whether Tune recorded a stage's experiment, so that ``--resume`` continues it. Tune
    writes ``tuner.pkl`` first and its experiment state a moment later: a stage killed in
    between recorded nothing, and is removed, to start again (restoring it fails for ever)."""
    if any(stage_dir.glob("experiment_state-*.json")) and tune.Tuner.can_restore(str(stage_dir)):
        return True
    if stage_dir.exists():
        log.info("%s holds no experiment state (killed as it started): starting it again",
                 stage_dir)
        shutil.rmtree(stage_dir)
    return False


def tuner_for(stage_dir: Path, trainable: Any, param_space: dict[str, Any],
              new: Callable[[], tune.Tuner], resume: bool) -> tune.Tuner:
    """The stage's Tuner restored from its folder when resuming what Tune recorded there
    (unfinished and failed trials run again), else ``new()``."""
    if resume and restorable(stage_dir):
        try:
            return tune.Tuner.restore(str(stage_dir), trainable, resume_unfinished=True,
                                      resume_errored=True, param_space=param_space)
        except (AttributeError, ImportError) as e:  # its pickles name what is gone
            raise UserError(f"{stage_dir} was recorded by another version of wsss-tune and "
                            f"cannot be resumed by this one ({first_line(e)}): start the "
                            f"search again under a new name") from None
    return new()


def fit(tuner: tune.Tuner) -> tune.ResultGrid:
    """``tuner.fit()``; a stop signal ends it gracefully (Tune saves its state), then
    raises `tune.interrupts.Interrupted`."""
    with interrupts.tune_loop():
        return tuner.fit()


def _failure(result: tune.Result, stage: int) -> str | None:
    """None for a trial that ran without error; else one line saying why (its MLflow run was
    marked FAILED by `tracking.TrialRuns`)."""
    if result.error is None:
        return None
    lines = [line for line in str(result.error).splitlines() if line.strip()]
    reason = lines[-1].strip() if lines else type(result.error).__name__
    metrics = result.metrics or {}
    if "bg" not in metrics:
        raise UserError(f"a stage-{stage} trial failed before its first report: {reason} "
                        f"(its log: {result.path}/error.txt)")
    log.warning("stage-%d trial (%g, %g) failed after %d epochs and is not ranked: %s "
                "(wsss-tune search --resume retries it)", stage, metrics["bg"], metrics["fg"],
                metrics.get("training_iteration", 0), reason)
    return reason


def _metrics(frame: pd.DataFrame) -> pd.DataFrame:
    """A table of reports without Tune's bookkeeping and config columns."""
    tune_columns = tracking.NOT_LOGGED - {"bg", "fg", "epoch", "training_iteration", "trial_id"}
    return frame[[c for c in frame if c not in tune_columns and c != "logdir"
                  and not c.startswith("config/")]]


def _history(result: tune.Result) -> pd.DataFrame:
    """Every epoch a trial reported, once each (an epoch re-run after a crash keeps its last
    report)."""
    frame = result.metrics_dataframe
    if frame is None or "epoch" not in frame:
        return pd.DataFrame()
    return (_metrics(frame).drop_duplicates("epoch", keep="last")
            .sort_values("epoch", ignore_index=True))


def trials_table(results: tune.ResultGrid, runs: dict[str, str],
                 rank_epoch: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per trial: its id, MLflow run, checkpoint, whether it failed, and its metrics at
    its ranking epoch (docs: ``search.rank_epoch``): the last epoch, or the one with the best
    driving objective (the earliest on ties); ``training_iteration`` stays the number of epochs
    trained, which promotion checks. And one row per trial and epoch (the learning curves)."""
    failed = {r.metrics["trial_id"]: int(_failure(r, 1) is not None) for r in results}
    checkpoints = {r.metrics["trial_id"]: r.checkpoint.path if r.checkpoint else None
                   for r in results}
    curves = [h.assign(trial_id=r.metrics["trial_id"]) for r in results
              if not (h := _history(r)).empty]
    epochs = (pd.concat(curves, ignore_index=True).sort_values(["bg", "fg", "epoch"],
                                                              ignore_index=True)
              if curves else pd.DataFrame())
    table = _metrics(results.get_dataframe())
    if rank_epoch == "best":  # from the curves (each epoch once, in order): the earliest best
        trained = table.set_index("trial_id")["training_iteration"]
        best = epochs.loc[epochs.groupby("trial_id", sort=False)["objective"].idxmax()]
        table = best.assign(training_iteration=best.trial_id.map(trained))
    table = table.assign(rank_epoch=table.epoch.astype(int), failed=table.trial_id.map(failed),
                         checkpoint=table.trial_id.map(checkpoints),
                         mlflow_run_id=table.trial_id.map(runs))
    first = ["bg", "fg", "trial_id", "mlflow_run_id", "checkpoint", "failed",
             "training_iteration", "rank_epoch"]
    table = table[first + [c for c in table if c not in first]]
    return table.sort_values(["bg", "fg"], ignore_index=True), epochs


def stage2_rows(results: Iterable[tune.Result], epochs: int, runs: dict[str, str],
                search_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per finished or failed DeepLabv3+ training (val mIoU of a finished one), and its
    curves. A training that neither finished nor failed was interrupted: nothing may then be
    selected from half-trained models, so this stops with the resume command instead."""
    rows, curves, unfinished = [], [], 0
    for result in results:
        m = result.metrics or {}
        history = _history(result)
        if not history.empty:
            curves.append(history[[c for c in ("bg", "fg", "epoch", "seg_loss", "val_miou")
                                   if c in history]])
        failed = _failure(result, 2) is not None
        done = not failed and m.get("epoch", 0) >= epochs
        if not (failed or done):
            unfinished += 1
            continue
        pair = Pair.of(m)
        rows.append({**pair._asdict(), "stage2_failed": int(not done),
                     "val_miou": m.get("val_miou", float("nan")) if done else float("nan"),
                     "seg_loss": m["seg_loss"],
                     "stage2_run_id": runs.get(tracking.stage2_key(pair)),
                     "stage2_checkpoint": result.checkpoint.path if result.checkpoint else None})
    if unfinished:
        raise UserError(f"stage 2 stopped with {unfinished} of {len(rows) + unfinished} "
                        f"DeepLabv3+ trainings unfinished (interrupted?): nothing is selected "
                        f"from half-trained models; continue it with: wsss-tune search --resume "
                        f"{search_dir}")
    return pd.DataFrame(rows), (pd.concat(curves, ignore_index=True) if curves
                                else pd.DataFrame())


def promote(table: pd.DataFrame, *, k: int | str, policy: str, epochs: int) -> pd.DataFrame:
    """The top-k trials for stage 2 (docs: promotion); ``k = "all"`` promotes every qualifying
    trial (the oracle).

    Only trials that finished every epoch, did not fail and are not degenerate qualify.
    ``global``: the k best by objective; ``per_bg``: the best FG of each BG first, then the k
    best of those (more diverse). Ties: objective descending, then bg, then fg ascending
    (deterministic).
    """
    finished = finished_pairs(table, epochs)
    if finished.empty:
        stopped = int((table["training_iteration"] < epochs).sum())
        degenerate = int((table["degenerate"] != 0).sum())
        raise UserError(f"no stage-1 trial can be promoted: {len(table)} trials, {stopped} "
                        f"stopped early, {degenerate} degenerate (no neutral pixel)")
    ranked = finished.sort_values(["objective", "bg", "fg"], ascending=[False, True, True])
    if policy == "per_bg":
        ranked = ranked.drop_duplicates("bg", keep="first")
    elif policy != "global":
        raise ValueError(f"unknown promotion policy {policy!r}")
    if k == "all":
        return ranked.reset_index(drop=True)
    if len(ranked) < k:
        log.warning("only %d trials qualify for promotion (top_k=%d)", len(ranked), k)
    return ranked.head(k).reset_index(drop=True)


def select(candidates: pd.DataFrame, *, pick: str, objective: str, policy: str,
           rank_epoch: str = "last", oracle: bool = False) -> dict[str, Any]:
    """The final pair with its evidence. ``objective`` (default) uses no ground truth; ``val_miou``
    does, and the result says so. With val mIoU available, the regret of the pick against the
    best candidate by val mIoU is reported, with its scope: the promoted candidates only, or
    (``oracle``: every finished pair was promoted) all of them; the oracle also scores how
    well each objective, and each ground-truth proxy, would have picked (`pick_quality`)."""
    key = "objective" if pick == "objective" else "val_miou"
    if key not in candidates or candidates[key].isna().all():
        raise UserError(f"cannot pick by {pick}: no candidate has it (was stage 2 run, and does "
                        "the val split have ground truth?)")
    ranked = candidates.sort_values([key, "bg", "fg"], ascending=[False, True, True],
                                    na_position="last").reset_index(drop=True)
    chosen = ranked.iloc[0]
    out = {"pair": {"bg": float(chosen.bg), "fg": float(chosen.fg)}, "pick": pick,
           "uses_ground_truth": pick == "val_miou", "objective": objective, "policy": policy,
           "rank_epoch": rank_epoch,
           "metrics": {k: (None if pd.isna(v) else v) for k, v in chosen.items()
                       if isinstance(v, (int, float))},
           "ranked": ranked.drop(columns=["checkpoint"], errors="ignore")
           .astype(object).where(ranked.notna(), None).to_dict(orient="records")}
    if "val_miou" in ranked and ranked["val_miou"].notna().any():
        best = ranked.loc[ranked["val_miou"].idxmax()]
        out["best_by_val_miou"] = {"bg": float(best.bg), "fg": float(best.fg),
                                   "val_miou": float(best.val_miou)}
        out["regret_val_miou"] = float(best.val_miou - chosen.val_miou)
        out["regret_scope"] = "all" if oracle else "candidates"
        out["regret_pairs"] = int(ranked["val_miou"].notna().sum())
        if oracle:
            names = [n for n in (*OBJECTIVES, *GROUND_TRUTH_PROXIES) if n in ranked]
            out["evaluation"] = {n: {**q, "uses_ground_truth": n in GROUND_TRUTH_PROXIES}
                                 for n in names
                                 if (q := pick_quality(ranked, n, "val_miou")) is not None}
    return out


def write_selection(cfg: Config, folder: Path, candidates: pd.DataFrame, pick: str,
                    policy: str) -> dict[str, Any]:
    """``selection.json`` (the pair and its evidence) and ``thresholds.yaml``, atomically."""
    selection = select(candidates, pick=pick, objective=cfg.search.objective, policy=policy,
                       rank_epoch=cfg.search.rank_epoch, oracle=cfg.search.top_k == "all")
    write_json_atomic(folder / "selection.json", selection)
    atomic_write_bytes(folder / "thresholds.yaml", yaml.safe_dump(
        {**selection["pair"], "search": cfg.name, "pick": pick, "policy": policy,
         "objective": cfg.search.objective}, sort_keys=False).encode())
    return selection


def reselect(folder: Path, *, policy: str | None = None,
             pick: str | None = None) -> tuple[dict[str, Any], list[tuple[float, float]]]:
    """Select again from a finished search's tables, without training anything. Returns the
    selection and the candidates of this policy that never reached stage 2."""
    cfg = saved_config(folder)
    policy, pick = policy or cfg.search.policy, pick or cfg.search.pick
    if not (folder / "stage1.csv").is_file():
        raise UserError(f"{folder} has no stage1.csv: its stage 1 did not finish (resume it)")
    table = pd.read_csv(folder / "stage1.csv")
    candidates = promote(table, k=cfg.search.top_k, policy=policy, epochs=cfg.refine.reports)
    missing = list(zip(candidates.bg, candidates.fg))
    if (folder / "stage2.csv").is_file():
        stage2 = pd.read_csv(folder / "stage2.csv")[["bg", "fg", "val_miou", "seg_loss"]]
        candidates = candidates.merge(stage2, on=["bg", "fg"], how="left")
        missing = [(r.bg, r.fg) for r in candidates.itertuples() if pd.isna(r.val_miou)]
    return write_selection(cfg, folder, candidates, pick, policy), missing


def export_run_labels(folder: Path, out: Path, pair: Pair | None = None) -> tuple[int, Pair]:
    """Pseudo-labels of the whole train split for a searched pair (default: the selected one),
    made by that pair's stage-1 refiner; returns (count, pair)."""
    output_folder(out, "--out")  # before any refinement
    cfg = saved_config(folder)
    if pair is None:
        if not (folder / "selection.json").is_file():
            raise UserError(f"{folder} has no selection.json yet: give --pair BG,FG")
        pair = Pair.of(json.loads((folder / "selection.json").read_text()))
    table = pd.read_csv(folder / "stage1.csv")
    match = pair.rows_in(table)
    if match.empty or pd.isna(match.iloc[0].checkpoint):
        searched = ", ".join(Pair(r.bg, r.fg).label for r in table.itertuples())
        raise UserError(f"pair {pair.label} has no stage-1 trial in {folder}; searched "
                        f"pairs: {searched}")
    with stores_in_use(cfg.runtime.runs_root):
        prepared = stage0(cfg).whole_split(cfg.trial, cfg.refine.needs_features,
                                           cfg.runtime.device)
        trial = restored_trial(prepared, (cfg.trial, cfg.refine), pair,
                               Path(match.iloc[0].checkpoint), cfg.search.rank_epoch,
                               cfg.runtime.device)
        return export_labels(trial.pseudo_labels(), out), pair


@contextmanager
def scoped_environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set (unless the user set them) for the duration."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if saved[k] is None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """A search's Ray session: a local cluster unless ``address`` names one (connecting fails
    in one line when it cannot be reached). Afterwards a local Ray's session folder is
    removed (kept, and named, when the search failed with an error of its own)."""
    session_dir, failed = None, True
    try:
        with interrupts.sheltered():
            if address is None:
                # a local Ray turns token auth on by itself and warns that it did: no news
                logging.getLogger("ray._private.authentication.authentication_token_setup"
                                  ).setLevel(logging.ERROR)
                # Ray counts the CPUs itself (it honours a container's CPU quota;
                # os.cpu_count does not); its INFO lines are replaced by our progress lines
                context = ray.init(address="local", include_dashboard=False,
                                   log_to_driver=False, ignore_reinit_error=True,
                                   logging_level=logging.WARNING)
                session_dir = context.address_info.get("session_dir")
            else:
                cluster.connect(address)
        with scoped_environ(TUNE_ENVIRONMENT):
            yield
        failed = False
    except (KeyboardInterrupt, UserError):
        failed = False  # nothing in Ray's logs explains an interrupt or a user's error
        raise
    finally:
        ray.shutdown()
        if session_dir and not failed:  # a local Ray's logs (tens of MB a search) go with it
            shutil.rmtree(session_dir, ignore_errors=True)
        elif session_dir:
            log.warning("Ray's logs of this failed search are kept in %s", session_dir)
