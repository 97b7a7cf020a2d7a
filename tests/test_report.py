"""The search report (`tune.report`): a real two-stage search folder made by the CLI, the same
folder with stage 2 removed, and hand-made folders for the cases a tiny search cannot reach
(a sampled space, the oracle's regret table, an empty folder)."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tune.report import fmt, pair_text, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """The report's text, image sources and tags, as a browser would read them."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.images: list[str] = []
        self.tags: set[str] = set()
        self.links: list[str] = []
        self.chunks: list[str] = []
        self.feed(path.read_text())
        self.text = " ".join(" ".join(self.chunks).split())

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        self.links += [v for k, v in attrs.items() if k in ("href", "src") and v]

    def handle_data(self, data: str) -> None:
        self.chunks.append(data)


def read_page(index: Path) -> Page:
    """Parse a report and check it is static and every image it shows is a real PNG beside it."""
    assert index.name == "index.html" and index.parent.name == "report"
    page = Page(index)
    assert "script" not in page.tags and "link" not in page.tags  # no JS, no external CSS
    assert not [u for u in page.links if "://" in u or u.startswith("/")]  # relative only
    for src in page.images:
        data = (index.parent / src).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), src
    assert not list(index.parent.glob(".*.tmp"))  # atomic writes leave no temp file
    return page


@pytest.fixture(scope="module")
def search_folder(finished_search) -> Path:
    """The session's real two-stage search (conftest: shared with test_predict)."""
    return finished_search


@pytest.mark.slow
def test_report_of_a_finished_search(search_folder):
    index = write_report(search_folder)
    assert index == search_folder / "report" / "index.html"
    page = read_page(index)
    selection = json.loads((search_folder / "selection.json").read_text())
    pair, metrics = selection["pair"], selection["metrics"]
    assert f"selected (BG, FG) = {pair_text(pair['bg'], pair['fg'])}" in page.text
    assert f"TECM {metrics['objective']:.4f}" in page.text  # the objective, a plain number
    assert f"PQS avg {metrics['pqs_avg']:.2%}" in page.text
    assert f"val mIoU {metrics['val_miou']:.2%}" in page.text
    assert f"regret of the pick {selection['regret_val_miou']:.2%}" in page.text
    n = len(selection["ranked"])
    assert f"against the {n} promoted candidates only" in page.text  # not the oracle
    # every figure: heatmaps of both objectives and the ground-truth maps, the scatters, both
    # learning curves and the candidates' sample images
    assert {"heatmap_tecm.png", "heatmap_tecm_pooled.png", "heatmap_pqs_avg.png",
            "heatmap_val_miou.png", "scatter_tecm.png", "stage1_curves.png",
            "stage2_curves.png", "samples.png"} <= set(page.images)
    assert "Missing" not in page.text and "skipped" not in page.text
    assert "1 degenerate" in page.text  # (0.3, 0.3) is left out of the statistics, and said so
    for c in json.loads((search_folder / "candidates.json").read_text())["candidates"]:
        assert pair_text(c["bg"], c["fg"]) in page.text and fmt("tecm", c["objective"]) in page.text
    # the MLflow parent run holds the same numbers, and the report the search wrote at its end
    from mlflow import MlflowClient

    state = json.loads((search_folder / "search.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    parent = client.get_run(state["parent_run_id"]).data
    assert f"({parent.metrics['selected_bg']:g}, {parent.metrics['selected_fg']:g})" == (
        parent.tags["selected_pair"]) and parent.metrics["selected_bg"] == pair["bg"]
    assert f"TECM {parent.metrics['selected_tecm']:.4f}" in page.text
    assert f"val mIoU {parent.metrics['selected_val_miou']:.2%}" in page.text
    assert f"regret of the pick {parent.metrics['regret_val_miou']:.2%}" in page.text
    stats = json.loads((index.parent / "statistics.json").read_text())
    tecm_pqs = next(c for c in stats if (c["x"], c["y"]) == ("tecm", "pqs_avg"))
    assert tecm_pqs["n"] == len(pd.read_csv(search_folder / "stage1.csv").query(
        "degenerate == 0 and training_iteration == 2"))
    assert tecm_pqs["spearman"] is None or f"{tecm_pqs['spearman']:.3f}" in page.text
    logged = {Path(a.path).name for a in client.list_artifacts(state["parent_run_id"], "report")}
    assert {"index.html", *page.images} <= logged


@pytest.mark.slow
def test_report_of_a_search_without_stage_2(search_folder, tmp_path):
    folder = tmp_path / "partial"
    shutil.copytree(search_folder, folder, ignore=shutil.ignore_patterns("report"))
    for name in ("stage2.csv", "selection.json", "stage2_epochs.csv"):
        (folder / name).unlink()
    page = read_page(write_report(folder, samples=2))
    assert "stage2.csv missing: stage 2 not run / not finished" in page.text
    assert "selection.json missing" in page.text and "no pair selected yet" in page.text
    assert "stage2_epochs.csv missing" in page.text
    assert {"heatmap_tecm.png", "stage1_curves.png", "samples.png"} <= set(page.images)
    assert "heatmap_val_miou.png" not in page.images and "stage2_curves.png" not in page.images


def _sampled_search(folder: Path, oracle: bool) -> None:
    """A hand-made finished search over a sampled space: 24 distinct BG values (no grid), one
    degenerate pair, one stopped early, one failed, and (``oracle``) val mIoU for every pair."""
    rng = np.random.default_rng(0)
    n = 24
    bg = np.round(np.linspace(0.02, 0.6, n), 4)
    fg = np.round(bg + rng.uniform(0.05, 0.3, n), 4)
    fg[3] = bg[3]
    tecm = np.round(rng.uniform(0.1, 0.6, n), 6)
    table = pd.DataFrame({
        "trial_id": [f"t{i}" for i in range(n)], "failed": 0, "bg": bg, "fg": fg,
        "training_iteration": 3, "degenerate": 0, "tecm": tecm,
        "pqs_avg": 0.3 + 0.5 * tecm + rng.normal(0, 0.02, n),
        "checkpoint": None})
    table.loc[3, ["degenerate", "tecm"]] = 1, 1.0
    table.loc[5, "training_iteration"] = 1
    table.loc[7, "failed"] = 1
    table["objective"] = table.tecm.where(table.degenerate == 0, 0.0)
    ok = table[(table.degenerate == 0) & (table.failed == 0) & (table.training_iteration == 3)]
    promoted = ok.sort_values("objective", ascending=False)
    promoted = promoted if oracle else promoted.head(3)
    stage2 = promoted.assign(stage2_failed=0, val_miou=0.2 + 0.6 * promoted.pqs_avg)
    ranked = stage2.sort_values("objective", ascending=False)
    pick, best = ranked.iloc[0], ranked.loc[ranked.val_miou.idxmax()]
    selection = {
        "pair": {"bg": pick.bg, "fg": pick.fg}, "pick": "objective", "uses_ground_truth": False,
        "objective": "tecm", "policy": "global",
        "metrics": {k: float(pick[k]) for k in ("objective", "tecm", "pqs_avg", "val_miou")},
        "ranked": json.loads(ranked.to_json(orient="records")),
        "best_by_val_miou": {"bg": best.bg, "fg": best.fg, "val_miou": best.val_miou},
        "regret_val_miou": float(best.val_miou - pick.val_miou),
        "regret_scope": "all" if oracle else "candidates"}
    if oracle:
        selection["evaluation"] = {"tecm": {
            "score": "tecm", "truth": "val_miou", "n": len(ranked),
            "pick": {"bg": pick.bg, "fg": pick.fg, "tecm": pick.tecm, "val_miou": pick.val_miou},
            "best": {"bg": best.bg, "fg": best.fg, "val_miou": best.val_miou},
            "regret": float(best.val_miou - pick.val_miou),
            "recall": {"1": False, "3": True, "5": True}}}
    folder.mkdir()
    table.to_csv(folder / "stage1.csv", index=False)
    stage2.to_csv(folder / "stage2.csv", index=False)
    (folder / "candidates.json").write_text(json.dumps({
        "objective": "tecm", "policy": "global", "top_k": "all" if oracle else 3,
        "candidates": json.loads(promoted[["bg", "fg", "objective", "trial_id"]]
                                 .to_json(orient="records"))}))
    (folder / "selection.json").write_text(json.dumps(selection))


def test_report_of_an_oracle_search_over_a_sampled_space(tmp_path):
    folder = tmp_path / "oracle"
    _sampled_search(folder, oracle=True)
    page = read_page(write_report(folder))
    selection = json.loads((folder / "selection.json").read_text())
    n = len(selection["ranked"])
    assert f"against all {n} finished pairs (oracle)" in page.text
    assert f"regret of the pick {selection['regret_val_miou']:.2%}" in page.text
    assert "Regret and recall of each objective (oracle)" in page.text
    ev = selection["evaluation"]["tecm"]
    assert f"{ev['regret']:.2%}" in page.text and f"{ev['pick']['val_miou']:.2%}" in page.text
    assert "heatmap_tecm.png" in page.images and "scatter_tecm.png" in page.images
    # left out of the statistics, each for its reason; no search.json: no sample images
    assert "1 degenerate, 1 failed, 1 stopped early by ASHA" in page.text
    assert "search.json missing" in page.text and "Sample images" in page.text


def test_report_of_an_empty_folder_says_what_is_missing(tmp_path):
    page = read_page(write_report(tmp_path))
    for name in ("search.json", "stage1.csv", "candidates.json", "stage2.csv",
                 "selection.json"):
        assert f"{name} missing" in page.text
    assert page.images == []


def test_units():
    assert fmt("pqs_avg", 0.63214) == "63.21%" and fmt("val_miou", 0.6) == "60.00%"
    assert fmt("tecm", 0.68821) == "0.6882" and fmt("tecm", float("nan")) == "–"
    assert pair_text(0.25, 0.5) == "(0.25, 0.50)" and pair_text(0.12345, 0.5) == "(0.1235, 0.5000)"


@pytest.mark.slow
def test_pipeline_refines_only_chosen_images_and_never_builds_when_told(ci_config, ci_prepared,
                                                                        tmp_path):
    """What the sample images rely on: ``pseudo_labels(only=...)`` gives exactly those images'
    labels of a full refinement, and ``prepare(build=False)`` reopens the cached stage 0 but
    refuses (without training or writing anything) where nothing is cached."""
    from conftest import make_trial

    from wsss.errors import UserError
    from wsss.stage0 import prepare

    c = ci_config
    trial = make_trial(c, ci_prepared, 0.25, 0.5)
    every = dict(trial.pseudo_labels())
    some = dict(trial.pseudo_labels(only=[5, 0]))
    ids = ci_prepared.features.ids
    assert set(some) == {ids[0], ids[5]}
    assert all(np.array_equal(some[i], every[i]) for i in some)
    initial, truth = trial.images.initial_and_truth(5)
    assert initial.shape == truth.shape == some[ids[5]].shape
    cached = prepare(c.data, c.classifier, c.cam, c.runtime.runs_root / "stores",
                     trial=c.trial, features=True, device="cpu", progress=False, build=False)
    assert cached.cams.path == ci_prepared.cams.path
    with pytest.raises(UserError, match="stage 0 is not cached: no current classifier"):
        prepare(c.data, c.classifier, c.cam, tmp_path / "stores", trial=c.trial,
                features=True, device="cpu", progress=False, build=False)
    assert not (tmp_path / "stores").exists()
