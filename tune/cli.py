"""``wsss-tune``: the thin command-line front end.

Each command parses flags, loads the config and calls one library function. User errors
(`wsss.errors.UserError`) print one line naming the file or field and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import pandas as pd

from tune import interrupts
from tune.progress import pct
from tune.space import Pair, Space
from wsss.errors import UserError

if TYPE_CHECKING:
    from tune.config import Config, SearchConfig
    from tune.search import SearchResult
    from wsss.data import SegDataset
    from wsss.stage0 import Prepared


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True,
                   help="YAML file, or the name of a packaged config (demo, ci, voc_paper)")
    _set_arg(p)


def _set_arg(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE``: the one definition of the config override every config-loading
    command (surface, trial, search, demo) takes."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set classifier.epochs=3 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsss-tune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error or interrupt (one line without)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-data", help="write the synthetic dataset in VOC layout")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("surface", help="initial-region metrics (NPR, mIoU, PQS) for every grid "
                                       "pair: data -> classifier -> CAM store -> one-pass surface")
    _config_args(p)
    p.add_argument("--out", type=Path,
                   help="CSV path (default: <runs_root>/<name>/surface_initial.csv)")

    p = sub.add_parser("trial", help="one (BG, FG) trial without Ray: the refiner "
                                     "(refine.method), pseudo-labels, TECM (+ PQS)")
    _config_args(p)
    p.add_argument("--bg", required=True, type=float, help="confident background: max score <= BG")
    p.add_argument("--fg", required=True, type=float, help="confident foreground: max score >= FG")
    p.add_argument("--export-labels", type=Path, metavar="DIR",
                   help="write the trial images' pseudo-labels as VOC palette PNGs")

    p = sub.add_parser("search", help="the two-stage search: TECM trials over (BG, FG) under "
                                      "Ray Tune, DeepLabv3+ on the top-k, selection")
    p.add_argument("--config", help="YAML file, or the name of a packaged config")
    p.add_argument("--data", type=Path, metavar="ROOT",
                   help="your VOC-layout dataset (sets data.root, drops data.synthetic)")
    p.add_argument("--space", choices=list(get_args(Space)),
                   help="search space (sets search.space)")
    _set_arg(p)
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue a killed search from its folder (its saved config is used)")
    _oracle_arg(p)
    _cluster_args(p)

    p = sub.add_parser("demo", help="the whole two-stage search on synthetic data (packaged "
                                    "config 'demo'), ending with the selected pair and its "
                                    "evidence")
    p.add_argument("--config", default="demo",
                   help="packaged config or YAML file (default demo; demo_hard: the harder "
                        "synthetic data)")
    _set_arg(p)
    _oracle_arg(p)
    _cluster_args(p)

    p = sub.add_parser("select", help="select again from a finished search (another promotion "
                                      "policy or pick rule) without training anything")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--policy", choices=["global", "per_bg"])
    p.add_argument("--pick", choices=["objective", "val_miou"])

    p = sub.add_parser("report", help="(re)write a search's HTML report: heatmaps over BG x FG, "
                                      "objective vs PQS / val mIoU statistics, learning "
                                      "curves, sample pseudo-labels; works on a partial search")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")

    p = sub.add_parser("analyze", help="how well one column ranks like another in any table "
                                       "(stage1.csv, stage2.csv, the paper's tables): Pearson, "
                                       "Spearman and Kendall with bootstrap 95%% intervals, "
                                       "RANSAC-filtered Pearson over many seeds")
    p.add_argument("table", type=Path, metavar="TABLE.csv")
    p.add_argument("--x", required=True, help="column: the proxy (e.g. tecm)")
    p.add_argument("--y", required=True, help="column: the target (e.g. pqs_avg, val_miou)")
    p.add_argument("--where", metavar="EXPR",
                   help="keep the rows where EXPR holds (pandas query, e.g. 'degenerate == 0')")
    p.add_argument("--seeds", type=int, default=200, help="RANSAC seeds (default 200)")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")

    p = sub.add_parser("export-labels", help="pseudo-labels of the whole train split for a "
                                             "searched pair (default: the selected one)")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--pair", type=_pair, metavar="BG,FG")

    p = sub.add_parser("predict", help="segment a folder of images with a finished search's "
                                       "DeepLabv3+ (the selected pair's by default) into VOC "
                                       "palette PNGs")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--images", required=True, type=Path, metavar="DIR",
                   help="folder of .jpg / .jpeg / .png images")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="folder for the <stem>.png label maps (created)")
    p.add_argument("--pair", type=_pair, metavar="BG,FG",
                   help="another pair stage 2 trained (default: the selected one)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA when present (default)")

    p = sub.add_parser("gc", help="remove the stores and checkpoints no search of a runs root "
                                  "refers to, and what killed runs left behind")
    p.add_argument("runs_root", type=Path, nargs="?", default=Path("runs"), metavar="RUNS_ROOT",
                   help="the runtime.runs_root to collect (default: runs)")
    p.add_argument("--dry-run", action="store_true", help="only print what would be removed")

    p = sub.add_parser("import-cams", help="import IRN / PuzzleCAM CAM .npy files into a CAM "
                                           "store that the later stages read")
    p.add_argument("--format", required=True, choices=["irn", "puzzlecam"])
    p.add_argument("--dir", required=True, type=Path, help="folder of <id>.npy CAM files")
    _dataset_args(p, split_default="train")
    p.add_argument("--out", type=Path, help="store folder (default: <DIR>/wsss-cam-store)")
    p.add_argument("--resolution", choices=["high", "strided"], default="high",
                   help="high: the image-size CAMs their evaluate scripts threshold (default); "
                        "strided: the stride-4 CAMs (a ~16x smaller store)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="the files are pickles, and loading them runs code stored in them: "
                        "pass this only for your own files")

    p = sub.add_parser("evaluate", help="mIoU of a folder of <id>.png label maps, as PuzzleCAM's "
                                        "or IRN's evaluate script computes it")
    p.add_argument("--pred", required=True, type=Path, help="folder of <id>.png predictions")
    _dataset_args(p, split_default=None)
    p.add_argument("--protocol", choices=["puzzlecam", "irn"], default="puzzlecam",
                   help="puzzlecam: 255 is a miss, mean over all classes (default); "
                        "irn: 255 counts as background, classes never seen are left out")
    p.add_argument("--json", action="store_true", help="print the fractions as JSON")
    return parser


def _oracle_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--oracle", action="store_true",
                   help="DeepLabv3+ on every finished non-degenerate pair, no early stopping "
                        "(sets search.top_k=all, search.scheduler=none): costly, but measures "
                        "the pick's true regret and how well each objective would have picked")


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="a running Ray cluster (auto or HOST:PORT; default: "
                                     "$RAY_ADDRESS, else a local Ray started for this search)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite store "
                                          "<runs_root>/mlflow.db)")


def _pair(text: str) -> Pair:
    try:
        bg, fg = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BG,FG such as 0.25,0.5, got {text!r}")
    return Pair(bg, fg)


def _dataset_args(p: argparse.ArgumentParser, split_default: str | None) -> None:
    """Where a VOC-layout split lives: the flags `SegDataset` takes."""
    p.add_argument("--data", required=True, type=Path, metavar="ROOT",
                   help="dataset root (VOC layout)")
    p.add_argument("--split", default=split_default, required=split_default is None,
                   help="split name: its ids are read from ImageSets/Segmentation/<split>.txt")
    p.add_argument("--mask-dir", default="SegmentationClass",
                   help="mask folder under ROOT (e.g. SegmentationClassAug)")
    p.add_argument("--split-file", type=Path, help="id list to use instead (relative to ROOT)")


def cmd_make_data(args: argparse.Namespace) -> None:
    from wsss.synthetic import generate

    start = time.perf_counter()
    root = generate(args.out, n_train=args.n_train, n_val=args.n_val, size=args.size,
                    classes=args.classes, seed=args.seed)
    print(f"wrote {args.n_train} train + {args.n_val} val images to {root} "
          f"in {time.perf_counter() - start:.1f} s")


def format_surface(surface: pd.DataFrame) -> str:
    """Human-facing table: percentages with a % sign, the best non-degenerate PQS marked."""
    table = pd.DataFrame({
        "BG": surface["bg"].map("{:.2f}".format),
        "FG": surface["fg"].map("{:.2f}".format),
        "NPR": surface["npr"].map("{:.2%}".format),
        "mIoU(non-neutral)": surface["miou_nn"].map("{:.2%}".format),
        "PQS": surface["pqs"].map("{:.2%}".format),
        "mIoU": surface["miou"].map("{:.2%}".format),
        "": ["degenerate" if d else "" for d in surface["degenerate"]],
    })
    usable = surface[surface["degenerate"] == 0]
    if len(usable):
        table.loc[usable["pqs"].idxmax(), ""] = "<- best PQS"
    return table.to_string(index=False)


@contextmanager
def _prepared(args: argparse.Namespace, features: bool) -> Iterator[tuple[Config, Prepared]]:
    """Load the config and run stage 0 (cached), holding its stores while the block runs: the
    shared start of surface and trial (``features``: the trial's, whose refiner's optional
    packages are checked first)."""
    import torch

    from tune.config import load_config, stage0, stores_in_use
    from wsss.files import output_folder

    cfg = load_config(args.config, args.overrides)
    if features:
        cfg.refine.check_available()
    output_folder(cfg.runtime.runs_root, "runtime.runs_root")  # writable, before any work
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    with stores_in_use(cfg.runtime.runs_root):
        yield cfg, stage0(cfg, features)


def cmd_surface(args: argparse.Namespace) -> None:
    from tune.space import grid_pairs
    from wsss.files import write_csv_atomic
    from wsss.stage0 import initial_surface

    start = time.perf_counter()
    with _prepared(args, features=False) as (cfg, prepared):
        t_prepare = time.perf_counter() - start
        pairs = grid_pairs(cfg.surface.space, cfg.surface.pairs)
        surface = initial_surface(prepared, pairs, cfg.data.eval_subset, cfg.runtime.progress)
    t_surface = time.perf_counter() - start - t_prepare
    out = args.out or cfg.runtime.runs_root / cfg.name / "surface_initial.csv"
    write_csv_atomic(surface, out)
    n = cfg.data.eval_subset or len(prepared.train)
    print(f"\nInitial confident regions on {min(n, len(prepared.train))} train images "
          f"({len(pairs)} pairs, space '{cfg.surface.space}')")
    m = prepared.stats.get("classifier_map")
    print(f"classifier {cfg.classifier.model}: val mAP "
          f"{'n/a (no val split)' if m is None else f'{m:.2%}'}")
    print(format_surface(surface))
    print(f"\nprepare {t_prepare:.1f} s, surface {t_surface:.2f} s; saved {out}")


TRIAL_COLUMNS = ("epoch", "affinity_loss", "tecm", "tecm_pooled", "npr_initial", "npr_pseudo",
                 "n_to_b", "n_to_f", "pqs_initial", "pqs_pseudo", "pqs_avg", "miou_pseudo")


def cmd_trial(args: argparse.Namespace) -> None:
    from wsss.files import output_folder
    from wsss.pseudo_labels import export_labels
    from wsss.regions import check_pair
    from wsss.trial import Trial, run_trial

    check_pair(args.bg, args.fg, where="--")
    if args.export_labels:
        output_folder(args.export_labels, "--export-labels")  # before stage 0 and the trial
    start = time.perf_counter()
    with _prepared(args, features=True) as (cfg, prepared):
        t_prepare = time.perf_counter() - start
        trial = Trial(prepared, cfg.trial, cfg.refine, args.bg, args.fg,
                      device=cfg.runtime.device)
        rows = []
        for metrics in run_trial(trial):
            rows.append(metrics)
            pqs = (f", PQS {metrics['pqs_initial']:.2%} -> {metrics['pqs_pseudo']:.2%}"
                   if "pqs_pseudo" in metrics else "")  # ground truth: validation only
            step = f"epoch {metrics['epoch']}" if trial.refiner.epochs else "refined"
            print(f"{step}: TECM {metrics['tecm']:.4f}{pqs}", flush=True)
        table = pd.DataFrame(rows)
        table = table[[c for c in TRIAL_COLUMNS if c in table]]
        print(f"\ntrial (BG, FG) = ({args.bg}, {args.fg}), refiner {cfg.refine.method}, on "
              f"{len(trial.images)} train images"
              f"{' (degenerate: no neutral pixel)' if rows[-1]['degenerate'] else ''}")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        if args.export_labels:
            n = export_labels(trial.pseudo_labels(), args.export_labels)
            print(f"wrote {n} pseudo-label PNGs to {args.export_labels}")
        print(f"prepare {t_prepare:.1f} s, trial {time.perf_counter() - start - t_prepare:.1f} s")


def cmd_search(args: argparse.Namespace) -> None:
    from tune.config import load_config
    from tune.folder import saved_config, search_folder
    from tune.search import run_search

    if args.resume is not None:
        given = [f for f, v in (("--config", args.config), ("--data", args.data),
                                ("--space", args.space), ("--set", args.overrides),
                                ("--oracle", args.oracle),
                                ("--tracking-uri", args.tracking_uri)) if v]
        if given:
            raise UserError(f"--resume continues a search with its saved config: drop "
                            f"{', '.join(given)}")
        cfg = saved_config(args.resume)
        if search_folder(cfg).resolve() != args.resume.resolve():
            raise UserError(f"{args.resume} was moved: its search was recorded at "
                            f"{search_folder(cfg)}")
    elif args.config is None:
        raise UserError("search needs --config (a new search) or --resume RUN_DIR")
    else:
        data = json.dumps(str(args.data))  # a path as is (YAML would read "2012" as a number)
        shortcuts = ([f"data.root={data}", "data.synthetic=null"] if args.data else []) + (
            [f"search.space={args.space}"] if args.space else []) + _oracle(args)
        cfg = load_config(args.config, [*shortcuts, *args.overrides])
    start = time.perf_counter()
    out = run_search(cfg, address=args.address, tracking_uri=args.tracking_uri,
                     resume=args.resume is not None)
    table = out.table
    print(f"\nstage 1: {len(table)} trials, objective {cfg.search.objective}")
    print(format_stage1(table))
    print_result(cfg, out, time.perf_counter() - start)


def format_stage1(table: pd.DataFrame) -> str:
    """Every stage-1 trial for people: epochs trained, objectives, NPR and PQS; a failed trial
    is marked (its epochs are those before the error; it is never ranked)."""
    from wsss.objectives import OBJECTIVES

    columns = [c for c in ("bg", "fg", "training_iteration", "objective", *OBJECTIVES,
                           "npr_initial", "npr_pseudo", "pqs_initial", "pqs_pseudo")
               if c in table]
    shown = table[columns].rename(columns={"training_iteration": "epochs"})
    if "failed" in table and table["failed"].any():
        shown[""] = table["failed"].map({1: "FAILED (not ranked)", 0: ""})
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def _oracle(args: argparse.Namespace) -> list[str]:
    return ["search.top_k=all", "search.scheduler=none"] if args.oracle else []


def _promoted(search: SearchConfig) -> str:
    """Which pairs stage 2 trains, for people."""
    return ("every finished pair (oracle)" if search.top_k == "all"
            else f"the {search.policy} top {search.top_k}")


def cmd_demo(args: argparse.Namespace) -> None:
    from tune.config import load_config
    from tune.search import run_search

    overrides = [*_oracle(args), *args.overrides]
    if not any(o.startswith("name=") for o in overrides):  # every demo is its own search
        overrides.insert(0, f"name={Path(args.config).stem.replace('_', '-')}-"
                            f"{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = load_config(args.config, overrides)
    search = cfg.search
    print(f"wsss-tune demo '{cfg.name}': synthetic data -> classifier + CAMs (stage 0, cached "
          f"after the first run) -> {search.objective} trials over (BG, FG), refiner "
          f"{cfg.refine.method}, on Ray Tune (stage 1, {search.space} space) -> DeepLabv3+ on "
          f"{_promoted(search)} (stage 2) -> selection", flush=True)
    start = time.perf_counter()
    out = run_search(cfg, address=args.address, tracking_uri=args.tracking_uri)
    print_result(cfg, out, time.perf_counter() - start)


def print_result(cfg: Config, out: SearchResult, seconds: float) -> None:
    """The short table of a finished search: each candidate's pair, objective, PQS and val
    mIoU, the pick against the best pair by val mIoU (the regret), and where to look next."""
    cands, sel = out.candidates, out.selection
    name = cfg.search.objective

    pick = (sel["pair"]["bg"], sel["pair"]["fg"])
    best = sel.get("best_by_val_miou")
    rows = []
    for r in cands.itertuples():
        marks = ["pick" if (r.bg, r.fg) == pick else "",
                 "best val mIoU" if best and (r.bg, r.fg) == (best["bg"], best["fg"]) else ""]
        rows.append({"BG": f"{r.bg:.2f}", "FG": f"{r.fg:.2f}", name.upper(): f"{r.objective:.4f}",
                     "PQS": pct(getattr(r, "pqs_avg", None)),
                     "val mIoU": pct(getattr(r, "val_miou", None)),
                     "": "<- " + ", ".join(m for m in marks if m) if any(marks) else ""})
    print(f"\ncandidates ({_promoted(cfg.search)}) by {name}:")
    print(pd.DataFrame(rows).to_string(index=False))
    note = "uses ground truth" if sel["uses_ground_truth"] else "no ground truth used"
    val = sel["metrics"].get("val_miou")
    rule = name if sel["pick"] == "objective" else "val mIoU"
    print(f"\nselected (BG, FG) = ({pick[0]:g}, {pick[1]:g}) by {rule} ({note})"
          + (f": val mIoU {pct(val)}" if val is not None else ""))
    if best:
        scope = (f"all {sel['regret_pairs']} finished pairs (oracle)"
                 if sel["regret_scope"] == "all" else
                 f"the {sel['regret_pairs']} promoted candidates only, not all searched pairs "
                 "(--oracle measures it over all)")
        print(f"best by val mIoU among {scope}: ({best['bg']:g}, {best['fg']:g}) "
              f"{pct(best['val_miou'])}; regret of the pick {100 * sel['regret_val_miou']:.2f} "
              f"points")
    if "evaluation" in sel:
        print("\n" + format_evaluation(sel["evaluation"]))
    print("PQS: mean of the initial regions' and the pseudo-labels' PQS on the trial images; "
          "PQS and val mIoU use ground truth (validation only, never the objective)")
    folder, uri = out.folder, out.tracking_uri
    files = [n for n in ("selection.json", "thresholds.yaml", "stage1.csv", "stage2.csv")
             if (Path(folder) / n).exists()]
    print(f"\nsearch folder: {folder}  ({', '.join(files)})")
    from tune.tracking import run_url

    print(f"report:        {out.report}")
    if uri.startswith("sqlite:"):
        mlflow = Path(sys.executable).with_name("mlflow")
        print(f"MLflow:        {mlflow} ui --backend-store-uri {uri}")
    print(f"               {run_url(uri, out.parent_run_id)}  (this search's parent run)")
    print(f"whole search:  {seconds // 60:.0f} min {seconds % 60:.0f} s")


def format_evaluation(evaluation: dict) -> str:
    """The oracle's verdict on each objective (and ground-truth proxy): the val mIoU of the pair
    it would pick, its regret against the best pair, and whether that pair is in its top k."""
    rows = [{"ranked by": name + (" (GT)" if q["uses_ground_truth"] else ""),
             "its pick": f"({q['pick']['bg']:.2f}, {q['pick']['fg']:.2f})",
             "val mIoU": pct(q["pick"][q["truth"]]), "regret": f"{100 * q['regret']:.2f} pts",
             **{f"best in top {k}": "yes" if hit else "no" for k, hit in q["recall"].items()}}
            for name, q in evaluation.items()]
    return ("oracle: how each ranking would have picked (GT = uses ground truth)\n"
            + pd.DataFrame(rows).to_string(index=False))


def cmd_select(args: argparse.Namespace) -> None:
    from tune.search import reselect

    selection, missing = reselect(args.run_dir, policy=args.policy, pick=args.pick)
    if missing:
        print("never reached stage 2 (no val mIoU): "
              + ", ".join(f"({bg:g}, {fg:g})" for bg, fg in missing))
    pair = selection["pair"]
    note = "uses ground truth" if selection["uses_ground_truth"] else "no ground truth used"
    print(f"selected (BG, FG) = ({pair['bg']:g}, {pair['fg']:g}) by {selection['pick']} "
          f"({note}), policy {selection['policy']}; written to {args.run_dir}/selection.json "
          f"(the MLflow parent run keeps the search's own pick; `wsss-tune report "
          f"{args.run_dir}` redraws the report for this one)")


def cmd_report(args: argparse.Namespace) -> None:
    from tune.folder import load_state
    from tune.report import write_report

    load_state(args.run_dir)  # a clear error when it is not a search folder
    print(f"wrote {write_report(args.run_dir)}")


def cmd_analyze(args: argparse.Namespace) -> None:
    from wsss.analysis import correlate

    try:
        table = pd.read_csv(args.table)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{args.table}: cannot read it as CSV ({e})") from None
    if args.where:
        try:
            table = table.query(args.where)
        except Exception as e:  # pandas raises many types for a bad expression
            raise UserError(f"--where {args.where!r}: {type(e).__name__}: {e}") from None
    for flag, column in (("--x", args.x), ("--y", args.y)):
        if column not in table:
            raise UserError(f"{flag} {column!r} is not a column of {args.table}; columns: "
                            f"{', '.join(map(str, table.columns))}")
        if not pd.api.types.is_numeric_dtype(table[column]):
            raise UserError(f"{flag} {column!r} in {args.table} is not numeric")
    stats = correlate(table[args.x].to_numpy(float), table[args.y].to_numpy(float),
                      x_name=args.x, y_name=args.y, ransac_seeds=args.seeds)
    if args.json:
        print(json.dumps(stats.as_dict(), indent=1))
        return
    print(format_correlation(stats, f"{args.table}" + (f" where {args.where}" if args.where
                                                         else "")))


def format_correlation(c, where: str) -> str:
    """One correlation for people: every statistic with its interval or p-value."""
    def ci(pair: tuple[float, float]) -> str:
        return f"[{pair[0]:.3f}, {pair[1]:.3f}]"

    return "\n".join([
        f"{c.x} vs {c.y}: {c.n} rows of {where}",
        f"  Pearson          {c.pearson:7.3f}   p = {c.pearson_p:.3g}",
        f"  Spearman         {c.spearman:7.3f}   p = {c.spearman_p:.3g}   95% CI "
        f"{ci(c.spearman_ci)} (bootstrap)",
        f"  Kendall tau-b    {c.kendall:7.3f}   p = {c.kendall_p:.3g}   95% CI "
        f"{ci(c.kendall_ci)} (bootstrap)",
        f"  RANSAC Pearson   {c.ransac_pearson:7.3f}   5-95% over {c.n_seeds} seeds "
        f"{ci(c.ransac_range)}, median {c.ransac_inliers:g} inliers of {c.n}"])


def cmd_export_labels(args: argparse.Namespace) -> None:
    from tune.search import export_run_labels

    n, pair = export_run_labels(args.run_dir, args.out, args.pair)
    print(f"wrote {n} pseudo-label PNGs of (BG, FG) = ({pair.bg:g}, {pair.fg:g}) to {args.out}")


def cmd_predict(args: argparse.Namespace) -> None:
    from tune.predict import predict_folder

    n, pair = predict_folder(args.run_dir, args.images, args.out, args.pair, args.device)
    print(f"wrote {n} label PNGs predicted by the DeepLabv3+ of (BG, FG) = "
          f"({pair.bg:g}, {pair.fg:g}) to {args.out}")


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def counted(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 'es' if word.endswith('h') else 's'}"


def cmd_gc(args: argparse.Namespace) -> None:
    from tune.cleanup import collect

    found = collect(args.runs_root, args.dry_run)
    root = args.runs_root
    for g in found.garbage:
        print(f"{megabytes(g.size):>12}  {g.path.relative_to(root)}  ({g.why})")
    total = sum(g.size for g in found.garbage)
    done = "would free" if args.dry_run else "freed"
    print(f"{done} {megabytes(total)} in {counted(len(found.garbage), 'item')} of {root}; "
          f"kept {counted(len(found.kept_stores), 'store')} of "
          f"{counted(len(found.searches), 'search')}"
          + (" (dry run: nothing removed)" if args.dry_run else ""))
    if found.unknown:
        print("kept every store: " + ", ".join(map(str, found.unknown)) + " do not record "
              "which stores they use (made by an older wsss-tune): delete those searches to "
              "collect the stores")


def _dataset(args: argparse.Namespace) -> SegDataset:
    from wsss.data import SegDataset

    return SegDataset(args.data, args.split, mask_dir=args.mask_dir, split_file=args.split_file)


def cmd_import_cams(args: argparse.Namespace) -> None:
    from wsss.interop import import_cams

    data = _dataset(args)
    out = args.out or args.dir / "wsss-cam-store"
    store = import_cams(args.format, args.dir, data, out, allow_pickle=args.allow_pickle,
                        resolution=args.resolution)
    print(f"{store.path}: {len(store)} images of split {data.split}, {data.num_classes} classes "
          f"(background included), {args.resolution}-resolution {args.format} CAMs")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from wsss.interop import evaluate_folder

    result = evaluate_folder(args.pred, _dataset(args), args.protocol)
    if args.json:
        print(json.dumps(result, indent=1))
        return

    width = max(map(len, result["iou"]))
    print(f"{result['n_images']} images, {result['protocol']} protocol")
    for name, value in result["iou"].items():
        print(f"{name:>{width}}  {pct(value):>7}")
    print(f"{'mIoU':>{width}}  {pct(result['miou']):>7}")


COMMANDS = {"make-data": cmd_make_data, "surface": cmd_surface, "trial": cmd_trial,
            "search": cmd_search, "demo": cmd_demo, "select": cmd_select, "report": cmd_report,
            "analyze": cmd_analyze, "export-labels": cmd_export_labels, "predict": cmd_predict,
            "import-cams": cmd_import_cams, "evaluate": cmd_evaluate, "gc": cmd_gc}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # their INFO lines (database migrations) are no news to a user;
        # MLflow sets its loggers' level from this variable when it is imported
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("timm").setLevel(logging.WARNING)  # "Loading pretrained weights"
    interrupts.install()  # Ctrl-C and SIGTERM: one line and 130 / 143, never a dump
    try:
        COMMANDS[args.command](args)
    except UserError as e:
        if args.debug:
            raise
        print(f"wsss-tune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"wsss-tune: {str(e) or f'interrupted ({signal.Signals(signum).name})'}",
              file=sys.stderr)
        return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
