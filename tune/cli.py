"""``wsss-tune``: the thin command-line front end.

Each command parses flags, loads the config and calls one library function. User errors
(`wsss.errors.UserError`) print one line naming the file or field and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import pandas as pd

from wsss.errors import UserError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True,
                   help="YAML file, or the name of a packaged config (demo, ci, voc_paper)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set classifier.epochs=3 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsss-tune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    return parser


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


def cmd_surface(args: argparse.Namespace) -> None:
    import torch

    from tune.config import load_config
    from tune.space import grid_pairs
    from wsss.pipeline import initial_surface, prepare
    from wsss.store import write_csv_atomic

    cfg = load_config(args.config, args.overrides)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    start = time.perf_counter()
    cache = cfg.runtime.runs_root / "stores"
    prepared = prepare(cfg.data, cfg.classifier, cfg.cam, cache, device=cfg.runtime.device,
                       progress=cfg.runtime.progress)
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


COMMANDS = {"make-data": cmd_make_data, "surface": cmd_surface}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        COMMANDS[args.command](args)
    except UserError as e:
        print(f"wsss-tune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wsss-tune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
