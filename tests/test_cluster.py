"""Searches on a running Ray cluster and with an MLflow tracking server, and the start-up checks
of `tune.cluster` (docs/search.md).

The Ray head and the MLflow server are real processes started here, each in its own process group
and stopped by killing that group (never `ray stop`: it stops every Ray on the machine). Both
listen on 127.0.0.1 only: Ray binds its servers to the node IP, and resolves 127.0.0.1 to the
machine's outward address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (a single-machine
cluster). The head uses token authentication (``RAY_AUTH_MODE=token``) with a token made here,
given to it and to the driver as ``RAY_AUTH_TOKEN`` (nothing is written to ``~/.ray``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tune import cluster
from wsss.errors import UserError

BIN = Path(sys.executable).parent
PAIRS = "[[0.1,0.35],[0.2,0.45]]"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM to the process group, SIGKILL to whatever is left after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
    # the leader may be gone while children of the group live on: make sure they do not
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_until(ready, proc: subprocess.Popen, log: Path, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready in {timeout_s} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


def search_args(cfg, runs: Path, name: str, *extra: str) -> list[str]:
    """A tiny search (2 pairs, 1 epoch on 40 images) reusing the session's stage 0: a fresh runs
    root whose ``stores`` is the session's (classifier and CAM store cached)."""
    if not (runs / "stores").exists():
        runs.mkdir(parents=True, exist_ok=True)
        os.symlink(cfg.runtime.runs_root / "stores", runs / "stores")
    sets = [f"name={name}", "search.space=pairs", f"search.pairs={PAIRS}", "search.top_k=1",
            "refine.irn.epochs=1", "trial.subset=40", "search.stage2=false",
            f"data.root={cfg.data.root}", f"runtime.runs_root={runs}"]
    return ["search", "--config", "ci", *[a for s in sets for a in ("--set", s)], *extra]


def check_children(client, parent_id: str, n: int, epochs: int = 1) -> None:
    """One FINISHED stage-1 child per trial with its pair as params and one point per epoch."""
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == n
    assert {c.info.status for c in children} == {"FINISHED"}  # nothing left RUNNING
    assert sorted((c.data.params["bg"], c.data.params["fg"]) for c in children) == [
        ("0.1", "0.35"), ("0.2", "0.45")]
    for child in children:
        assert child.data.tags["stage"] == "1"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "tecm")]
        assert steps == list(range(1, epochs + 1))


def no_tokens_left(*folders: Path) -> bool:
    return not any(p.name.startswith(cluster.TOKEN_PREFIX) for f in folders for p in f.iterdir())


# --- without Ray ------------------------------------------------------------------------------

def test_address_comes_from_the_flag_then_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.resolve_address(None) is None
    assert cluster.resolve_address("local") is None
    assert cluster.resolve_address("10.0.0.1:6379") == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert cluster.resolve_address(None) == "10.0.0.2:6379"
    assert cluster.resolve_address("10.0.0.1:6379") == "10.0.0.1:6379"  # the flag wins
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert cluster.resolve_address(None) is None


def test_bad_addresses_are_user_errors():
    with pytest.raises(UserError, match="cluster at garbage: Invalid address format.*HOST:PORT"):
        cluster.connect("garbage")
    port = free_port()  # nothing listens: said at once (Ray itself would retry for minutes)
    start = time.monotonic()
    with pytest.raises(UserError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        cluster.connect(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 10


@pytest.mark.slow
def test_bad_address_is_a_one_line_cli_error(ci_config, ci_prepared, tmp_path, capsys,
                                             monkeypatch):
    from tune.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    runs = tmp_path / "runs"
    assert main(search_args(ci_config, runs, "bad", "--address", "garbage")) == 2
    err = capsys.readouterr().err  # MLflow's own INFO lines come first
    assert err.splitlines()[-1].startswith(
        "wsss-tune: error: cannot connect to the Ray cluster at garbage: Invalid address")
    assert "Traceback" not in err
    port = free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # honoured without --address
    assert main(search_args(ci_config, runs, "bad-env")) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(
        f"wsss-tune: error: no Ray cluster answers at 127.0.0.1:{port}")
    assert not (runs / "bad").exists()  # refused before the search began (no stage 0 run)


# --- a real Ray head ---------------------------------------------------------------------------

@dataclass
class Head:
    address: str
    token: str
    hidden: Path | None  # a folder the node does not see (None: no mount namespace here)


def _mount_namespaces() -> bool:
    """Whether this machine lets us give the head a private mount namespace (root in most
    containers; CI without it skips the unshared-folder test)."""
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-node Ray cluster with token auth, on 127.0.0.1, for this module's tests. Where
    mount namespaces are allowed, the head runs in its own with a tmpfs over ``hidden``: the
    driver writes there, the node sees an empty folder, as a node without the shared
    filesystem would."""
    base = tmp_path_factory.mktemp("head")
    hidden = base / "node-local"
    hidden.mkdir()
    temp = tempfile.mkdtemp(prefix="wsss-ray-")  # short: Ray's socket paths must stay < 108
    port, token = free_port(), secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--port", str(port),
           "--node-ip-address", "127.0.0.1", "--temp-dir", temp, "--num-cpus", "2",
           "--include-dashboard", "false", "--disable-usage-stats"]
    masked = _mount_namespaces()
    if masked:
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs none "$0" && exec "$@"', str(hidden), *cmd]
    log = base / "head.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=base, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until(lambda: "Ray runtime started" in log.read_text(), proc, log, 60, "ray head")
        yield Head(f"127.0.0.1:{port}", token, hidden if masked else None)
    finally:
        kill_group(proc)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def on_head(ray_head, monkeypatch):
    """This process as a driver of ``ray_head``: auth mode and token as a worker machine would
    have them. Ray caches both per process, so they are reset after each change (Ray's own
    tests do the same)."""
    import ray
    from ray._private import ray_constants
    from ray._private.authentication_test_utils import reset_auth_token_state

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # read at import
    reset_auth_token_state()
    try:
        yield ray_head
    finally:
        ray.shutdown()
        monkeypatch.undo()
        reset_auth_token_state()


@pytest.mark.slow
def test_search_on_a_running_cluster(on_head, ci_config, ci_prepared, tmp_path, caplog):
    from mlflow import MlflowClient

    from tune.cli import main

    runs = tmp_path / "runs"
    # trials never call MLflow (the driver logs for them): where the node can be kept from
    # seeing it, the tracking store lives in a folder only the driver sees
    store = (on_head.hidden or runs) / "mlflow.db"
    with caplog.at_level("INFO", logger="tune"):
        assert main(search_args(ci_config, runs, "cluster", "--address", on_head.address,
                                "--tracking-uri", f"sqlite:///{store}")) == 0
    assert caplog.text.count("cluster check passed on 1 node(s): 127.0.0.1") == 1  # stage 1
    folder = runs / "cluster"
    candidates = json.loads((folder / "candidates.json").read_text())
    assert len(candidates["candidates"]) == 1
    assert json.loads((folder / "selection.json").read_text())["pair"]
    assert no_tokens_left(folder, runs / "stores")  # the check cleaned up after itself
    client = MlflowClient(f"sqlite:///{store}")
    parent = client.get_run(candidates["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["refine.irn.epochs"] == "1"
    check_children(client, parent.info.run_id, 2)


@pytest.mark.slow
def test_check_passes_on_shared_folders_on_every_node(on_head, tmp_path, monkeypatch, caplog):
    import ray

    shared = {"search folder": tmp_path / "search", "stores folder": tmp_path / "stores"}
    cluster.connect(on_head.address)
    (tmp_path / "data").mkdir()
    with caplog.at_level("INFO", logger="tune"):
        cluster.check_cluster(shared, present={"data.root": tmp_path / "data"})
    assert "cluster check passed on 1 node(s): 127.0.0.1" in caplog.text
    assert no_tokens_left(tmp_path / "search", tmp_path / "stores")
    # every node is asked (a second node is simulated by listing the one node twice), and a
    # head that runs no trials (no CPUs) is not
    node = ray.nodes()[0]
    idle = {**node, "NodeID": "f" * len(node["NodeID"]), "Resources": {"CPU": 0.0}}
    monkeypatch.setattr(ray, "nodes", lambda: [node, dict(node), idle])
    caplog.clear()
    with caplog.at_level("INFO", logger="tune"):
        cluster.check_cluster(shared)
    assert f"cluster check passed on 2 node(s): 127.0.0.1/{node['NodeID'][:8]}" in caplog.text
    assert no_tokens_left(tmp_path / "search", tmp_path / "stores")


@pytest.mark.slow
def test_check_names_a_folder_a_node_cannot_read(on_head, tmp_path):
    if on_head.hidden is None:
        pytest.skip("no mount namespaces here: cannot hide a folder from the node")
    cluster.connect(on_head.address)
    search, data = on_head.hidden / "search", on_head.hidden / "data"
    (data / "JPEGImages").mkdir(parents=True)
    with pytest.raises(UserError) as error:
        cluster.check_cluster({"search folder": search, "stores folder": tmp_path},
                              present={"data.root": data}, settle_s=1)
    message = str(error.value)
    assert message.startswith(f"shared path {search} (search folder) is not readable and "
                              "writable on node 127.0.0.1 (No such file or directory): put "
                              "runtime.runs_root")
    assert (f"path {data} (data.root) is missing on node 127.0.0.1 (No such file or directory)"
            in message)
    assert str(tmp_path) not in message  # the stores folder is readable: not named
    assert no_tokens_left(search)


# --- an MLflow tracking server -----------------------------------------------------------------

@pytest.mark.slow
def test_search_logs_to_a_tracking_server(ci_config, ci_prepared, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from tune.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    server = tmp_path / "server"
    server.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = server / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{server / 'mlflow.db'}", "--artifacts-destination",
             str(server / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], cwd=server, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(healthy, proc, log, 60, "mlflow server")
        runs = tmp_path / "runs"
        assert main(search_args(ci_config, runs, "served", "--tracking-uri", uri)) == 0
        assert not (runs / "mlflow.db").exists()  # everything went to the server
        client = MlflowClient(uri)
        parent_id = json.loads((runs / "served" / "candidates.json").read_text())[
            "mlflow_parent_run_id"]
        parent = client.get_run(parent_id)
        assert parent.info.status == "FINISHED"
        assert parent.data.params["search.pairs"] and parent.data.tags["config_hash"]
        check_children(client, parent_id, 2)
        child = client.search_runs([parent.info.experiment_id],
                                   f"tags.mlflow.parentRunId = '{parent_id}'")[0]
        assert {"tecm", "objective", "affinity_loss"} <= set(child.data.metrics)
        assert {"candidates.json", "selection.json"} <= {
            a.path for a in client.list_artifacts(parent_id)}
        assert list((server / "artifacts").rglob("candidates.json"))  # stored by the server
    finally:
        kill_group(proc)
