"""Start-up checks for a search on a Ray cluster (docs/search.md, README "Run on a cluster").

On one machine every trial sees the driver's files. On a cluster a trial runs on any node, and
opens the stage-0 stores and writes its checkpoints by *path*: a folder that is not shared would
fail trials one by one, after stage 0 had run. So before a phase starts trials, one tiny task per
alive node reads back a token the driver just wrote into each shared folder and looks for the
dataset; a failure names what is missing, where, and what to do. MLflow is not checked on the
nodes: only the driver logs (`tune.tracking.TrialRuns`).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from wsss.errors import UserError, first_line
from wsss.files import atomic_write_bytes

log = logging.getLogger("tune")

GUIDE = "see README.md, 'Run on a cluster'"
TOKEN_PREFIX = ".wsss-tune-check-"


def resolve_address(address: str | None) -> str | None:
    """The cluster to use: ``--address``, else ``RAY_ADDRESS`` (Ray's own convention, so a
    search started by ``ray job submit`` or from a shell set up for a cluster goes there); None
    (or ``local``) means a local Ray started for this search."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address in (None, "local") else address


def probe(address: str, *, timeout_s: float = 5.0) -> None:
    """A `UserError` at once when nothing listens at ``HOST:PORT`` (Ray itself would retry for
    many minutes): a search checks this before its stage 0, not after."""
    hostport = re.fullmatch(r"(?:ray://)?\[?([^\[\]]+?)\]?:(\d+)", address)
    if hostport:
        host, port = hostport.group(1), int(hostport.group(2))
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
        except OSError as e:
            raise UserError(f"no Ray cluster answers at {address} ({e.strerror or e}): start "
                            f"its head (scripts/start-head.sh) or fix --address/RAY_ADDRESS "
                            f"(HOST:PORT of the head, port 6379 by default); {GUIDE}") from None


def connect(address: str, *, timeout_s: float = 5.0) -> None:
    """``ray.init`` on a running cluster; what goes wrong becomes a one-line `UserError`.
    An address Ray cannot parse, or a refused token, comes back from ``ray.init`` at once or after
    about 20 s."""
    probe(address, timeout_s=timeout_s)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError, ray.exceptions.RayError) as e:
        ray.shutdown()  # whatever a half-done connection left behind
        if isinstance(e, ValueError):
            hint = "give the head's HOST:PORT, e.g. --address 10.0.0.1:6379"
        elif "no node info found" in _chain(e).lower():
            hint = ("this machine is not a node of that cluster: a driver must run on the head "
                    "or on a node joined with scripts/start-worker.sh (RAY_NUM_CPUS=0 keeps "
                    "trials off it)")
        elif "auth" in _chain(e).lower():
            hint = ("the cluster uses token authentication: export RAY_AUTH_MODE=token and give "
                    "this machine the head's token (run `ray get-auth-token` on the head, then "
                    "set RAY_AUTH_TOKEN or write it to ~/.ray/auth_token)")
        else:
            hint = "is its head running (scripts/start-head.sh)?"
        reason = first_line(e).split(". ")[0]  # Ray appends its own long advice
        raise UserError(f"cannot connect to the Ray cluster at {address}: {reason}; "
                        f"{hint}; {GUIDE}") from None


def check_cluster(shared: Mapping[str, Path], *, present: Mapping[str, Path] | None = None,
                  timeout_s: float = 60.0, settle_s: float = 10.0) -> None:
    """Raise `UserError` unless every alive node with CPUs reads and writes each ``shared``
    folder (name -> path) at the same path and finds each ``present`` folder (read-only inputs
    such as the dataset: a copy at the same path will do, so only its top-level names are
    compared). ``timeout_s`` bounds the wait for the nodes' answers; ``settle_s`` how long a
    node looks again for a missing file."""
    # the nodes that can run trials (a head started with no CPUs runs none)
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0)]
    folders = {name: Path(path).absolute() for name, path in shared.items()}
    inputs = {name: Path(path).absolute() for name, path in (present or {}).items()}
    listings = {str(path): sorted(os.listdir(path))[:20] for path in inputs.values()}
    tokens = _write_tokens(folders)
    try:
        refs = {_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                    n["NodeID"], soft=False)).remote(
                    {str(p): t for p, t in tokens.values()}, listings, settle_s): n
                for n in nodes}
        results = _gather(refs, timeout_s)
    finally:
        for path, _ in tokens.values():
            path.unlink(missing_ok=True)
    problems = []
    for name, (path, _) in tokens.items():
        failed = sorted(f"{ip} ({r['unreadable'][str(path)]})" for ip, r in results.items()
                        if str(path) in r["unreadable"])
        if failed:
            problems.append(f"shared path {path.parent} ({name}) is not readable and writable "
                            f"on node {', '.join(failed)}: put runtime.runs_root (stores and "
                            f"search folders) on a shared filesystem mounted at the same path "
                            f"on every node")
    for name, path in inputs.items():
        failed = sorted(f"{ip} ({r['missing'][str(path)]})" for ip, r in results.items()
                        if str(path) in r["missing"])
        if failed:
            problems.append(f"path {path} ({name}) is missing on node {', '.join(failed)}: "
                            f"put it on the shared filesystem or copy it to the same path on "
                            f"every node")
    if problems:
        raise UserError(" / ".join(problems) + f" ({GUIDE})")
    log.info("cluster check passed on %d node(s): %s", len(nodes), ", ".join(sorted(results)))


def _write_tokens(folders: Mapping[str, Path]) -> dict[str, tuple[Path, str]]:
    """A fresh random token per folder, written atomically (a reader never sees half a file);
    the random name keeps two searches that share a folder apart."""
    tokens: dict[str, tuple[Path, str]] = {}
    name = f"{TOKEN_PREFIX}{secrets.token_hex(8)}"
    try:
        for label, folder in folders.items():
            token = secrets.token_hex(16)
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(folder / name, token.encode())
            tokens[label] = (folder / name, token)
    except OSError as e:
        for path, _ in tokens.values():
            path.unlink(missing_ok=True)
        raise UserError(f"cannot write into {folder} ({label}) on this machine: {e}") from None
    return tokens


def _gather(refs: dict[Any, dict[str, Any]], timeout_s: float) -> dict[str, dict[str, Any]]:
    """Each node's probe result by node IP; a node whose probe fails or never runs is an error
    (a node without this package cannot run trials either)."""
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    if pending:
        ips = ", ".join(sorted(refs[r]["NodeManagerAddress"] for r in pending))
        raise UserError(f"the start-up check did not run on node {ips} within {timeout_s:g} s: "
                        f"is the node healthy (`ray status`)? ({GUIDE})")
    ips = [n["NodeManagerAddress"] for n in refs.values()]
    results = {}
    for ref in ready:
        node = refs[ref]
        ip = node["NodeManagerAddress"]
        if ips.count(ip) > 1:  # several nodes on one machine (a test cluster)
            ip = f"{ip}/{node['NodeID'][:8]}"
        try:
            results[ip] = ray.get(ref)
        except ray.exceptions.RayError as e:
            raise UserError(f"the start-up check failed on node {ip}: {first_line(e)}; is "
                            f"wsss-tune installed in the same Python environment on every node? "
                            f"({GUIDE})") from None
    return results


@ray.remote(num_cpus=0, max_retries=0)
def _probe(tokens: dict[str, str], listings: dict[str, list[str]],
           settle_s: float = 10.0) -> dict[str, Any]:
    """On one node: which token files are missing or differ (or whose folder takes no file
    from this node), and which input folders lack the names the driver listed. A missing token
    is looked for again for ``settle_s``: an NFS client may cache a folder's listing for some
    seconds."""
    unreadable: dict[str, str] = {}
    deadline = time.monotonic() + settle_s
    for path, expected in tokens.items():
        while True:
            try:
                found = Path(path).read_text()
                if found != expected:
                    unreadable[path] = "another file is there (not the driver's folder)"
                else:  # trials write checkpoints and stores there too: a read-only mount fails
                    mine = Path(f"{path}-{os.getpid()}")
                    mine.write_text(expected)
                    mine.unlink()
                break
            except OSError as e:
                if not isinstance(e, FileNotFoundError) or time.monotonic() > deadline:
                    unreadable[path] = e.strerror or str(e)
                    break
                try:
                    os.listdir(Path(path).parent)  # refreshes a cached listing
                except OSError:
                    pass
                time.sleep(0.5)
    missing: dict[str, str] = {}
    for folder, names in listings.items():
        try:
            lost = sorted(set(names) - set(os.listdir(folder)))
        except OSError as e:
            missing[folder] = e.strerror or str(e)
        else:
            if lost:
                missing[folder] = f"no {lost[0]}" + (f" and {len(lost) - 1} more" if lost[1:]
                                                     else "")
    return {"unreadable": unreadable, "missing": missing}


def _chain(error: BaseException) -> str:
    """The messages of an exception and its causes (Ray wraps an auth failure twice)."""
    parts = []
    while error is not None and len(parts) < 10:
        parts.append(str(error))
        error = error.__cause__ or error.__context__
    return " | ".join(parts)


