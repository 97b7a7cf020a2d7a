"""The CLI: user errors are one line and exit 2; the surface command writes its CSV."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from tune.cli import main


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tune.cli", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=600)


def test_bad_config_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("name: x\ndata: {root: d}\nclassifier: {epochz: 3}\n")
    r = run_cli("surface", "--config", str(bad), cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "classifier.epochz: unknown key" in r.stderr and str(bad) in r.stderr


def test_missing_dataset_names_the_folder(tmp_path, capsys):
    assert main(["surface", "--config", "ci", "--set", "data.synthetic=null",
                 "--set", f"data.root={tmp_path / 'nowhere'}"]) == 2
    assert f"data.root {tmp_path / 'nowhere'} is not a folder" in capsys.readouterr().err


def test_make_data(tmp_path, capsys):
    assert main(["make-data", "--out", str(tmp_path / "d"), "--n-train", "6", "--n-val", "2",
                 "--size", "32", "--classes", "3"]) == 0
    assert len((tmp_path / "d/ImageSets/Segmentation/train.txt").read_text().split()) == 6
    assert main(["make-data", "--out", str(tmp_path / "e"), "--n-train", "2", "--n-val", "1",
                 "--classes", "99"]) == 2
    assert "classes" in capsys.readouterr().err


@pytest.mark.slow
def test_surface_command_end_to_end(tmp_path):
    r = run_cli("surface", "--config", "ci", "--set", "classifier.epochs=2",
                "--set", "data.synthetic.n_train=40", "--set", "data.synthetic.n_val=16",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "best PQS" in r.stdout and "degenerate" in r.stdout and "%" in r.stdout
    table = pd.read_csv(tmp_path / "runs" / "ci" / "surface_initial.csv")
    assert len(table) == 32 and {"bg", "fg", "npr", "miou_nn", "pqs", "degenerate"} <= set(table)
    assert table.pqs.between(0, 1).all()


@pytest.mark.slow
def test_trial_command_exports_labels(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    small = ["--set", "classifier.epochs=2", "--set", "data.synthetic.n_train=30",
             "--set", "data.synthetic.n_val=10", "--set", "refine.irn.epochs=2"]
    assert main(["trial", "--config", "ci", "--bg", "0.2", "--fg", "0.45", *small,
                 "--export-labels", str(tmp_path / "labels")]) == 0
    out = capsys.readouterr().out
    assert "tecm" in out and "pqs_pseudo" in out and "wrote 30 pseudo-label PNGs" in out
    pngs = sorted((tmp_path / "labels").glob("*.png"))
    assert len(pngs) == 30
    from PIL import Image
    assert Image.open(pngs[0]).mode == "P"
    assert main(["trial", "--config", "ci", "--bg", "0.5", "--fg", "0.2", *small]) == 2
    assert "--bg (0.5) must not exceed --fg (0.2)" in capsys.readouterr().err


def test_search_flag_errors_are_one_line(tmp_path, capsys):
    assert main(["search", "--resume", str(tmp_path), "--space", "optuna"]) == 2
    assert "--resume continues a search with its saved config: drop --space" in (
        capsys.readouterr().err)
    assert main(["search", "--resume", str(tmp_path)]) == 2
    assert f"{tmp_path} is not a search folder (search.json not found)" in capsys.readouterr().err
    assert main(["search"]) == 2
    assert "search needs --config" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse names the allowed spaces
        main(["search", "--config", "ci", "--space", "grid"])
    assert "invalid choice: 'grid'" in capsys.readouterr().err


def test_analyze_the_papers_own_table(capsys):
    from tune.config import PACKAGED

    table = PACKAGED / "paper" / "table2.csv"
    assert main(["analyze", str(table), "--x", "tecm", "--y", "pqs_avg", "--seeds", "20",
                 "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["n"] == 24 and stats["x"] == "tecm" and stats["n_seeds"] <= 20
    assert stats["pearson"] == pytest.approx(-0.053, abs=1e-3)  # no correlation at all
    assert main(["analyze", str(table), "--x", "tecm", "--y", "pqs_avg", "--seeds", "20",
                 "--where", "bg >= 0.2"]) == 0
    printed = capsys.readouterr().out
    assert "tecm vs pqs_avg: 15 rows of" in printed and "where bg >= 0.2" in printed
    assert "RANSAC Pearson" in printed and "95% CI" in printed
    assert main(["analyze", str(table), "--x", "tecmm", "--y", "pqs_avg"]) == 2
    assert "--x 'tecmm' is not a column" in capsys.readouterr().err
    assert main(["analyze", str(table), "--x", "tecm", "--y", "pqs_avg", "--where", "bg >>"]) == 2
    assert "--where 'bg >>'" in capsys.readouterr().err
    assert main(["analyze", "nowhere.csv", "--x", "a", "--y", "b"]) == 2


def test_an_unusable_output_folder_fails_before_any_work(tmp_path, monkeypatch, capsys):
    """`--export-labels` / `export-labels --out` naming a file (or an unwritable place) stop in
    one line before stage 0 trains or refines anything."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("a file")
    assert main(["trial", "--config", "ci", "--bg", "0.2", "--fg", "0.45",
                 "--export-labels", str(tmp_path / "taken")]) == 2
    assert f"--export-labels {tmp_path / 'taken'} exists and is not a folder" in (
        capsys.readouterr().err)
    assert main(["trial", "--config", "ci", "--bg", "0.2", "--fg", "0.45",
                 "--export-labels", str(tmp_path / "taken" / "sub")]) == 2
    assert "cannot create the folder" in capsys.readouterr().err
    assert main(["export-labels", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "taken")]) == 2
    assert "--out" in capsys.readouterr().err
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def test_a_runs_root_that_cannot_hold_outputs_fails_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    for command in (["search"], ["trial", "--bg", "0.2", "--fg", "0.45"], ["surface"]):
        assert main([*command, "--config", "ci",
                     "--set", f"runtime.runs_root={tmp_path / 'file'}"]) == 2
        assert f"runtime.runs_root {tmp_path / 'file'} exists and is not a folder" in (
            capsys.readouterr().err)
    assert not (tmp_path / "data").exists()


def test_a_bad_segmentation_encoder_fails_before_stage_0(tmp_path, monkeypatch, capsys):
    """Found before any data is generated or any classifier trained, and without leaving a
    search folder that would block the corrected command."""
    monkeypatch.chdir(tmp_path)
    assert main(["search", "--config", "ci", "--set", "segmentation.encoder=no_such_net"]) == 2
    assert "segmentation.encoder 'no_such_net'" in capsys.readouterr().err
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs" / "ci").exists()


def test_the_stage_1_table_marks_a_failed_trial():
    from tune.cli import format_stage1

    table = pd.DataFrame({"bg": [0.1, 0.2], "fg": [0.5, 0.6], "training_iteration": [3, 1],
                          "objective": [0.2, 0.1], "tecm": [0.2, 0.1], "failed": [0, 1]})
    lines = format_stage1(table).splitlines()
    assert lines[2].rstrip().endswith("FAILED (not ranked)") and "FAILED" not in lines[1]
    assert "FAILED" not in format_stage1(table.assign(failed=0))
