"""The visual evidence of one search: ``write_report(folder)`` turns a search folder's tables into
``report/index.html`` with PNG figures beside it.

It reads only the search folder's files (and, for the sample images, the cached stage-0 stores),
so it runs after any stage, on any machine that sees the folder: what is missing is said, never
guessed. Figures are drawn on `matplotlib.figure.Figure` objects (the Agg canvas, no pyplot state:
safe in a search's driver and in threads), and every file is written atomically, so a browser open
on the report never shows half a file. Units follow docs/definitions.md: fractions are shown
as percentages only for PQS / mIoU / NPR; objectives (TECM in [0, 2]) as plain 4-decimal numbers.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator, PercentFormatter

from wsss.analysis import GROUND_TRUTH_PROXIES, RANSAC_MIN_POINTS, correlate, finished_pairs
from wsss.data import IGNORE
from wsss.errors import UserError
from wsss.files import atomic_write_bytes, voc_palette, write_json_atomic
from wsss.objectives import OBJECTIVES
from wsss.regions import host

log = logging.getLogger("tune")
GRID_MAX_BG = 15  # more distinct BG values than this: a sampled space, drawn as a BG-FG scatter
TARGETS = ("pqs_avg", "pqs_pseudo", "miou_pseudo", "val_miou")
GT_HEATMAPS = ("pqs_initial", "pqs_pseudo", "pqs_avg", "val_miou")
SAMPLE_CANDIDATES = 3
RANSAC_SEEDS = 100  # per (proxy, target) at the end of every search: sklearn's RANSAC is ~7 ms
# a seed; `wsss-tune analyze` uses 200
PICK, PROMOTED, OTHER = "#d62728", "#1f77b4", "#9a9a9a"
NEUTRAL_RGB = (230, 230, 230)  # 255 (neutral / ignore) in the sample images: light grey
NAMES = {"tecm": "TECM", "tecm_pooled": "TECM pooled", "pqs_avg": "PQS avg",
         "pqs_initial": "PQS initial", "pqs_pseudo": "PQS pseudo", "miou_pseudo": "mIoU pseudo",
         "val_miou": "val mIoU", "objective": "objective"}


# ---- formatting ---------------------------------------------------------------------------------
def is_percent(metric: str) -> bool:
    """PQS, mIoU and NPR are fractions shown as percentages; objectives are plain numbers."""
    return metric.startswith(("pqs", "miou", "npr", "val_miou"))


def label(metric: str) -> str:
    return NAMES.get(metric, metric)


def fmt(metric: str, value: Any) -> str:
    """A metric as printed in the HTML: ``f"{v:.2%}"`` for fractions, ``f"{v:.4f}"`` else."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{float(value):.2%}" if is_percent(metric) else f"{float(value):.4f}"


def pair_text(bg: float, fg: float) -> str:
    """(BG, FG) with 2 decimals (grids), or 4 where a sampled value needs them."""
    digits = 2 if all(abs(v * 100 - round(v * 100)) < 1e-6 for v in (bg, fg)) else 4
    return f"({bg:.{digits}f}, {fg:.{digits}f})"


def _key(bg: Any, fg: Any) -> tuple[float, float]:
    """A pair as a lookup key: CSV and JSON round-trips may differ in the last float bit."""
    return round(float(bg), 6), round(float(fg), 6)


def _e(text: Any) -> str:
    return html.escape(str(text))


# ---- inputs -------------------------------------------------------------------------------------
@dataclass
class Evidence:
    """A search folder's files, each None when absent, and what the sections derive from them."""

    folder: Path
    state: dict[str, Any] | None = None  # search.json
    stage1: pd.DataFrame | None = None  # with val_miou / stage2_failed merged in from stage2
    stage1_epochs: pd.DataFrame | None = None
    candidates: dict[str, Any] | None = None
    stage2: pd.DataFrame | None = None
    stage2_epochs: pd.DataFrame | None = None
    selection: dict[str, Any] | None = None
    unreadable: list[str] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        return (self.state or {}).get("config") or {}

    @property
    def name(self) -> str:
        return self.config.get("name") or self.folder.name

    @property
    def objective(self) -> str:
        """The driving objective's name (selection, then candidates, then config)."""
        for source in (self.selection, self.candidates, self.config.get("search")):
            if source and source.get("objective"):
                return source["objective"]
        return "tecm"

    @property
    def refiner(self) -> str:
        """The refiner the search ran (``refine.method``)."""
        return (self.config.get("refine") or {}).get("method", "refiner")

    @property
    def epochs(self) -> int | None:
        """Reports of a full stage-1 trial (fewer: ASHA stopped it): its refiner's epochs."""
        from wsss.refine import RefineSpec

        refine = self.config.get("refine")
        epochs = None if refine is None else RefineSpec.model_validate(refine).reports
        if epochs is None and self.stage1 is not None and "training_iteration" in self.stage1:
            epochs = self.stage1["training_iteration"].max()
        return None if epochs is None or pd.isna(epochs) else int(epochs)

    @property
    def pick(self) -> tuple[float, float] | None:
        return None if not self.selection else _key(**self.selection["pair"])

    @property
    def promoted(self) -> list[tuple[float, float]]:
        """The candidates in promotion order (candidates.json, else stage2.csv)."""
        if self.candidates:
            return [_key(c["bg"], c["fg"]) for c in self.candidates.get("candidates", [])]
        if self.stage2 is not None:
            return [_key(b, f) for b, f in zip(self.stage2.bg, self.stage2.fg)]
        return []

    @property
    def has_val(self) -> bool:
        return self.stage1 is not None and "val_miou" in self.stage1 and bool(
            self.stage1["val_miou"].notna().any())

    def finished(self) -> pd.DataFrame:
        """The pairs statistics count (`wsss.analysis.finished_pairs`)."""
        return finished_pairs(self.stage1, self.epochs)

    def status(self) -> pd.DataFrame:
        """Per stage-1 row: degenerate, failed, stopped early, promoted, pick (booleans)."""
        t = self.stage1
        promoted, pick, epochs = set(self.promoted), self.pick, self.epochs
        keys = [_key(b, f) for b, f in zip(t.bg, t.fg)]
        trained = t.get("training_iteration", pd.Series(epochs, index=t.index))
        degenerate = t.get("degenerate", pd.Series(0, index=t.index)).fillna(0) != 0
        failed = t.get("failed", pd.Series(0, index=t.index)).fillna(0) != 0
        stopped = (trained < epochs) if epochs is not None else False
        return pd.DataFrame({
            "degenerate": degenerate, "failed": failed & ~degenerate,
            "stopped": stopped & ~degenerate & ~failed,  # each row in at most one of the three
            "promoted": [k in promoted for k in keys],
            "pick": [k == pick for k in keys]}, index=t.index)


def _read(folder: Path, name: str, unreadable: list[str]) -> Any:
    """A CSV as a DataFrame or a JSON file as a dict; None when absent or unreadable (noted)."""
    path = folder / name
    if not path.is_file():
        return None
    try:
        if name.endswith(".csv"):
            table = pd.read_csv(path)
            for col in ("bg", "fg"):
                if col in table:
                    table[col] = table[col].astype(float).round(6)
            return table
        return json.loads(path.read_text())
    except (OSError, ValueError, pd.errors.ParserError) as e:  # EmptyDataError is a ValueError
        unreadable.append(f"{name} is unreadable ({type(e).__name__}: {e})")
        return None


def load(folder: Path) -> Evidence:
    """Every input of the report; stage 2's val mIoU joined onto the stage-1 rows by pair."""
    folder = Path(folder)
    ev = Evidence(folder)
    for attr, name in (("state", "search.json"), ("stage1", "stage1.csv"),
                       ("stage1_epochs", "stage1_epochs.csv"), ("candidates", "candidates.json"),
                       ("stage2", "stage2.csv"), ("stage2_epochs", "stage2_epochs.csv"),
                       ("selection", "selection.json")):
        setattr(ev, attr, _read(folder, name, ev.unreadable))
    if ev.stage1 is not None and ev.stage2 is not None:
        extra = [c for c in ("val_miou", "stage2_failed") if c in ev.stage2]
        ev.stage1 = ev.stage1.drop(columns=extra, errors="ignore").merge(
            ev.stage2[["bg", "fg", *extra]].drop_duplicates(["bg", "fg"]), on=["bg", "fg"],
            how="left")
    return ev


def missing(ev: Evidence) -> list[str]:
    """What this report cannot show, and why (a partly finished search is a normal case)."""
    stage2_on = (ev.config.get("search") or {}).get("stage2", True)
    notes = list(ev.unreadable)
    if ev.state is None:
        notes.append("search.json missing: the config is unknown")
    if ev.stage1 is None:
        notes.append("stage1.csv missing: stage 1 not finished")
    if ev.stage1_epochs is None:
        notes.append("stage1_epochs.csv missing: no stage-1 learning curves")
    if ev.candidates is None:
        notes.append("candidates.json missing: nothing promoted yet")
    if ev.stage2 is None:
        notes.append("stage2.csv missing: stage 2 " + (
            "not run / not finished" if stage2_on else "not run (search.stage2: false)"))
    elif ev.stage2_epochs is None:
        notes.append("stage2_epochs.csv missing: no stage-2 learning curves")
    if ev.selection is None:
        notes.append("selection.json missing: no pair selected yet")
    if ev.stage1 is not None and "pqs_avg" not in ev.stage1:
        notes.append("no ground truth on the train split: PQS unavailable")
    if ev.stage2 is not None and not ev.has_val:
        notes.append("no val mIoU (no val ground truth, or every stage-2 training failed)")
    return notes


# ---- files --------------------------------------------------------------------------------------
def _save(fig: Figure, out: Path, name: str) -> str:
    """Render ``fig`` to ``out/name`` atomically; returns the relative src for the HTML."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", pad_inches=0.1)
    atomic_write_bytes(out / name, buffer.getvalue())
    return name


def _light_grid(ax: Any) -> None:
    """A faint grid behind the data (by default it would cross the scatter points)."""
    ax.set_axisbelow(True)
    ax.grid(color="#eeeeee")


def _figure(src: str, caption: str, alt: str) -> str:
    return (f'<figure><img src="{_e(src)}" alt="{_e(alt)}">'
            f'<figcaption>{_e(caption)}</figcaption></figure>')


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """An HTML table; cells are escaped here, so callers pass plain text."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ---- 1. header ----------------------------------------------------------------------------------
def header_section(ev: Evidence) -> str:
    """The selected pair, by which rule, its numbers, the regret and what it is measured against."""
    items = []
    sel = ev.selection
    if sel:
        metrics = sel.get("metrics") or {}
        rule = (f"by {label(ev.objective)} (no ground truth used)" if sel.get("pick") != "val_miou"
                else "by val mIoU (uses ground truth)")
        value = metrics.get("objective", metrics.get(ev.objective))
        items.append(f"<b>selected (BG, FG) = {_e(pair_text(*ev.pick))}</b> {_e(rule)}; "
                     f"policy {_e(sel.get('policy', '?'))}; refiner {_e(ev.refiner)}")
        items.append(f"{_e(label(ev.objective))} {fmt(ev.objective, value)}, "
                     f"PQS avg {fmt('pqs_avg', metrics.get('pqs_avg'))}, "
                     f"val mIoU {fmt('val_miou', metrics.get('val_miou'))}")
        if sel.get("regret_val_miou") is not None:
            items.append(_regret_line(sel))
    else:
        items.append("<b>no pair selected yet</b>")
    notes = missing(ev)
    body = "".join(f"<li>{i}</li>" for i in items)
    gone = ("<p class='missing'>Missing:</p><ul class='missing'>"
            + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>") if notes else ""
    return (f"<h1>Search {_e(ev.name)}</h1><p class='caption'>What was picked, by which rule, "
            f"and how far it is from the best pair it could be compared with.</p>"
            f"<ul>{body}</ul>{gone}")


def _regret_line(sel: dict[str, Any]) -> str:
    n = sel.get("regret_pairs", len(sel.get("ranked") or []))
    best = sel.get("best_by_val_miou") or {}
    best_text = (f"best by val mIoU {pair_text(best['bg'], best['fg'])} "
                 f"{fmt('val_miou', best['val_miou'])}; " if best else "")
    if sel.get("regret_scope") == "all":
        scope = f"against all {n} finished pairs (oracle)"
    else:
        scope = (f"against the {n} promoted candidates only — run with the oracle "
                 f"(search.top_k: all) for the regret over all searched pairs")
    return _e(f"{best_text}regret of the pick {fmt('val_miou', sel['regret_val_miou'])} "
              f"(val mIoU points, best − pick), measured {scope}")


# ---- 2. heatmaps --------------------------------------------------------------------------------
def heatmap_metrics(ev: Evidence) -> list[str]:
    """Registered objectives present, then the ground-truth maps where known."""
    t = ev.stage1
    return [m for m in (*OBJECTIVES, *GT_HEATMAPS) if m in t and t[m].notna().any()]


def _gap(bg: float, fg: float) -> float:
    return round(fg - bg, 6)


def heatmap_figure(ev: Evidence, metric: str) -> Figure:
    """``metric`` over BG x FG: a grid with BG across and the neutral band's width FG - BG up
    (the paper's tables' layout: a grid's FG values lie on diagonals, which would leave most of
    a BG x FG image empty), or a BG-FG scatter for a sampled space. Degenerate pairs hatched
    (their TECM of 1 would look like the best region), early-stopped ones lighter with a dot,
    promoted ones dashed, the pick outlined in red."""
    t, st = ev.stage1, ev.status()
    value = t[metric].where(~st.degenerate & ~st.failed)
    finite = value[np.isfinite(value)]
    norm = Normalize(finite.min(), finite.max()) if len(finite) else Normalize(0, 1)
    if norm.vmin == norm.vmax:
        norm = Normalize(norm.vmin - 1e-3, norm.vmax + 1e-3)
    cmap = colormaps["viridis"].with_extremes(bad="white")
    bgs, gaps = sorted(t.bg.unique()), sorted({_gap(b, f) for b, f in zip(t.bg, t.fg)})
    grid = len(bgs) <= GRID_MAX_BG and len(gaps) <= GRID_MAX_BG
    width = max(4.6, 0.5 * len(bgs) + 1.8) if grid else 6.0
    height = max(3.4, 0.5 * len(gaps) + 2.0) if grid else 5.2
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.subplots()
    if grid:
        mappable = _grid_cells(ax, t, st, value, bgs, gaps, cmap, norm, metric)
    else:
        mappable = _scatter_cells(ax, t, st, value, bgs, sorted(t.fg.unique()), cmap, norm)
    bar = fig.colorbar(mappable, ax=ax, shrink=0.9)
    bar.set_label(label(metric) + (" (%)" if is_percent(metric) else ""))
    if is_percent(metric):
        bar.ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    driving = " (drives the search)" if metric == ev.objective else ""
    ax.set_title(f"{label(metric)}{driving}", fontsize=11)
    ax.set_xlabel("BG threshold")
    ax.set_ylabel("FG - BG (neutral band)" if grid else "FG threshold")
    handles = _status_legend(st, metric, grid)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(3, len(handles)),
               fontsize=7.5, frameon=False)
    return fig


def _status_legend(st: pd.DataFrame, metric: str, grid: bool) -> list[Any]:
    """Legend entries for the marks a heatmap (``grid``) or a BG-FG scatter actually shows."""
    def mark(**kw: Any) -> Line2D:
        return Line2D([], [], ls="", **kw)

    shown = [
        (st.degenerate.any(), "degenerate (no neutral pixel)",
         Patch(facecolor="#f2f2f2", edgecolor="#888", hatch="///") if grid
         else mark(marker="x", color="#888")),
        (st.failed.any(), "failed", Patch(facecolor="#f2f2f2", edgecolor="#888", hatch="xx")
         if grid else mark(marker="x", color="#888")),
        (st.stopped.any() and metric != "val_miou", "stopped early (ASHA)",
         mark(marker="o", color="black", ms=3) if grid else mark(marker="o", color=OTHER, ms=4)),
        (st.promoted.any(), "promoted", Patch(fill=False, edgecolor="black", ls="--") if grid
         else mark(marker="o", mfc="white", mec="black", ms=7)),
        (st.pick.any(), "pick", Patch(fill=False, edgecolor=PICK, lw=2.5) if grid
         else mark(marker="o", mfc="none", mec=PICK, mew=2.5, ms=11)),
        (grid, "blank: not run" + (" / not promoted" if metric == "val_miou" else ""),
         Patch(facecolor="white", edgecolor="#ccc"))]
    handles = []
    for show, text, handle in shown:
        if show:
            handle.set_label(text)
            handles.append(handle)
    return handles


def _grid_cells(ax, t, st, value, bgs, gaps, cmap, norm, metric):
    """One cell per (BG, FG) of the grid, at (BG, FG - BG), annotated with its value."""
    ix = {v: i for i, v in enumerate(bgs)}
    iy = {v: i for i, v in enumerate(gaps)}
    z = np.full((len(gaps), len(bgs)), np.nan)
    for (bg, fg), v in zip(zip(t.bg, t.fg), value):
        z[iy[_gap(bg, fg)], ix[bg]] = v
    image = ax.imshow(np.ma.masked_invalid(z), origin="lower", cmap=cmap, norm=norm,
                      aspect="auto", interpolation="nearest")
    small = 6.5 if len(bgs) > 9 else 7.5
    for r, s, v in zip(t.itertuples(), st.itertuples(), value):
        x, y = ix[r.bg], iy[_gap(r.bg, r.fg)]
        if s.degenerate or s.failed:
            ax.add_patch(Rectangle((x - .5, y - .5), 1, 1, facecolor="#f2f2f2", edgecolor="#888",
                                   hatch="///" if s.degenerate else "xx", lw=0))
        elif np.isfinite(v):
            if s.stopped and metric != "val_miou":
                ax.add_patch(Rectangle((x - .5, y - .5), 1, 1, color="white", alpha=0.5, lw=0))
                ax.plot(x - .36, y + .3, "o", color="black", ms=2.5)
            rgb = cmap(norm(v))[:3]
            dark = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.5 and not s.stopped
            text = f"{v * 100:.1f}" if is_percent(metric) else f"{v:.4f}"
            ax.text(x, y, text, ha="center", va="center", fontsize=small,
                    color="white" if dark else "black")
        if s.promoted:
            ax.add_patch(Rectangle((x - .46, y - .46), .92, .92, fill=False, edgecolor="black",
                                   ls="--", lw=1))
        if s.pick:
            ax.add_patch(Rectangle((x - .5, y - .5), 1, 1, fill=False, edgecolor=PICK, lw=3))
    ax.set_xticks(range(len(bgs)), [f"{v:g}" for v in bgs],
                  rotation=45 if len(bgs) > 10 else 0)
    ax.set_yticks(range(len(gaps)), [f"+{v:g}" for v in gaps])
    ax.set_xticks(np.arange(-.5, len(bgs)), minor=True)
    ax.set_yticks(np.arange(-.5, len(gaps)), minor=True)
    ax.grid(which="minor", color="#dddddd", lw=0.6)
    ax.tick_params(which="minor", length=0)
    return image


def _scatter_cells(ax, t, st, value, bgs, fgs, cmap, norm):
    """A sampled space (no grid): one point per pair at its (BG, FG), coloured by the value."""
    ok = np.isfinite(value) & ~st.degenerate & ~st.failed
    full = ok & ~st.stopped
    points = ax.scatter(t.bg[full], t.fg[full], c=value[full], cmap=cmap, norm=norm, s=46,
                        edgecolors=np.where(st.promoted[full], "black", "none"))
    early = ok & st.stopped
    ax.scatter(t.bg[early], t.fg[early], c=value[early], cmap=cmap, norm=norm, s=22, alpha=0.5)
    bad = st.degenerate | st.failed
    ax.scatter(t.bg[bad], t.fg[bad], marker="x", color="#888", s=22)
    ax.scatter(t.bg[st.pick], t.fg[st.pick], s=190, facecolors="none", edgecolors=PICK, lw=2.5)
    lo, hi = min(bgs[0], fgs[0]), max(bgs[-1], fgs[-1])
    ax.plot([lo, hi], [lo, hi], ls=":", color="#999", lw=1)  # BG = FG: no neutral band
    _light_grid(ax)
    return points


def heatmap_section(ev: Evidence, out: Path) -> str:
    if ev.stage1 is None:
        return "<h2>Heatmaps</h2><p class='missing'>stage1.csv missing: nothing to map.</p>"
    figures = []
    for metric in heatmap_metrics(ev):
        src = _save(heatmap_figure(ev, metric), out, f"heatmap_{metric}.png")
        note = (" Only promoted pairs have a val mIoU; other cells are blank."
                if metric == "val_miou" else "")
        figures.append(_figure(src, f"{label(metric)} of every searched pair.{note}",
                               f"heatmap of {metric}"))
    return ("<h2>The searched pairs</h2><p class='caption'>Where the good pairs lie, and whether "
            "the objective's bright region (first maps) is also PQS's and val mIoU's. Hatched: "
            "degenerate (its TECM of 1 is not a good score); lighter with a dot: stopped early by "
            "ASHA (its value is from an earlier epoch); dashed: promoted; red: the pick.</p>"
            f"<div class='figs'>{''.join(figures)}</div>")


# ---- 3. proxies against targets -----------------------------------------------------------------
def statistics(ev: Evidence) -> dict[tuple[str, str], Any]:
    """`wsss.analysis.correlate` for every (proxy, target) present, over the finished pairs;
    computed once and shared by the scatters and the table (RANSAC over seeds is slow)."""

    if ev.stage1 is None:
        return {}
    rows = ev.finished()
    proxies = [p for p in (*OBJECTIVES, *GROUND_TRUTH_PROXIES) if p in rows]
    return {(p, t): correlate(rows[p], rows[t], x_name=p, y_name=t, ransac_seeds=RANSAC_SEEDS)
            for p in proxies for t in TARGETS if t in rows and t != p and rows[t].notna().any()
            and (p in OBJECTIVES or t == "val_miou")}  # GT proxies: against the final result


def _stats_text(c: Any) -> str:
    if c is None or not np.isfinite(c.spearman):
        return f"n = {0 if c is None else c.n}: too few pairs for statistics"
    return (f"n = {c.n}\nSpearman {c.spearman:.3f} [{c.spearman_ci[0]:.3f}, "
            f"{c.spearman_ci[1]:.3f}]\nKendall {c.kendall:.3f}\nPearson {c.pearson:.3f}\n"
            f"RANSAC-Pearson {c.ransac_pearson:.3f} [{c.ransac_range[0]:.3f}, "
            f"{c.ransac_range[1]:.3f}]")


def scatter_figure(ev: Evidence, proxy: str, targets: Sequence[str],
                   stats: dict[tuple[str, str], Any]) -> Figure:
    """``proxy`` against each target over the finished pairs, statistics in the panel."""
    rows = ev.finished()
    st = ev.status().loc[rows.index]
    fig = Figure(figsize=(5.0 * len(targets), 5.0), layout="constrained")
    for ax, target in zip(np.atleast_1d(fig.subplots(1, len(targets))), targets):
        known = rows[target].notna()
        x, y = rows[proxy][known], rows[target][known]
        promoted, pick = st.promoted[known], st.pick[known]
        for rows_in, style in ((~promoted, {"s": 28, "color": OTHER, "label": "finished pair"}),
                               (promoted & ~pick, {"s": 40, "color": PROMOTED,
                                                   "label": "promoted"}),
                               (pick, {"s": 170, "marker": "*", "color": PICK, "label": "pick",
                                       "zorder": 3})):
            if rows_in.any():
                ax.scatter(x[rows_in], y[rows_in], **style)
        ax.set_title(_stats_text(stats.get((proxy, target))), loc="left", fontsize=8,
                     family="monospace")
        ax.margins(0.08)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set_xlabel(label(proxy))
        ax.set_ylabel(f"{label(target)} (%)")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        _light_grid(ax)
        ax.legend(loc="best", fontsize=8)
    return fig


def _left_out(ev: Evidence) -> str:
    """How many stage-1 pairs the statistics leave out, and why."""
    st, n = ev.status(), len(ev.stage1)
    kept = len(ev.finished())
    reasons = [f"{int(c.sum())} {what}" for c, what in (
        (st.degenerate, "degenerate"), (st.failed, "failed"),
        (st.stopped, "stopped early by ASHA")) if c.any()]
    left = f"; {n - kept} left out: {', '.join(reasons)}" if n > kept else ""
    return f"{kept} of {n} stage-1 pairs count (trained every epoch, not degenerate){left}."


def proxy_section(ev: Evidence, stats: dict[tuple[str, str], Any], out: Path) -> str:
    title = "<h2>Does the objective rank pairs like the ground truth?</h2>"
    if ev.stage1 is None:
        return title + "<p class='missing'>stage1.csv missing.</p>"
    targets = [t for t in ("pqs_avg", "val_miou") if any(k[1] == t for k in stats)]
    if not targets:
        return title + "<p class='missing'>No ground truth: nothing to compare the objectives " \
                       "with.</p>"
    figures = []
    for proxy in (p for p in OBJECTIVES if p in ev.stage1):
        src = _save(scatter_figure(ev, proxy, targets, stats), out, f"scatter_{proxy}.png")
        figures.append(_figure(src, f"{label(proxy)} against "
                                    f"{' and '.join(label(t) for t in targets)} (val mIoU: "
                                    f"promoted pairs only).", f"scatter of {proxy}"))
    header = ["proxy", "target", "n", "Spearman [95% CI]", "Kendall [95% CI]", "Pearson (p)",
              "RANSAC-Pearson median [5–95%]"]
    rows = []
    for (p, t), c in stats.items():
        name = label(p) + (" (ground truth)" if p in GROUND_TRUTH_PROXIES else "")
        if not np.isfinite(c.spearman):
            rows.append([name, label(t), str(c.n), "too few pairs", "", "", ""])
            continue
        rows.append([name, label(t), str(c.n),
                     f"{c.spearman:.3f} [{c.spearman_ci[0]:.3f}, {c.spearman_ci[1]:.3f}]",
                     f"{c.kendall:.3f} [{c.kendall_ci[0]:.3f}, {c.kendall_ci[1]:.3f}]",
                     f"{c.pearson:.3f} ({c.pearson_p:.2g})",
                     f"{c.ransac_pearson:.3f} [{c.ransac_range[0]:.3f}, {c.ransac_range[1]:.3f}]"
                     if np.isfinite(c.ransac_pearson) else "–"])
    return (f"{title}<p class='caption'>A good objective puts the pairs in the same order as PQS "
            f"and val mIoU: look for a rising cloud and a Spearman CI well above 0. "
            f"{_e(_left_out(ev))}</p><div class='figs'>{''.join(figures)}</div>"
            f"<p class='caption'>Every objective against every ground-truth measure, and the "
            f"ground-truth proxies (validation only, never an objective) against val mIoU; "
            f"bootstrap 95% CIs, RANSAC-filtered Pearson over {RANSAC_SEEDS} seeds (median and "
            f"5-95% range; none below {RANSAC_MIN_POINTS} pairs).</p>{_table(header, rows)}")


# ---- 4-5. learning curves -----------------------------------------------------------------------
def stage1_curves_figure(ev: Evidence) -> tuple[Figure, int]:
    """The driving objective per epoch, one line per trial; returns the figure and how many
    degenerate trials were left out (their objective is 0 by rule)."""
    t = ev.stage1_epochs
    by = ["trial_id"] if "trial_id" in t else ["bg", "fg"]
    degenerate = (t.groupby(by)["degenerate"].transform("max") != 0 if "degenerate" in t
                  else pd.Series(False, index=t.index))
    n_degenerate = t[degenerate].groupby(by).ngroups
    t = t[~degenerate].sort_values("epoch").drop_duplicates([*by, "epoch"], keep="last")
    promoted, pick, epochs = set(ev.promoted), ev.pick, ev.epochs
    fig = Figure(figsize=(8, 4.6), layout="constrained")
    ax = fig.subplots()
    counts = {"other": 0, "promoted": 0, "stopped": 0}
    for _, trial in t.groupby(by):
        key = _key(trial.bg.iloc[0], trial.fg.iloc[0])
        role = "pick" if key == pick else "promoted" if key in promoted else "other"
        colour, width, z = {"pick": (PICK, 2.6, 3), "promoted": (PROMOTED, 1.8, 2),
                            "other": (OTHER, 1.0, 1)}[role]
        ax.plot(trial.epoch, trial.objective, color=colour, lw=width, zorder=z, marker=".",
                ms=4, alpha=1 if role != "other" else 0.7)
        last = trial.iloc[-1]
        if epochs is not None and last.epoch < epochs:
            ax.plot(last.epoch, last.objective, "x", color=colour, ms=8, mew=2, zorder=z)
            counts["stopped"] += 1
        if role == "pick":
            ax.annotate(pair_text(*key), (last.epoch, last.objective), color=PICK, fontsize=8,
                        xytext=(5, 0), textcoords="offset points", va="center")
        else:
            counts[role] += 1
    handles = [Line2D([], [], color=PICK, lw=2.6, label="pick"),
               Line2D([], [], color=PROMOTED, lw=1.8, label=f"promoted ({counts['promoted']})"),
               Line2D([], [], color=OTHER, lw=1, label=f"other trials ({counts['other']})")]
    if counts["stopped"]:
        handles.append(Line2D([], [], marker="x", ls="", color="black", mew=2,
                              label=f"stopped early by ASHA ({counts['stopped']})"))
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_xlabel(f"{ev.refiner} epoch")
    ax.set_ylabel(f"{label(ev.objective)} (driving objective)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _light_grid(ax)
    return fig, n_degenerate


def stage2_curves_figure(ev: Evidence) -> Figure:
    """Val mIoU (and the training loss) per DeepLabv3+ epoch, one line per candidate."""
    t = ev.stage2_epochs
    panels = [m for m in ("val_miou", "seg_loss") if m in t and t[m].notna().any()]
    fig = Figure(figsize=(5.4 * max(1, len(panels)), 4.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(1, len(panels))))
    runs = t.sort_values("epoch").groupby(["bg", "fg"])
    colours = [colormaps["tab10"](i % 10) if runs.ngroups <= 10 else OTHER
               for i in range(runs.ngroups)]
    for ax, metric in zip(axes, panels):
        for colour, ((bg, fg), run) in zip(colours, runs):
            pick = _key(bg, fg) == ev.pick
            ax.plot(run.epoch, run[metric], marker=".", lw=2.6 if pick else 1.3,
                    color=PICK if pick else colour, zorder=3 if pick else 1,
                    label=pair_text(bg, fg) + (" pick" if pick else ""))
        ax.set_xlabel("DeepLabv3+ epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _light_grid(ax)
        if is_percent(metric):
            ax.set_ylabel(f"{label(metric)} (%)")
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        else:
            ax.set_ylabel("segmentation loss")
        if runs.ngroups <= 12:  # beyond, a legend would hide the curves (the pick is red)
            ax.legend(fontsize=8, loc="best")
    return fig


def _has(table: pd.DataFrame | None, columns: Sequence[str]) -> bool:
    return table is not None and not table.empty and set(columns) <= set(table.columns)


def curves_section(ev: Evidence, out: Path) -> str:
    parts = ["<h2>Learning curves</h2>"]
    if not _has(ev.stage1_epochs, ("bg", "fg", "epoch", "objective")):
        parts.append("<p class='missing'>stage1_epochs.csv missing or empty: no stage-1 "
                     "curves.</p>")
    else:
        fig, n_degenerate = stage1_curves_figure(ev)
        src = _save(fig, out, "stage1_curves.png")
        left = f" {n_degenerate} degenerate trials (objective 0 by rule) are left out." \
            if n_degenerate else ""
        parts.append(_figure(src, "Stage 1: the driving objective per epoch; did the promoted "
                                  "pairs lead early, and did ASHA stop only weak trials?" + left,
                             "stage-1 learning curves"))
    if not _has(ev.stage2_epochs, ("bg", "fg", "epoch")):
        parts.append("<p class='missing'>stage2_epochs.csv missing or empty: no stage-2 "
                     "curves.</p>")
    else:
        src = _save(stage2_curves_figure(ev), out, "stage2_curves.png")
        parts.append(_figure(src, "Stage 2: DeepLabv3+ val mIoU per epoch for each candidate; "
                                  "has the ranking settled by the last epoch?",
                             "stage-2 learning curves"))
    return parts[0] + "<div class='figs'>" + "".join(parts[1:]) + "</div>"


# ---- 6. sample images ---------------------------------------------------------------------------
def _colour(labels: np.ndarray) -> np.ndarray:
    """Class ids as VOC palette colours, 255 (neutral / ignore) light grey."""
    palette = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    palette[IGNORE] = NEUTRAL_RGB
    return palette[labels]


def sample_maps(ev: Evidence, samples: int) -> dict[str, Any]:
    """For the first ``samples`` trial images with a foreground class: the image, its ground
    truth, and each top candidate's initial regions and pseudo-labels (its stage-1 edge head,
    read from its checkpoint). Opens the cached stage-0 stores and never builds them."""
    from tune.folder import saved_config
    from tune.space import Pair
    from tune.trainables import restored_trial
    from wsss.stage0 import prepare

    cfg = saved_config(ev.folder)
    prepared = prepare(cfg.data, cfg.classifier, cfg.cam, cfg.runtime.runs_root / "stores",
                       trial=cfg.trial, features=cfg.refine.needs_features,
                       imported=cfg.import_cams, device="cpu", progress=False, build=False)
    checkpoints = dict(zip(zip(ev.stage1.bg, ev.stage1.fg), ev.stage1.get("checkpoint", [])))
    ids = prepared.trial_ids
    columns, chosen, first = [], None, None
    for bg, fg in ev.promoted[:SAMPLE_CANDIDATES]:
        path = checkpoints.get((bg, fg))
        if not isinstance(path, str) or not Path(path).is_dir():
            raise UserError(f"the stage-1 checkpoint of {pair_text(bg, fg)} is missing ({path})")
        trial = restored_trial(prepared, (cfg.trial, cfg.refine), Pair(bg, fg), Path(path),
                               cfg.search.rank_epoch, "cpu")
        if chosen is None:  # the same images for every candidate: those with a foreground class
            chosen = [k for k in range(len(ids)) if len(trial.images.keys(k))][:samples]
            first = trial
        pseudo = dict(trial.pseudo_labels(only=chosen))
        columns.append(((bg, fg), [host(trial.images.initial_and_truth(k)[0]) for k in chosen],
                        [pseudo[ids[k]] for k in chosen]))
    if first is None:
        raise UserError("no promoted candidate")
    images = [first.images.image(k) for k in chosen]
    truths = [first.images.initial_and_truth(k)[1] for k in chosen]
    truths = [None if t is None else host(t) for t in truths]
    return {"ids": [ids[k] for k in chosen], "images": images,
            "truths": None if any(t is None for t in truths) else truths, "columns": columns,
            "class_names": list(prepared.train.class_names)}


def samples_figure(maps: dict[str, Any]) -> Figure:
    """Rows: sample images; columns: image, ground truth, then each candidate's initial regions
    and pseudo-labels, so the candidates compare side by side on the same images."""
    titles = ["image"] + (["ground truth"] if maps["truths"] else [])
    for pair, _, _ in maps["columns"]:
        titles += [f"{pair_text(*pair)}\ninitial regions", f"{pair_text(*pair)}\npseudo-labels"]
    rows = len(maps["ids"])
    fig = Figure(figsize=(1.55 * len(titles), 1.6 * rows + 0.9), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, len(titles)))
    present: set[int] = set()
    for r in range(rows):
        panels = [maps["images"][r]]
        maps_r = ([maps["truths"][r]] if maps["truths"] else []) + [
            m for _, initial, pseudo in maps["columns"] for m in (initial[r], pseudo[r])]
        for m in maps_r:
            present.update(np.unique(m).tolist())
        panels += [_colour(m) for m in maps_r]
        for c, (ax, panel) in enumerate(zip(axes[r], panels)):
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=8)
        axes[r][0].set_ylabel(maps["ids"][r], fontsize=7)
    palette = np.array(voc_palette()).reshape(256, 3) / 255
    names = maps["class_names"]
    handles = [Patch(facecolor=palette[c], edgecolor="#666",
                     label=names[c] if c < len(names) else str(c))
               for c in sorted(present - {IGNORE})]
    handles.append(Patch(facecolor=np.array(NEUTRAL_RGB) / 255, edgecolor="#666",
                         label="neutral / ignore (255)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6),
               fontsize=8, frameon=False)
    return fig


def samples_section(ev: Evidence, out: Path, samples: int) -> str:
    title = "<h2>Sample images</h2>"
    if samples <= 0:
        return title + "<p class='missing'>not requested (samples=0).</p>"
    if ev.state is None or ev.stage1 is None or not ev.promoted:
        return title + ("<p class='missing'>skipped: needs search.json, stage1.csv and the "
                        "promoted candidates.</p>")
    try:
        maps = sample_maps(ev, samples)
    except (UserError, OSError, KeyError, ValueError, RuntimeError) as e:
        return title + f"<p class='missing'>skipped: {_e(e)}</p>"
    src = _save(samples_figure(maps), out, "samples.png")
    return title + _figure(src, "What each top candidate's thresholds make of the same train "
                                "images: the initial confident regions (grey: neutral) and the "
                                "pseudo-labels after the random walk, next to the ground truth.",
                           "sample images")


# ---- 7. tables ----------------------------------------------------------------------------------
def candidates_section(ev: Evidence) -> str:
    title = "<h2>Candidates</h2>"
    if not ev.promoted:
        return title + "<p class='missing'>candidates.json missing: nothing promoted yet.</p>"
    rows_by_pair = {} if ev.stage1 is None else {
        _key(r["bg"], r["fg"]): r for r in ev.stage1.to_dict(orient="records")}
    objectives = {_key(c["bg"], c["fg"]): c.get("objective")
                  for c in (ev.candidates or {}).get("candidates", [])}
    best = (ev.selection or {}).get("best_by_val_miou")
    best = _key(best["bg"], best["fg"]) if best else None
    rows = []
    for pair in ev.promoted:
        r = rows_by_pair.get(pair, {})
        failed = r.get("stage2_failed")
        status = ("not run" if failed is None or pd.isna(failed)
                  else "failed" if failed else "done")
        marks = ", ".join(m for m, on in (("pick", pair == ev.pick),
                                          ("best val mIoU", pair == best)) if on)
        rows.append([pair_text(*pair), fmt(ev.objective, objectives.get(pair, r.get("objective"))),
                     fmt("pqs_avg", r.get("pqs_avg")), fmt("val_miou", r.get("val_miou")),
                     status, marks])
    table = _table(["(BG, FG)", label(ev.objective), "PQS avg", "val mIoU", "stage 2", ""], rows)
    return (f"{title}<p class='caption'>The promoted pairs in promotion order; does the pick "
            f"(by {_e(label(ev.objective))}) also have the best val mIoU?</p>{table}"
            + evaluation_table(ev))


def evaluation_table(ev: Evidence) -> str:
    """The oracle's verdict on every objective and proxy: its pick, regret and recall@k."""
    evaluation = (ev.selection or {}).get("evaluation")
    if not evaluation:
        return ""
    ks = sorted({k for e in evaluation.values() if e for k in e.get("recall", {})}, key=int)
    rows = []
    for name, e in evaluation.items():
        if not e:
            continue
        truth = e.get("truth", "val_miou")
        pick, best = e["pick"], e["best"]
        gt = e.get("uses_ground_truth", name in GROUND_TRUTH_PROXIES)
        rows.append([label(name) + (" (ground truth)" if gt else ""),
                     str(e.get("n", "")), pair_text(pick["bg"], pick["fg"]),
                     fmt(truth, pick.get(truth)), pair_text(best["bg"], best["fg"]),
                     fmt(truth, best.get(truth)), fmt(truth, e["regret"]),
                     *("yes" if e["recall"].get(k) else "no" for k in ks)])
    header = ["objective / proxy", "n", "its pick", "pick's val mIoU", "best pair",
              "best val mIoU", "regret (points)", *(f"recall@{k}" for k in ks)]
    return ("<h3>Regret and recall of each objective (oracle)</h3><p class='caption'>Had the "
            "search picked by this score, how far from the best pair by val mIoU would it land, "
            "and is the best pair among its top k?</p>" + _table(header, rows))


# ---- the page -----------------------------------------------------------------------------------
STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1500px; padding: 0 16px; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid
#ddd; } .caption, figcaption { color: #555; font-size: 0.92em; } .missing { color: #a33; }
.figs { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
figure { margin: 0; max-width: 100%; } img { max-width: 100%; height: auto; border: 1px solid
#e4e4e4; } figcaption { max-width: 640px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 3px 9px; text-align: right; } th { background: #f5f5f5; }
td:first-child, th:first-child { text-align: left; }
"""


def _guarded(name: str, build: Any, fallback: Any) -> Any:
    """``build()``, or ``fallback`` when it raises: the report ends every search, and a figure
    that cannot be drawn must not turn a finished search into a failed one (logged in full)."""
    try:
        return build()
    except Exception:  # logged with its traceback; the rest of the report stands
        log.exception("report: %s could not be written", name)
        return fallback


def write_report(folder: Path, *, samples: int = 4) -> Path:
    """Write ``folder/report/index.html`` and its PNGs from the search folder's files; returns the
    HTML's path. Any input may be missing (a search still running, or killed): the report says
    what is missing instead of failing."""
    folder = Path(folder)
    out = folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    ev = load(folder)
    stats = _guarded("statistics", lambda: statistics(ev), {})
    if stats:  # the exact numbers, for a paper's table
        write_json_atomic(out / "statistics.json", [c.as_dict() for c in stats.values()])
    sections = [_guarded(name, build, f"<h2>{name}</h2><p class='missing'>this section failed; "
                                      f"see the log</p>") for name, build in (
        ("Summary", lambda: header_section(ev)),
        ("The searched pairs", lambda: heatmap_section(ev, out)),
        ("Proxies", lambda: proxy_section(ev, stats, out)),
        ("Learning curves", lambda: curves_section(ev, out)),
        ("Sample images", lambda: samples_section(ev, out, samples)),
        ("Candidates", lambda: candidates_section(ev)))]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>wsss-tune report: {_e(ev.name)}</title><style>{STYLE}</style></head>"
            f"<body>{''.join(sections)}<p class='caption'>Written by wsss-tune from "
            f"{_e(folder.resolve())}.</p></body></html>")
    path = out / "index.html"
    atomic_write_bytes(path, page.encode())
    return path
