"""Benchmark: sparse `propagate` vs IRN's dense `propagate_to_edge` (our `propagate_dense`).

Time: 64x64 maps, 3 channels, radius 5, beta 10, 256 steps (IRN's exp_times 8); both must agree
within 5e-4 of the output's maximum. Memory: peak resident memory at 128x128, ours (256 steps)
vs the dense method with a single squaring, whose (HW)^2 float32 matrices are the whole point.
Each memory run is a fresh subprocess that resets its peak-RSS mark (Linux ``clear_refs``: the
imports' own peak would hide ours) and reads it (``VmHWM``) before and after the call. Not
``ru_maxrss``: it keeps the parent's RSS across fork + exec, and clear_refs does not reset that.
Not tracemalloc: torch allocates outside Python's allocator.
Targets: time ratio >= 40x, memory ratio >= 10x. The dense memory run alone takes about a
minute on two cores (one 16384 x 16384 matmul).

    python benchmarks/random_walk.py [--size 64] [--repeat 5] [--memory-size 128]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from timing import best_of

from wsss.random_walk import propagate, propagate_dense

TOLERANCE = 5e-4
"""Allowed |ours - dense| as a fraction of the output's maximum (float32 drift is ~1e-4)."""
CLEAR_REFS = Path("/proc/self/clear_refs")


def make_inputs(size: int, channels: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Blob-like CAMs and an edge map with a few sharp boundaries on a faint noisy floor."""
    g = torch.Generator().manual_seed(seed)
    cams = torch.rand(channels, size // 8, size // 8, generator=g)
    cams = torch.nn.functional.interpolate(cams[None], size=(size, size), mode="bilinear")[0]
    edge = 0.1 * torch.rand(size, size, generator=g)
    for line in torch.randint(0, size, (4,), generator=g).tolist():
        edge[line, :] = 0.9
        edge[:, line] = 0.9
    return cams, edge


def peak_rss() -> int:
    """This process's peak resident set since the last reset, in bytes."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024  # reported in kB


def memory_child(which: str, size: int) -> None:
    """Print the peak-RSS growth (bytes) of one call; runs in its own process."""
    cams, edge = make_inputs(size)
    CLEAR_REFS.write_text("5")  # peak RSS := current RSS
    before = peak_rss()
    if which == "ours":
        propagate(cams, edge, radius=5, beta=10, steps=256)
    else:
        propagate_dense(cams, edge, radius=5, beta=10, exp_times=1)
    print(peak_rss() - before)


def peak_bytes(which: str, size: int) -> int:
    out = subprocess.run([sys.executable, __file__, "--memory-child", which, "--memory-size",
                          str(size)], check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--memory-size", type=int, default=128)
    ap.add_argument("--memory-child", choices=["ours", "dense"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.memory_child:
        memory_child(args.memory_child, args.memory_size)
        return

    cams, edge = make_inputs(args.size)
    t_ours, ours = best_of(lambda: propagate(cams, edge, radius=5, beta=10, steps=256),
                           args.repeat)
    t_dense, dense = best_of(lambda: propagate_dense(cams, edge, radius=5, beta=10,
                                                     exp_times=8), 1)
    rel = float((ours - dense).abs().max() / dense.abs().max())
    print(f"{args.size}x{args.size}, 3 channels, radius 5, beta 10, 256 steps: ours "
          f"{t_ours * 1e3:.1f} ms, dense {t_dense:.2f} s, max |difference| / max {rel:.1e}")
    print(f"random_walk: ratio={t_dense / t_ours:.1f} (ours vs dense IRN propagate_to_edge)")

    m = args.memory_size
    if CLEAR_REFS.exists():
        ours_peak, dense_peak = peak_bytes("ours", m), peak_bytes("dense", m)
        print(f"{m}x{m} peak memory: ours {ours_peak / 2**20:.1f} MiB (256 steps), "
              f"dense {dense_peak / 2**20:.1f} MiB (exp_times=1)")
        print(f"random_walk_memory: ratio={dense_peak / max(ours_peak, 1):.1f} "
              f"(dense peak / ours peak at {m}x{m})")
    else:
        print("random_walk_memory: skipped (needs Linux /proc/self/clear_refs)")
    if rel > TOLERANCE:
        raise SystemExit(f"outputs differ by {rel:.1e} of the maximum (> {TOLERANCE})")


if __name__ == "__main__":
    main()
