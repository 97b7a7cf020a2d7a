"""Random walk of class scores over an edge-aware affinity graph (IRN's ``propagate_to_edge``).

IRN builds a dense ``(HW) x (HW)`` transition matrix and squares it ``exp_times`` times:
``O((HW)^3)`` time and ``O((HW)^2)`` memory (1 GiB per matrix at 128x128). Every pixel only has
neighbours within ``radius`` though (69 of them, itself included, at radius 5), so
:func:`propagate` runs the same walk as ``steps`` rounds of a local gather + weighted sum, in
``O(steps * HW * (2 * radius - 1)^2)`` time and ``O(HW * (2 * radius - 1)^2)`` memory.

IRN's graph, which both functions here build from the same paths (:func:`_half_plane_paths`):

* neighbours of a pixel are the offsets ``(dy, dx)`` with ``dy**2 + dx**2 < radius**2``; IRN lists
  the half-plane ``dy > 0 or (dy == 0 and dx > 0)``, mirrors it (the matrix plus its transpose)
  and adds a self-loop of affinity 1;
* the affinity of a pair is ``1 - max(edge)`` over the pixels of their discretised path, both ends
  included; pairs leaving the image have affinity 0 (IRN pads the edge map with 1.0 on the left,
  right and bottom, then crops the padding away);
* affinities are raised to ``beta`` and each **column** is divided by its sum (column ``j`` holds
  what pixel ``j`` receives), so one step is ``x @ T``; the walk starts at ``cams * (1 - edge)``.
"""

from __future__ import annotations

import warnings
from functools import cache
from numbers import Integral

import torch
import torch.nn.functional as F

Offset = tuple[int, int]


@cache
def _half_plane_paths(radius: int) -> tuple[tuple[Offset, tuple[Offset, ...]], ...]:
    """IRN's half-plane neighbour offsets, each with the pixels its path crosses.

    The path from ``(0, 0)`` to ``(dy, dx)`` is every pixel of their bounding box whose distance
    to the line through them is below 1 (IRN's ``get_all_dir_paths``), both ends included: a
    boundary on either pixel, or anywhere between them, cuts the pair apart. The other half-plane
    is the mirror image, so it needs no paths of its own.
    """
    out = []
    for dy in range(radius):
        for dx in range(-radius + 1, radius):
            if (dy == 0 and dx <= 0) or dy * dy + dx * dx >= radius * radius:
                continue
            length_sq = dy * dy + dx * dx
            path = tuple(
                (y, x)
                for y in range(min(0, dy), max(0, dy) + 1)
                for x in range(min(0, dx), max(0, dx) + 1)
                if (dy * x - dx * y) ** 2 < length_sq)
            out.append(((dy, dx), path))
    return tuple(out)


def half_plane_offsets(radius: int) -> list[Offset]:
    """IRN's half-plane neighbour offsets ``(dy, dx)`` for ``radius``, in a fixed order: the pairs
    AffinityNet is trained on (each unordered pair once) and the order of `half_plane_affinity`."""
    return [offset for offset, _ in _half_plane_paths(radius)]


def half_plane_affinity(edge: torch.Tensor, radius: int) -> torch.Tensor:
    """IRN's affinities from a boundary map: ``[B, n_half, H, W]``, entry ``[b, k, y, x]`` the
    affinity of pixel ``(y, x)`` to its neighbour at ``half_plane_offsets(radius)[k]``.

    Differentiable in ``edge`` (a max over the path), so AffinityNet trains through it.

    The edge map is padded with 1.0 like IRN's, and a pair's destination is on its path, so a
    neighbour outside the image gets affinity exactly 0 with no mask. On a GPU the path pixels
    are read with one gather (`_gathered_path_max`): as one slice per path pixel (2,134 at
    radius 10) the backward pass alone launches thousands of kernels per batch.
    """
    r = radius - 1
    h, w = edge.shape[-2:]
    padded = F.pad(edge, (r, r, 0, r), value=1.0)
    if edge.is_cuda:
        return 1 - _gathered_path_max(padded, radius, h, w)
    maps = []
    for _, path in _half_plane_paths(radius):
        on_path = [padded[:, y:y + h, r + x:r + x + w] for y, x in path]
        maps.append(1 - torch.stack(on_path).amax(0))
    return torch.stack(maps, 1) if maps else edge.new_zeros(edge.shape[0], 0, h, w)


def _gathered_path_max(padded: torch.Tensor, radius: int, h: int, w: int) -> torch.Tensor:
    """``[B, n_half, h, w]``: the max of the padded edge map over each offset's path, from one
    ``index_select`` of every (offset, path pixel, pixel) triple (shorter paths are filled with
    a sentinel of -1, never the max); the same values and gradients as the sliced version."""
    b, hp, wp = padded.shape
    paths = _half_plane_paths(radius)
    if not paths:
        return padded.new_zeros(b, 0, h, w)
    longest = max(len(p) for _, p in paths)
    delta = torch.zeros((len(paths), longest), dtype=torch.int64)
    valid = torch.zeros((len(paths), longest), dtype=torch.bool)
    for k, (_, path) in enumerate(paths):
        delta[k, :len(path)] = torch.tensor([y * wp + x for y, x in path])
        valid[k, :len(path)] = True
    device = padded.device
    base = (torch.arange(h, device=device)[:, None] * wp + torch.arange(w, device=device)
            + (radius - 1))
    index = torch.where(valid.to(device)[:, :, None, None],
                        base + delta.to(device)[:, :, None, None], hp * wp)
    flat = torch.cat([padded.reshape(b, -1), padded.new_full((b, 1), -1.0)], 1)
    return flat.index_select(1, index.reshape(-1)).reshape(b, len(paths), longest, h, w).amax(2)


def _neighbour_affinity(half: torch.Tensor, radius: int) -> tuple[list[Offset], torch.Tensor]:
    """All neighbour offsets (sorted) and the ``[B, K, H, W]`` affinity of each pixel to them,
    from the ``[B, n_half, H, W]`` half-plane affinities (`half_plane_offsets` order).

    The far half is IRN's transpose: the affinity of ``p`` to ``p - d`` is the one ``p - d``
    has to ``p``, i.e. the half-plane map shifted by ``d``; the zero padding gives pairs leaving
    the image affinity 0. The self-loop is 1, as IRN's identity term.
    """
    r = radius - 1
    h, w = half.shape[-2:]
    by_offset = {(0, 0): half.new_ones(half.shape[0], h, w)}
    for k, (dy, dx) in enumerate(half_plane_offsets(radius)):
        aff = half[:, k]
        by_offset[dy, dx] = aff
        by_offset[-dy, -dx] = F.pad(aff, (r, r, r, r))[:, r - dy:r - dy + h, r - dx:r - dx + w]
    offsets = sorted(by_offset)
    return offsets, torch.stack([by_offset[o] for o in offsets], 1)


def _transition(half: torch.Tensor, radius: int, beta: float) -> torch.Tensor:
    """The walk's ``(B*HW) x (B*HW)`` sparse CSR matrix ``M``, one step being ``y = M @ x``.

    Row ``p`` holds ``aff(p, q)**beta / sum_q' aff(p, q')**beta`` for its in-image neighbours
    ``q``: IRN's column normalisation (``T / T.sum(0)``) applied to its symmetric matrix, read
    as the rows of ``T.T`` so that each step gathers what a pixel receives. The batch is block
    diagonal. CSR SpMM with int32 indices was the fastest step measured (64x64, 256 steps, two
    CPU threads): 33 ms, vs 130 ms for 69 shifted-slice ``addcmul_``s, 230 ms for ``unfold``
    and 740 ms for an index gather.
    """
    b, _, h, w = half.shape
    offsets, aff = _neighbour_affinity(half, radius)
    weight = aff.pow(beta)
    weight = weight / weight.sum(1, keepdim=True)
    device = half.device
    ys = torch.arange(h, device=device).view(h, 1, 1)
    xs = torch.arange(w, device=device).view(1, w, 1)
    dy = torch.tensor([o[0] for o in offsets], device=device)
    dx = torch.tensor([o[1] for o in offsets], device=device)
    inside = (ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)  # [H, W, K]
    cols = ((ys + dy) * w + xs + dx)[inside]
    cols = (cols + torch.arange(b, device=device).view(b, 1) * (h * w)).reshape(-1)
    values = weight.permute(0, 2, 3, 1)[:, inside].reshape(-1)
    counts = inside.sum(-1).reshape(-1).repeat(b)
    crow = F.pad(counts.cumsum(0), (1, 0))
    n = b * h * w
    with warnings.catch_warnings():  # "CSR support is in beta": SpMM itself is long stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow.int(), cols.int(), values, (n, n),
                                       check_invariants=False)


def _checked(cams: torch.Tensor, edge: torch.Tensor, radius: int, beta: float, *,
             batched: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``cams`` and ``edge`` as ``[B, C, H, W]`` and ``[B, H, W]``, or a ValueError saying why.

    Half-precision inputs are promoted to float32: 256 steps need the accumulation precision
    (and CPU sparse kernels have no half support).
    """
    shapes = f"cams {tuple(cams.shape)}, edge {tuple(edge.shape)}"
    if not cams.is_floating_point():
        raise ValueError(f"cams must be a floating-point tensor, got {cams.dtype}")
    if cams.dim() == 3 and edge.dim() == 2:
        cams, edge = cams.unsqueeze(0), edge.unsqueeze(0)
    elif not (batched and cams.dim() == 4 and edge.dim() == 3):
        want = "[C, H, W] with [H, W]" + (", or [B, C, H, W] with [B, H, W]" if batched else "")
        raise ValueError(f"expected cams and edge shaped {want}; got {shapes}")
    if cams.shape[0] != edge.shape[0] or cams.shape[-2:] != edge.shape[-2:]:
        raise ValueError(f"cams and edge disagree on batch or map size: {shapes}")
    if cams.device != edge.device:
        raise ValueError(f"cams on {cams.device} but edge on {edge.device}")
    _check_count("radius", radius, minimum=1)
    # 0**0 == 1: at beta <= 0, IRN's dense pow would link every pair of pixels, even far apart.
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    cams = cams.to(torch.promote_types(cams.dtype, torch.float32))
    edge = edge.to(cams.dtype)
    if not bool(((edge >= 0) & (edge <= 1)).all()):
        raise ValueError("edge must lie in [0, 1] (a boundary probability)")
    return cams, edge


def _check_count(name: str, value: int, minimum: int = 0) -> None:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@torch.no_grad()
def walk(scores: torch.Tensor, half: torch.Tensor, *, radius: int, beta: float,
         steps: int) -> torch.Tensor:
    """``steps`` random-walk steps of ``scores`` ``[B, C, H, W]`` over a graph given by its
    half-plane affinities ``half`` ``[B, n_half, H, W]`` in [0, 1] (`half_plane_offsets` order;
    mirrored, with self-loops of 1, raised to ``beta`` and column-normalised as IRN and PSA do).
    Any affinity model feeds it: IRN's boundary paths (`propagate`) or PSA's feature distances.
    """
    _check_count("radius", radius, minimum=1)
    _check_count("steps", steps)
    # 0**0 == 1: at beta <= 0, IRN's dense pow would link every pair of pixels, even far apart.
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    b, c, h, w = scores.shape
    want = (b, len(half_plane_offsets(radius)), h, w)
    if tuple(half.shape) != want:
        raise ValueError(f"half-plane affinities {tuple(half.shape)} do not match scores "
                         f"{tuple(scores.shape)} at radius {radius}: expected {want}")
    if steps == 0 or scores.numel() == 0:
        return scores
    step = _transition(half.to(scores.dtype), radius, beta)
    y = scores.permute(0, 2, 3, 1).reshape(b * h * w, c)
    for _ in range(steps):
        y = step @ y
    return y.view(b, h, w, c).permute(0, 3, 1, 2)


@torch.no_grad()
def propagate(cams: torch.Tensor, edge: torch.Tensor, *, radius: int = 5, beta: float = 10,
              steps: int = 256) -> torch.Tensor:
    """Spread class scores ``steps`` random-walk steps within regions closed by ``edge``.

    ``cams`` is ``[C, H, W]`` with ``edge`` ``[H, W]``, or ``[B, C, H, W]`` with ``[B, H, W]``;
    ``edge`` is a boundary probability in [0, 1]. Returns the shape of ``cams`` on its device.
    Equals IRN's ``propagate_to_edge(cams, edge, radius, beta, exp_times)`` for
    ``steps = 2**exp_times`` (up to float rounding), without its ``(HW)^2`` matrix, and takes
    any step count. Inference only: no autograd graph is recorded.
    """
    cams4, edge3 = _checked(cams, edge, radius, beta, batched=True)
    _check_count("steps", steps)
    start = cams4 * (1 - edge3.unsqueeze(1))
    half = half_plane_affinity(edge3, radius) if steps and start.numel() else None
    out = start if half is None else walk(start, half, radius=radius, beta=beta, steps=steps)
    return out.reshape(cams.shape).to(cams.dtype)


@torch.no_grad()
def propagate_dense(cams: torch.Tensor, edge: torch.Tensor, *, radius: int = 5,
                    beta: float = 10, exp_times: int = 8) -> torch.Tensor:
    """IRN's dense ``propagate_to_edge``, re-implemented: for tests and benchmarks only.

    Builds the ``(HW) x (HW)`` affinity matrix as IRN does (half-plane pairs, plus the
    transpose, plus the identity), raises it to ``beta``, divides each column by its sum, squares
    it ``exp_times`` times and applies it once: ``2**exp_times`` steps at ``O((HW)^3)`` time and
    ``O((HW)^2)`` memory, hence :func:`propagate` for real use. ``cams`` ``[C, H, W]``, ``edge``
    ``[H, W]``; returns ``[C, H, W]``.
    """
    cams4, edge3 = _checked(cams, edge, radius, beta, batched=False)
    _check_count("exp_times", exp_times)
    c, h, w = cams.shape
    n = h * w
    pixel = torch.arange(n, device=cams.device).view(h, w)
    matrix = cams4.new_zeros(n, n)
    half = half_plane_affinity(edge3, radius)
    for (dy, dx), aff in zip(half_plane_offsets(radius), half.unbind(1)):
        rows, cols = slice(0, h - dy), slice(max(0, -dx), w - max(0, dx))  # neighbour inside
        src = pixel[rows, cols]
        dst = src + dy * w + dx
        matrix[src, dst] = matrix[dst, src] = aff[0, rows, cols]
    matrix.diagonal().fill_(1)
    matrix.pow_(beta)
    matrix /= matrix.sum(0, keepdim=True)
    for _ in range(exp_times):
        matrix = matrix @ matrix
    x = (cams4[0] * (1 - edge3[0])).reshape(c, n)
    return (x @ matrix).view(c, h, w).to(cams.dtype)
