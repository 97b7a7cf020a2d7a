"""Affinity labels (IRN's scheme) on a hand-drawn map, the edge head and its loss."""

import numpy as np
import pytest
import torch

from wsss.random_walk import half_plane_affinity, half_plane_offsets
from wsss.refine.affinity import affinity_labels, affinity_loss, downsample_regions
from wsss.refine.irn import EdgeHead

N = 255
REGIONS = np.array([
    [0, 0, 0, N, 1, 1],
    [0, 0, 0, N, 1, 1],
    [0, 0, N, 1, 1, 1],
    [2, 2, N, 1, 1, 1],
    [2, 2, 0, 0, N, N],
    [2, 2, 0, 0, N, N],
], dtype=np.uint8)


def test_offsets_follow_irn_radius_rule():
    assert half_plane_offsets(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]
    assert len(half_plane_offsets(5)) == 34  # 68 neighbours + the self-loop = IRN's 69


def test_labels_on_a_hand_drawn_map():
    bg, fg, neg = affinity_labels(REGIONS, radius=2)
    k = {o: i for i, o in enumerate(half_plane_offsets(2))}
    assert bg[k[0, 1], 0, 0] and not fg[k[0, 1], 0, 0]          # 0 -> 0: background positive
    assert fg[k[0, 1], 0, 4]                                     # 1 -> 1: foreground positive
    assert neg[k[1, 0], 2, 1]                                    # 0 -> 2: negative
    assert neg[k[1, 1], 3, 1]                                    # 2 -> 0 (diagonal): negative
    assert fg[k[1, 0], 2, 3]                                     # 1 -> 1 below
    for y, x, o in [(0, 2, (0, 1)), (2, 3, (1, -1)), (0, 5, (0, 1)), (5, 0, (1, 0)),
                    (4, 3, (0, 1))]:                              # neutral end or off the map
        assert not (bg[k[o], y, x] or fg[k[o], y, x] or neg[k[o], y, x])
    # every entry equals a direct per-pair reading of IRN's rule
    for (dy, dx), i in k.items():
        for y in range(6):
            for x in range(6):
                a = REGIONS[y, x]
                inside = 0 <= y + dy < 6 and 0 <= x + dx < 6
                b = REGIONS[y + dy, x + dx] if inside else N
                valid = a != N and b != N
                assert bg[i, y, x] == (valid and a == b == 0)
                assert fg[i, y, x] == (valid and a == b != 0)
                assert neg[i, y, x] == (valid and a != b)


def test_downsample_takes_cell_centres():
    full = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert downsample_regions(full, (2, 2), 4).tolist() == [[18, 22], [50, 54]]
    assert downsample_regions(full[:7, :7], (2, 2), 4).tolist() == [[18, 22], [50, 54]]


def test_edge_head_learns_a_boundary():
    """A few steps of IRN's loss on one labelled map lower the boundary inside regions and
    raise it between them: a broken head, path or loss does not."""
    torch.manual_seed(0)
    regions = np.zeros((8, 8), np.uint8)
    regions[:, 4:] = 1
    feats = [torch.randn(1, 6, 8, 8)]
    feats[0][:, 0, :, 4:] += 3.0  # the features carry the split
    head = EdgeHead([6], hidden=8)
    labels = [torch.from_numpy(m[None].astype(np.float32)) for m in affinity_labels(regions, 3)]
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        edge = torch.sigmoid(head(feats, (8, 8)))
        loss = affinity_loss(half_plane_affinity(edge, 3), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    edge = torch.sigmoid(head(feats, (8, 8)))[0].detach()
    assert losses[-1] < losses[0] / 2
    assert edge[:, 3:5].mean() > edge[:, :2].mean() + 0.3


def test_crf_regions_follow_the_image():
    """The dense CRF snaps a blurred foreground region to the object's colour edge and keeps the
    neutral band's semantics (fg from the FG map, bg where both maps say background)."""
    pytest.importorskip("pydensecrf.densecrf", reason="needs the [crf] extra (pydensecrf2)")
    from wsss.regions import confident_regions, crf_regions

    image = np.full((32, 32, 3), 20, np.uint8)
    image[8:24, 8:24] = 230  # a bright square object
    yy, xx = np.mgrid[0:32, 0:32]
    score = np.clip(1.2 - np.hypot(yy - 15.5, xx - 15.5) / 14, 0, 1)[None].astype(np.float32)
    plain = confident_regions(score, np.array([3]), 0.2, 0.6)
    clean = crf_regions(image, score, np.array([3]), 0.2, 0.6)
    assert set(np.unique(clean)) <= {0, 3, 255}
    truth = np.zeros((32, 32), bool)
    truth[8:24, 8:24] = True
    agree = lambda r: ((r == 3) == truth).mean()  # noqa: E731
    assert agree(clean) > agree(plain)
    assert (clean[truth] != 0).all() and (clean[~truth] != 3).mean() > 0.95
