"""The search driver: stage 0 (prepare), stage 1 (TECM trials under Ray Tune), promotion,
stage 2 (DeepLabv3+ on the candidates), selection.

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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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
from tune.progress import Stage1Progress, Stage2Progress, say
from tune.schedulers import ResumableASHA
from tune.space import DefineByRun, grid_pairs
from tune.trainables import restored_trial, stage1, stage2, trial_context
from wsss.analysis import GROUND_TRUTH_PROXIES, finished_pairs, pick_quality
from wsss.classifier import create_backbone
from wsss.errors import UserError
from wsss.files import atomic_write_bytes, output_folder, write_csv_atomic, write_json_atomic
from wsss.objectives import OBJECTIVES
from wsss.pseudo_labels import export_labels
from wsss.segmentation import build_model
from wsss.stage0 import Prepared, digest

log = logging.getLogger("tune")
GRID_SPACES = ("paper", "extended", "pairs")


def stage1_space(search: SearchConfig) -> tuple[dict[str, Any], OptunaSearch | None, int]:
    """(param_space, search algorithm, num_samples) for the configured space."""
    if search.space in GRID_SPACES:
        pairs = grid_pairs(search.space, search.pairs)
        return {"pair": tune.grid_search([list(p) for p in pairs])}, None, 1
    sampler = (optuna.samplers.TPESampler(seed=search.seed) if search.space == "optuna"
               else optuna.samplers.RandomSampler(seed=search.seed))
    gap = search.bounds.min_gap
    warm = ([{"bg": bg, "fg": fg} for bg, fg in grid_pairs("paper") if fg - bg >= gap]
            if search.warm_start_grid else None)
    algo = OptunaSearch(space=DefineByRun(search.bounds), metric="objective", mode="max",
                        sampler=sampler, points_to_evaluate=warm)
    return {}, algo, search.num_samples


def trial_device(device: str, gpus: float) -> str:
    """A trial uses a GPU only when Ray gave it one: Ray leaves ``CUDA_VISIBLE_DEVICES`` alone
    for a trial without GPUs, so ``auto`` would put every such trial on GPU 0 unaccounted."""
    return device if gpus > 0 else "cpu"


def run_stage1(cfg: Config, prepared: Prepared, search_dir: Path, tracking_uri: str,
               parent_run_id: str, resume: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run every stage-1 trial under Ray Tune; returns one row per trial (its metrics at the
    ranking epoch) and one row per trial and epoch."""
    search, threads = cfg.search, max(1, int(cfg.search.cpus_per_trial))
    param_space, algo, num_samples = stage1_space(search)
    scheduler, reports = None, cfg.refine.reports
    stage_dir = search_dir / "stage1"
    if search.scheduler == "asha" and reports > 1:  # one report (crf): nothing to stop early
        scheduler = ResumableASHA(stage_dir / ASHA_STATE, time_attr="training_iteration",
                                  max_t=reports, grace_period=min(search.grace_period, reports),
                                  reduction_factor=search.reduction_factor)
    context = trial_context(cfg.data, (cfg.trial, cfg.refine), prepared, search.objective,
                            search.rank_epoch, threads, tracking_uri, parent_run_id,
                            trial_device(cfg.runtime.device, search.gpus_per_trial))
    trainable = tune.with_resources(tune.with_parameters(stage1, context=context),
                                    {"cpu": search.cpus_per_trial, "gpu": search.gpus_per_trial})
    if resume and restorable(stage_dir):
        tuner = tune.Tuner.restore(str(stage_dir), trainable, resume_unfinished=True,
                                   resume_errored=True, param_space=param_space)
        return _trials_table(_fit(tuner), tracking_uri, search.rank_epoch)
    total = len(param_space["pair"]["grid_search"]) if param_space else num_samples
    if cfg.runtime.progress:
        stopping = ("ASHA" if scheduler else "no early stopping" + (
            f" ({cfg.refine.method} does not train: one report per trial)"
            if reports == 1 and search.scheduler == "asha" else ""))
        say(f"stage 1: {total} trials ({search.space} space), refiner {cfg.refine.method}, "
            f"objective {search.objective}, {stopping}, up to {search.max_concurrent} at a time")
    callbacks = [tracking.CloseStoppedRuns(tracking_uri, reports)] + (
        [Stage1Progress(total, reports, search.objective)]
        if cfg.runtime.progress else [])
    tuner = tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric="objective", mode="max", scheduler=scheduler,
                                    search_alg=algo, num_samples=num_samples,
                                    max_concurrent_trials=search.max_concurrent,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name="stage1", storage_path=str(search_dir),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  callbacks=callbacks, verbose=0))
    return _trials_table(_fit(tuner), tracking_uri, search.rank_epoch)


ASHA_STATE = "asha-state.pkl"  # `ResumableASHA`'s rungs, beside Tune's experiment state


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


def _fit(tuner: tune.Tuner) -> tune.ResultGrid:
    """``tuner.fit()``; a stop signal ends it gracefully (Tune saves its state), then
    raises `tune.interrupts.Interrupted`."""
    with interrupts.tune_loop():
        return tuner.fit()


def _failure(result: tune.Result, stage: int, tracking_uri: str) -> str | None:
    """None for a trial that ran without error; else one line saying why, with its MLflow run
    marked FAILED (a stopped trial's run is closed as FINISHED, this one must not be)."""
    if result.error is None:
        return None
    lines = [line for line in str(result.error).splitlines() if line.strip()]
    reason = lines[-1].strip() if lines else type(result.error).__name__
    metrics = result.metrics or {}
    if "bg" not in metrics:
        raise UserError(f"a stage-{stage} trial failed before its first report: {reason} "
                        f"(its log: {result.path}/error.txt)")
    tracking.finish(tracking_uri, metrics["mlflow_run_id"], "FAILED")
    log.warning("stage-%d trial (%g, %g) failed after %d epochs and is not ranked: %s "
                "(wsss-tune search --resume retries it)", stage, metrics["bg"], metrics["fg"],
                metrics.get("training_iteration", 0), reason)
    return reason


RAY_KEYS = ("timestamp", "pid", "time_since_restore", "iterations_since_restore",
            "time_this_iter_s", "time_total_s", "done")


def _numbers(row: dict[str, Any]) -> dict[str, Any]:
    """A report's metrics, without Ray's bookkeeping."""
    return {k: v for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in RAY_KEYS}


def _history(result: tune.Result, step: str = "epoch") -> pd.DataFrame:
    """Every epoch a trial reported, once each (an epoch re-run after a crash keeps its last
    report), numbered by ``step`` in column ``epoch``."""
    frame = result.metrics_dataframe
    if frame is None or step not in frame:
        return pd.DataFrame()
    frame = frame.drop(columns=["epoch"] if step != "epoch" and "epoch" in frame else [])
    return (frame.rename(columns={step: "epoch"}).drop_duplicates("epoch", keep="last")
            .sort_values("epoch", ignore_index=True))


def _ranking_row(result: tune.Result, history: pd.DataFrame, rank_epoch: str) -> dict[str, Any]:
    """A trial's metrics at its ranking epoch (docs: ``search.rank_epoch``): the last epoch, or
    the epoch with the best driving objective (the earliest on ties). ``training_iteration``
    stays the number of epochs trained, which promotion checks."""
    last = _numbers(result.metrics)
    if rank_epoch != "best" or history.empty or "objective" not in history:
        return {**last, "rank_epoch": last.get("epoch", 0)}
    best = history.loc[history["objective"].idxmax()]
    return {**last, **_numbers(best.to_dict()), "training_iteration":
            last["training_iteration"], "rank_epoch": int(best["epoch"])}


def _trials_table(results: tune.ResultGrid, tracking_uri: str,
                  rank_epoch: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per trial (its id, MLflow run, whether it failed and its metrics at the ranking
    epoch), and one row per trial and epoch (the learning curves)."""
    rows, curves = [], []
    for result in results:
        failed = _failure(result, 1, tracking_uri) is not None
        history = _history(result)
        rows.append({"trial_id": result.metrics["trial_id"],
                     "mlflow_run_id": result.metrics["mlflow_run_id"],
                     "checkpoint": result.checkpoint.path if result.checkpoint else None,
                     "failed": int(failed), **_ranking_row(result, history, rank_epoch)})
        if not history.empty:
            curves.append(history[[c for c in history if c in ("trial_id", "bg", "fg")
                                   or c in _numbers(history.iloc[0].to_dict())]])
    table = pd.DataFrame(rows).sort_values(["bg", "fg"], ignore_index=True)
    epochs = (pd.concat(curves, ignore_index=True).sort_values(["bg", "fg", "epoch"],
                                                              ignore_index=True)
              if curves else pd.DataFrame())
    return table, epochs


def run_stage2(cfg: Config, candidates: pd.DataFrame, prepared: Prepared, search_dir: Path,
               tracking_uri: str, parent_run_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """DeepLabv3+ on each promoted pair's pseudo-labels (whole train split); one row per
    candidate with its last ``val_miou`` and the checkpoint holding its trained model, and one
    row per candidate and epoch."""
    search = cfg.search
    cpus = search.stage2_cpus_per_trial or search.cpus_per_trial
    gpus = search.stage2_gpus_per_trial
    if gpus is None:  # a whole GPU per DeepLabv3+ training wherever the cluster has one
        gpus = (1.0 if cfg.runtime.device != "cpu"
                and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0)
    context = {**trial_context(cfg.data, (cfg.trial, cfg.refine), prepared, search.objective,
                               search.rank_epoch, max(1, int(cpus)), tracking_uri,
                               parent_run_id, trial_device(cfg.runtime.device, gpus)),
               "segmentation": cfg.segmentation.model_dump(mode="json")}
    grid = [{"bg": r.bg, "fg": r.fg, "checkpoint": r.checkpoint}
            for r in candidates.itertuples()]
    trainable = tune.with_resources(tune.with_parameters(stage2, context=context),
                                    {"cpu": cpus, "gpu": gpus})
    stage_dir = search_dir / "stage2"
    param_space = {"candidate": tune.grid_search(grid)}
    if restorable(stage_dir):  # a resumed search: finished ones stay done
        tuner = tune.Tuner.restore(str(stage_dir), trainable, resume_unfinished=True,
                                   resume_errored=True, param_space=param_space)
    else:
        if cfg.runtime.progress:
            say(f"stage 2: DeepLabv3+ ({cfg.segmentation.encoder}) on {len(grid)} candidates' "
                f"pseudo-labels, {cfg.segmentation.epochs} epochs each")
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(
                max_concurrent_trials=search.stage2_max_concurrent or len(grid),
                reuse_actors=True),
            run_config=tune.RunConfig(
                name="stage2", storage_path=str(search_dir), verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[Stage2Progress(cfg.segmentation.epochs)] if cfg.runtime.progress
                else []))
    rows, epochs = stage2_rows(_fit(tuner), cfg.segmentation.epochs, tracking_uri, search_dir)
    return candidates.merge(rows, on=["bg", "fg"], how="left"), epochs


def stage2_rows(results: Iterable[tune.Result], epochs: int, tracking_uri: str,
                search_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per finished or failed DeepLabv3+ training (val mIoU of a finished one), and its
    curves. A training that neither finished nor failed was interrupted: nothing may then be
    selected from half-trained models, so this stops with the resume command instead."""
    rows, curves, unfinished = [], [], 0
    for result in results:
        m = result.metrics or {}
        history = _history(result, "training_iteration")
        if not history.empty:
            curves.append(history[[c for c in ("bg", "fg", "epoch", "seg_loss", "val_miou")
                                   if c in history]])
        failed = _failure(result, 2, tracking_uri) is not None
        done = not failed and m.get("training_iteration", 0) >= epochs
        if not (failed or done):
            unfinished += 1
            continue
        rows.append({"bg": m["bg"], "fg": m["fg"], "stage2_failed": int(not done),
                     "val_miou": m.get("val_miou", float("nan")) if done else float("nan"),
                     "seg_loss": m["seg_loss"], "stage2_run_id": m["mlflow_run_id"],
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


def export_run_labels(folder: Path, out: Path,
                      pair: tuple[float, float] | None = None) -> tuple[int, float, float]:
    """Pseudo-labels of the whole train split for a searched pair (default: the selected one),
    made by that pair's stage-1 refiner; returns (count, bg, fg)."""
    output_folder(out, "--out")  # before any refinement
    cfg = saved_config(folder)
    if pair is None:
        if not (folder / "selection.json").is_file():
            raise UserError(f"{folder} has no selection.json yet: give --pair BG,FG")
        chosen = json.loads((folder / "selection.json").read_text())["pair"]
        pair = (chosen["bg"], chosen["fg"])
    table = pd.read_csv(folder / "stage1.csv")
    match = table[((table.bg - pair[0]).abs() < 1e-9) & ((table.fg - pair[1]).abs() < 1e-9)]
    if match.empty or pd.isna(match.iloc[0].checkpoint):
        searched = ", ".join(f"{r.bg:g},{r.fg:g}" for r in table.itertuples())
        raise UserError(f"pair {pair[0]:g},{pair[1]:g} has no stage-1 trial in {folder}; "
                        f"searched pairs: {searched}")
    with stores_in_use(cfg.runtime.runs_root):
        prepared = stage0(cfg).whole_split(cfg.trial, cfg.refine.needs_features,
                                           cfg.runtime.device)
        trial = restored_trial(prepared, (cfg.trial, cfg.refine), pair[0], pair[1],
                               Path(match.iloc[0].checkpoint), cfg.search.rank_epoch,
                               cfg.runtime.device)
        return export_labels(trial.pseudo_labels(), out), pair[0], pair[1]


def search_folder(cfg: Config) -> Path:
    return cfg.runtime.runs_root / cfg.name


STATE_FILE = "search.json"
LOCK_FILE = ".search.lock"  # held by the search running in the folder (`tune.locking`)


def begin_search(cfg: Config, folder: Path, tracking_uri: str | None) -> dict[str, Any]:
    """A new search: its folder, MLflow parent run and the state a resume needs (atomic)."""
    if (folder / STATE_FILE).exists():
        raise UserError(f"search folder {folder} already holds a search: resume it with "
                        f"--resume {folder}, or give this one another name (--set name=...)")
    folder.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or tracking.default_uri(cfg.runtime.runs_root)
    config = cfg.model_dump(mode="json")
    seeds = {"classifier": cfg.classifier.seed, "trial": cfg.trial.seed,
             "search": cfg.search.seed}
    method = cfg.refine.method  # the other refiners' sections would be noise among the params
    logged = {**config, "refine": {k: v for k, v in config["refine"].items()
                                   if k in ("method", method)}}
    # the first search under a runs root creates its MLflow database; two at once would race
    with locking.held(cfg.runtime.runs_root / ".mlflow.lock"):
        parent = tracking.start_parent(uri, cfg.name, logged,
                                       tracking.provenance(seeds, digest(config)))
    state = {"config": config, "tracking_uri": uri, "parent_run_id": parent}
    try:
        write_json_atomic(folder / STATE_FILE, state)
    except BaseException:  # no search began: its parent run must not stay RUNNING
        tracking.finish(uri, parent, "KILLED")
        raise
    return state


def load_state(folder: Path) -> dict[str, Any]:
    """What `run_search` recorded when it began: config, tracking URI, parent run id."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not a search folder ({STATE_FILE} not found)")
    return json.loads(path.read_text())


def saved_config(folder: Path) -> Config:
    """The config a search in ``folder`` was started with."""
    return Config.model_validate(load_state(folder)["config"])


def _folders(cfg: Config, folder: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """What every node of a cluster must read at the same path (`tune.cluster`): the folders
    trials write or that grow (shared), and the dataset (shared or copied)."""
    return ({"search folder": folder, "stores folder": cfg.runtime.runs_root / "stores"},
            {"data.root": cfg.data.root})


@contextmanager
def ray_session(address: str | None, uri: str, parent: str,
                shared: dict[str, Path] | None = None,
                present: dict[str, Path] | None = None) -> Iterator[None]:
    """One stage's Ray session: a local cluster unless ``address`` (or ``RAY_ADDRESS``) names
    one, whose nodes must then all read the ``shared`` folders, find the ``present`` ones and
    reach ``uri`` (checked before any trial starts); afterwards every child run a stopped trial
    left RUNNING is closed, and a local Ray's session folder is removed (kept, and named, when
    the stage failed)."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # docs/search.md: resume loses no trial
    # frequent experiment snapshots are deliberate (they make resume exact): no warning for them
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our progress lines replace Ray's tables
    address = cluster.resolve_address(address)
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
        if address is not None:
            cluster.check_cluster(shared or {}, uri, present=present)
        yield
        failed = False
    except KeyboardInterrupt:
        failed = False  # nothing in Ray's logs explains an interrupt
        raise
    finally:
        ray.shutdown()
        tracking.close_children(uri, parent, interrupted=interrupts.received() is not None)
        if session_dir and not failed:  # a local Ray's logs (tens of MB a search) go with it
            shutil.rmtree(session_dir, ignore_errors=True)
        elif session_dir:
            log.warning("Ray's logs of this failed stage are kept in %s", session_dir)


def check_models(cfg: Config) -> None:
    """Build every model a weights file or a model name is given for, so that a wrong name or
    file fails now, not after stage 0 or 1 has trained something."""
    if cfg.import_cams is None:  # else no classifier is trained
        cfg.classifier.backbone()
    if cfg.trial.backbone is not None and cfg.trial.backbone_weights is not None:
        create_backbone(cfg.trial.backbone, cfg.trial.output_stride, cfg.trial.backbone_weights,
                        keys=("trial.backbone", "trial.backbone_weights"))
    if cfg.search.stage2:
        build_model(cfg.segmentation, num_classes=2)  # the class count does not matter here


def run_search(cfg: Config, *, address: str | None = None, tracking_uri: str | None = None,
               resume: bool = False) -> dict[str, Any]:
    """The whole search: stage 0, stage 1, promotion to ``candidates.json``, stage 2 (unless
    ``search.stage2`` is off) and selection, in the search folder; an MLflow parent run for the
    search with a child per trial. ``resume`` continues a search that was killed: finished
    trials are not rerun, stopped ones continue from their checkpoint."""
    if (cluster_address := cluster.resolve_address(address)) is not None:
        cluster.connect(cluster_address)  # a wrong address or token fails now, not after stage 0
        ray.shutdown()
    cfg.refine.check_available()  # a missing optional package fails now, not in every trial
    output_folder(cfg.runtime.runs_root, "runtime.runs_root")  # writable, before any work
    check_models(cfg)
    folder = search_folder(cfg)
    if resume:  # a wrong folder fails here, before anything is created in it
        tracking.check_reachable(load_state(folder)["tracking_uri"])
    else:
        tracking.check_reachable(tracking_uri or "")
        folder.mkdir(parents=True, exist_ok=True)
    with (stores_in_use(cfg.runtime.runs_root),
          locking.held(folder / LOCK_FILE, f"search folder {folder}")):
        return _run_search(cfg, folder, address, tracking_uri, resume)


def _run_search(cfg: Config, folder: Path, address: str | None, tracking_uri: str | None,
                resume: bool) -> dict[str, Any]:
    state = load_state(folder) if resume else begin_search(cfg, folder, tracking_uri)
    uri, parent = state["tracking_uri"], state["parent_run_id"]
    if resume:
        tracking.reopen(uri, parent)
    status, phase, selection = "FAILED", "stage 0", None
    try:
        if cfg.runtime.progress:
            say(f"stage 0: data, classifier, CAMs and frozen features (cached in "
                f"{cfg.runtime.runs_root / 'stores'})")
        prepared = stage0(cfg)
        state["stores"] = sorted(p.name for p in prepared.cached)  # what `wsss-tune gc` keeps
        write_json_atomic(folder / STATE_FILE, state)
        phase = "stage 1"
        with ray_session(address, uri, parent, *_folders(cfg, folder)):
            table, curves = run_stage1(cfg, prepared, folder, uri, parent, resume=resume)
        write_csv_atomic(table, folder / "stage1.csv")
        write_csv_atomic(curves, folder / "stage1_epochs.csv")
        search = cfg.search
        candidates = promote(table, k=search.top_k, policy=search.policy,
                             epochs=cfg.refine.reports)
        summary = {"objective": search.objective, "policy": search.policy,
                   "top_k": search.top_k, "mlflow_parent_run_id": parent,
                   "candidates": candidates[["bg", "fg", "objective", "trial_id",
                                             "mlflow_run_id"]].to_dict(orient="records")}
        write_json_atomic(folder / "candidates.json", summary)
        if search.stage2:
            phase = "stage 2"
            with ray_session(address, uri, parent, *_folders(cfg, folder)):
                candidates, seg_curves = run_stage2(cfg, candidates, prepared, folder, uri,
                                                    parent)
            write_csv_atomic(candidates.drop(columns=["checkpoint"]), folder / "stage2.csv")
            write_csv_atomic(seg_curves, folder / "stage2_epochs.csv")
        phase = "selection"
        selection = write_selection(cfg, folder, candidates, search.pick, search.policy)
        tracking.record_selection(uri, parent, selection, table, candidates,
                                  finished_pairs(table, cfg.refine.reports))
        report = finish_report(folder, uri, parent, cfg.runtime.progress)
        tracking.log_artifacts(uri, parent, [folder / n for n in (
            "stage1.csv", "stage1_epochs.csv", "candidates.json", "stage2.csv",
            "stage2_epochs.csv", "selection.json", "thresholds.yaml")])
        status = "FINISHED"
    except UserError:
        if phase == "stage 0" and not resume:  # no trial ran: the corrected command, not a
            (folder / STATE_FILE).unlink()     # resume of this bad config, starts afresh
        raise
    except KeyboardInterrupt as e:  # Ctrl-C, or a stop signal (`tune.interrupts`)
        status, signum = "KILLED", getattr(e, "signum", signal.SIGINT)
        done = ("its pair is selected (selection.json), its report and MLflow records are not "
                "finished" if selection is not None else "nothing was selected from it")
        raise interrupts.Interrupted(signum, f"search {cfg.name} interrupted "
                                     f"({signal.Signals(signum).name}) in {phase}: {done}; "
                                     f"continue it with: wsss-tune search --resume "
                                     f"{folder}") from None
    finally:
        tracking.finish(uri, parent, status)
    return {"table": table, "candidates": candidates, "selection": selection, "folder": folder,
            "tracking_uri": uri, "parent_run_id": parent, "report": report}


def finish_report(folder: Path, uri: str, parent: str, progress: bool) -> Path:
    """The search's HTML report (`tune.report`), also logged under the parent run's
    ``report/`` artifacts."""
    from tune.report import write_report

    if progress:
        say("writing the report ...")
    index = write_report(folder)
    tracking.log_folder(uri, parent, index.parent, "report")
    return index
