"""``wsss-tune gc``: what no search refers to goes, what a search needs stays, and nothing is
collected while a search or a command uses the runs root."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

from tune import locking
from tune.cleanup import size_of
from tune.cli import main
from tune.config import STORES_LOCK
from tune.folder import LOCK_FILE


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_gc_removes_only_what_no_search_refers_to(ci_config, ci_prepared, tmp_path, capsys):
    runs = tmp_path / "runs"
    for store in ci_prepared.cached:  # the session's stage 0: this search trains no classifier
        shutil.copytree(store, runs / "stores" / store.name)
    assert main(["search", "--config", "ci", "--space", "pairs", "--data",
                 str(ci_config.data.root), "--set", "search.pairs=[[0.1, 0.35], [0.2, 0.45]]",
                 "--set", "refine.irn.epochs=2", "--set", "search.top_k=1",
                 "--set", "segmentation.epochs=1", "--set", f"runtime.runs_root={runs}"]) == 0
    search = runs / "ci"
    state = json.loads((search / "search.json").read_text())
    assert state["stores"] == sorted(p.name for p in ci_prepared.cached)

    unused = runs / "stores" / "cams-0123456789abcdef"  # a store of settings no search uses
    unused.mkdir()
    (unused / "data.npy").write_bytes(b"\0" * 1_000_000)
    orphan = runs / "stores" / f".cams-0123456789abcdef.tmp-{_dead_pid()}"
    orphan.mkdir()
    (orphan / "data.npy").write_bytes(b"\0" * 1000)
    checkpoint = next(c for c in sorted(search.glob("stage1/*/checkpoint_*"))
                      if c.name != "checkpoint_000000")  # a trial that trained 2 epochs
    older = checkpoint.with_name("checkpoint_000000")  # what a kill keeps from Tune's clean-up
    shutil.copytree(checkpoint, older)
    temporary = search / ".stage1.csv.x1y2.tmp"
    temporary.write_text("half")
    garbage = {older, temporary, orphan, unused}
    capsys.readouterr()

    assert main(["gc", str(runs), "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[2] for line in out.splitlines() if line.startswith(" ")}
    assert listed == {str(p.relative_to(runs)) for p in garbage}, out
    freed = f"{sum(size_of(p) for p in garbage) / 1e6:,.1f} MB in 4 items"
    assert f"would free {freed}" in out and "kept 3 stores of 1 search" in out
    assert all(p.exists() for p in garbage)

    old = runs / "old"  # a search that does not record its stores: every store is kept
    (old / "stage1").mkdir(parents=True)
    (old / "search.json").write_text(json.dumps({k: v for k, v in state.items()
                                                 if k != "stores"}))
    assert main(["gc", str(runs), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "cams-0123456789abcdef " not in out and f"kept every store: {old}" in out
    shutil.rmtree(old)

    with locking.held(search / LOCK_FILE, "a search"):  # a running search (another process's
        assert main(["gc", str(runs)]) == 2             # lock on its own open file)
    err = capsys.readouterr().err.strip()
    assert err == (f"wsss-tune: error: runs root {runs} is in use by the search in {search} "
                   f"(pid {os.getpid()} on {socket.gethostname()}): run gc when it has ended")
    with locking.held(runs / STORES_LOCK, shared=True):  # a trial, surface or export running
        assert main(["gc", str(runs)]) == 2
    assert "in use by a running wsss-tune command" in capsys.readouterr().err
    assert all(p.exists() for p in garbage)

    done = subprocess.run([sys.executable, "-m", "tune.cli", "gc", str(runs)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"freed {freed}" in done.stdout, done.stderr
    assert not any(p.exists() for p in garbage)
    assert all((runs / "stores" / name).is_dir() for name in state["stores"])
    assert not list((runs / "stores").glob(".*"))  # no store left renamed aside
    assert main(["gc", str(runs)]) == 0
    assert "freed 0.0 MB in 0 items" in capsys.readouterr().out
    # what the search needs survived: its selected pair's labels come from its stores and head
    assert main(["export-labels", str(search), "--out", str(tmp_path / "labels")]) == 0
    assert len(list((tmp_path / "labels").glob("*.png"))) == len(ci_prepared.train)


def test_gc_needs_a_runs_root(tmp_path, capsys):
    assert main(["gc", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"wsss-tune: error: {tmp_path / 'nothing'} is not a runs root (not a folder)")
