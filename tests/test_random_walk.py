"""The sparse random walk equals IRN's dense `propagate_to_edge` (our `propagate_dense`)."""

from __future__ import annotations

import pytest
import torch

from wsss.random_walk import _half_plane_paths, half_plane_affinity, propagate, propagate_dense

TOL = 5e-4  # of the output's maximum: 256 float32 steps alone drift ~1.5e-4


def _maps(h: int, w: int, seed: int, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(channels, h, w, generator=g), torch.rand(h, w, generator=g) ** 3


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return float((got - want).abs().max()) <= TOL * float(want.abs().max())


@pytest.mark.parametrize("h, w", [(7, 9), (12, 12), (16, 20)])
@pytest.mark.parametrize("radius", [1, 2, 3, 5])
@pytest.mark.parametrize("exp_times", [0, 1, 3, 6, 8])
def test_sparse_equals_dense(h: int, w: int, radius: int, exp_times: int) -> None:
    cams, edge = _maps(h, w, seed=h * 100 + radius * 10 + exp_times)
    got = propagate(cams, edge, radius=radius, beta=10, steps=2 ** exp_times)
    want = propagate_dense(cams, edge, radius=radius, beta=10, exp_times=exp_times)
    assert got.shape == cams.shape
    assert _close(got, want)


@pytest.mark.parametrize("beta", [1, 2.5])
def test_sparse_equals_dense_other_beta(beta: float) -> None:
    cams, edge = _maps(10, 11, seed=7)
    got = propagate(cams, edge, radius=4, beta=beta, steps=64)
    assert _close(got, propagate_dense(cams, edge, radius=4, beta=beta, exp_times=6))


def test_any_step_count_composes() -> None:
    """``a + b`` steps = ``a`` steps, then ``b`` more (undoing the second start's ``1 - edge``)."""
    cams, edge = _maps(9, 8, seed=3)
    edge = edge.clamp(max=0.9)
    for a, b in [(1, 2), (2, 3), (4, 7)]:
        first = propagate(cams, edge, radius=3, steps=a)
        again = propagate(first / (1 - edge), edge, radius=3, steps=b)
        assert torch.allclose(propagate(cams, edge, radius=3, steps=a + b), again, atol=1e-6)


def test_batch_equals_per_item() -> None:
    pairs = [_maps(11, 13, seed=s, channels=4) for s in range(3)]
    cams = torch.stack([c for c, _ in pairs])
    edge = torch.stack([e for _, e in pairs])
    got = propagate(cams, edge, radius=5, steps=37)
    assert got.shape == cams.shape
    for i, (c, e) in enumerate(pairs):
        assert torch.allclose(got[i], propagate(c, e, radius=5, steps=37), atol=1e-6)


def test_half_precision_is_walked_in_float32() -> None:
    cams, edge = _maps(8, 8, seed=2)
    got = propagate(cams.half(), edge.half(), steps=64)
    assert got.dtype == torch.float16
    want = propagate(cams.half().float(), edge.half().float(), steps=64)
    assert torch.allclose(got.float(), want, atol=1e-3)


def test_zero_steps_is_the_start() -> None:
    cams, edge = _maps(6, 5, seed=1)
    assert torch.equal(propagate(cams, edge, steps=0), cams * (1 - edge))


def test_offsets_and_paths() -> None:
    """IRN's offsets: a strict disk, listed as a half-plane; paths hug the segment."""
    half = dict(_half_plane_paths(5))
    assert len(half) == 34  # 2 * 34 + 1 (self) = 69 neighbours: every dy^2 + dx^2 < 25
    assert (0, 5) not in half and (3, 4) not in half and (3, 3) in half and (4, -2) in half
    assert set(half[1, 1]) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert set(half[2, 3]) == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3), (2, 2), (2, 3)}
    assert set(half[0, 4]) == {(0, x) for x in range(5)}
    assert set(half[3, -1]) == {(y, x) for y in range(4) for x in (-1, 0)}  # |dx| = 1: the box
    assert set(half[4, 2]) == {(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (3, 1),
                               (3, 2), (4, 1), (4, 2)}
    assert _half_plane_paths(1) == ()


def test_hand_checked_row() -> None:
    """1x3, radius 2, beta 1, edge [0, 0.5, 0]: A = [[1, .5, 0], [.5, 1, .5], [0, .5, 1]].

    Pixels 0 and 2 are 2 apart, not < 2: no link. Column sums (1.5, 2, 1.5); from x = (1, 0, 0):
    one step gives row 0 of A / colsum, two steps (19/36, 7/24, 1/12).
    """
    cams = torch.tensor([[[1.0, 0.0, 0.0]]])
    edge = torch.tensor([[0.0, 0.5, 0.0]])
    one = propagate(cams, edge, radius=2, beta=1, steps=1)
    two = propagate(cams, edge, radius=2, beta=1, steps=2)
    assert torch.allclose(one, torch.tensor([[[2 / 3, 1 / 4, 0.0]]]))
    assert torch.allclose(two, torch.tensor([[[19 / 36, 7 / 24, 1 / 12]]]))


def test_high_edge_blocks_propagation() -> None:
    cams = torch.tensor([[[1.0, 0.0, 0.0]]])
    edge = torch.tensor([[0.0, 1.0, 0.0]])
    assert torch.equal(propagate(cams, edge, radius=2, steps=256), cams)


def test_edge_between_diagonal_neighbours_cuts_them() -> None:
    """2x2, radius 2, a boundary only on (0, 1): the diagonal pair's path crosses it.

    Affinities: a=(0,0)-c=(1,0) 1, c-d=(1,1) 1, everything touching b=(0,1) 0, and a-d 0 since
    its path is the whole 2x2 box. Column sums (a, b, c, d) = (2, 1, 3, 2), so one step from a
    gives (1/2, 0, 1/3, 0); counting only the two ends would give d 1/3.
    """
    cams = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    edge = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    got = propagate(cams, edge, radius=2, beta=10, steps=1)
    assert torch.allclose(got, torch.tensor([[[1 / 2, 0.0], [1 / 3, 0.0]]]))


def test_no_edges_spreads_towards_uniform() -> None:
    """With affinity 1 everywhere, ``x @ T^n`` tends to ``sum(x * degree) / sum(degree)``."""
    cams = torch.zeros(1, 8, 8)
    cams[0, 0, 0] = 1.0
    edge = torch.zeros(8, 8)
    ys, xs = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    degree = sum(((ys + dy) % 8 == ys + dy) & ((xs + dx) % 8 == xs + dx)
                 for dy in range(-2, 3) for dx in range(-2, 3) if dy * dy + dx * dx < 9)
    limit = float(degree[0, 0]) / float(degree.sum())
    short = propagate(cams, edge, radius=3, beta=10, steps=4)
    got = propagate(cams, edge, radius=3, beta=10, steps=512)
    assert torch.allclose(got, torch.full_like(got, limit), rtol=1e-3)
    assert float(short.std()) > 0.1 * float(short.mean())


@pytest.mark.parametrize("cams, edge", [
    (torch.rand(4, 4), torch.rand(4, 4)),
    (torch.rand(2, 4, 4), torch.rand(4, 5)),
    (torch.rand(2, 4, 4), torch.rand(2, 4, 4)),
    (torch.rand(2, 2, 4, 4), torch.rand(3, 4, 4)),
    (torch.rand(2, 2, 4, 4), torch.rand(4, 4)),
    (torch.ones(2, 4, 4, dtype=torch.int64), torch.rand(4, 4)),
    (torch.rand(2, 4, 4), torch.rand(4, 4) + 1),
])
def test_bad_inputs_raise(cams: torch.Tensor, edge: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        propagate(cams, edge)


@pytest.mark.parametrize("kwargs", [{"radius": 0}, {"radius": 2.5}, {"steps": -1},
                                    {"steps": 1.0}, {"beta": 0}])
def test_bad_arguments_raise(kwargs: dict) -> None:
    cams, edge = _maps(4, 4, seed=0)
    with pytest.raises(ValueError):
        propagate(cams, edge, **kwargs)


def test_dense_rejects_batches() -> None:
    with pytest.raises(ValueError):
        propagate_dense(torch.rand(1, 2, 4, 4), torch.rand(1, 4, 4))
    with pytest.raises(ValueError):
        propagate_dense(torch.rand(2, 4, 4), torch.rand(4, 4), exp_times=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    """CPU and CUDA sum in different orders, so their float32 walks differ by rounding (5e-5 of
    the max after 100 steps on an H200): each must stay within float32's own error, measured
    against the float64 walk (5.3e-5 here; IRN's float32 vs float64 gap is ~1e-4), and in
    float64 the two devices agree to 1e-10."""
    cams, edge = _maps(20, 24, seed=5)
    exact = propagate(cams.double(), edge.double(), radius=5, steps=100)
    on_gpu = propagate(cams.double().cuda(), edge.double().cuda(), radius=5, steps=100)
    assert on_gpu.device.type == "cuda"
    assert float((on_gpu.cpu() - exact).abs().max()) <= 1e-10 * float(exact.abs().max())
    for device in ("cpu", "cuda"):
        got = propagate(cams.to(device), edge.to(device), radius=5, steps=100).cpu().double()
        assert float((got - exact).abs().max()) <= 1e-4 * float(exact.abs().max()), device
    dense = propagate_dense(cams.cuda(), edge.cuda(), radius=5, exp_times=4)
    assert _close(propagate(cams.cuda(), edge.cuda(), radius=5, steps=16), dense)


@pytest.mark.parametrize("radius", [1, 2, 5, 10])
def test_gathered_path_max_equals_the_sliced_one(radius: int) -> None:
    """The GPU formulation of IRN's path affinities (one gather) gives the sliced CPU one's
    values and gradients exactly; run here on CPU tensors."""
    import torch.nn.functional as F

    from wsss.random_walk import _gathered_path_max

    edge = torch.rand(2, 9, 11, generator=torch.Generator().manual_seed(radius),
                      requires_grad=True)
    sliced = half_plane_affinity(edge, radius)
    r = radius - 1
    padded = F.pad(edge, (r, r, 0, r), value=1.0)
    gathered = 1 - _gathered_path_max(padded, radius, 9, 11)
    assert torch.equal(sliced, gathered)
    if radius == 1:  # no neighbour at radius 1: nothing to differentiate
        assert sliced.shape[1] == 0
        return
    weights = torch.rand_like(sliced)
    (want,) = torch.autograd.grad((sliced * weights).sum(), edge)
    (got,) = torch.autograd.grad((gathered * weights).sum(), edge)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
