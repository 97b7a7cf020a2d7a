"""Memory-mapped stores: round trip, read-only reopen, manifest checks, atomic writes."""

import numpy as np
import pytest

from wsss.cam import strided_size
from wsss.errors import UserError
from wsss.regions import cam_scores
from wsss.store import CamStore, RaggedStore


def _write(path, manifest=None):
    arrays = [np.arange(6, dtype=np.float32).reshape(1, 2, 3), np.ones((2, 1, 2)),
              np.zeros((0, 2, 2))]
    store = CamStore.write(path, ["a", "b", "c"], [a.shape for a in arrays], iter(arrays),
                           manifest or {"kind": "cams", "x": 1},
                           meta={"keys": [[3], [1, 2], []], "image_size": [[4, 6], [2, 4], [8, 8]]})
    return store, arrays


def test_round_trip_is_float16_readonly_memmap(tmp_path):
    store, arrays = _write(tmp_path / "s")
    again = CamStore(tmp_path / "s")
    assert len(again) == 3 and again.ids == ["a", "b", "c"]
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(again[i], a.astype(np.float16))
        assert again[i].dtype == np.float16
    assert again.keys(1).tolist() == [1, 2] and again.image_size(0) == (4, 6)
    assert isinstance(again[0].base, np.memmap) or isinstance(again[0], np.memmap)
    with pytest.raises(ValueError):
        again[0][0, 0, 0] = 1  # read-only: trials can never corrupt the shared store
    assert again.position("c") == 2
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temp folder left behind


def test_manifest_decides_reuse_and_rewrite_replaces(tmp_path):
    _write(tmp_path / "s", {"kind": "cams", "x": 1})
    assert RaggedStore.is_current(tmp_path / "s", {"kind": "cams", "x": 1})
    assert not RaggedStore.is_current(tmp_path / "s", {"kind": "cams", "x": 2})
    assert not RaggedStore.is_current(tmp_path / "missing", {"kind": "cams", "x": 1})
    _write(tmp_path / "s", {"kind": "cams", "x": 2})
    assert RaggedStore.is_current(tmp_path / "s", {"kind": "cams", "x": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_wrong_shape_or_count_never_publishes_a_store(tmp_path):
    with pytest.raises(ValueError, match="declared"):
        RaggedStore.write(tmp_path / "s", ["a"], [(2, 2)], iter([np.zeros((3, 2))]), {})
    with pytest.raises(ValueError, match="1 arrays for 2 ids"):
        RaggedStore.write(tmp_path / "s", ["a", "b"], [(1,), (1,)], iter([np.zeros(1)]), {})
    assert not (tmp_path / "s").exists()


def test_damaged_store_is_a_user_error(tmp_path):
    _write(tmp_path / "s")
    (tmp_path / "s" / "index.json").write_text("{not json")
    with pytest.raises(UserError, match="damaged"):
        CamStore(tmp_path / "s")


def test_scores_are_upsampled_then_normalised_per_class():
    cam = np.array([[[0.0, 2.0], [1.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]], np.float16)
    s = cam_scores(cam, (4, 4))
    assert s.shape == (2, 4, 4) and s.dtype == np.float32
    assert s[0].max() == 1.0 and s[0].min() == 0.0  # the peak is exactly 1 after upsampling
    assert (s[1] == 0).all()  # an all-zero CAM stays zero
    assert cam_scores(np.zeros((0, 2, 2)), (3, 5)).shape == (0, 3, 5)
    assert strided_size((375, 500), 4) == (94, 125)  # IRN's ceil(size / stride)


def test_a_store_write_removes_what_a_killed_writer_left(tmp_path):
    """A stage 0 killed while writing leaves `.<store>.tmp-<pid>`; the next write removes such
    folders of dead writers and keeps those of live ones."""
    import os
    import subprocess

    from wsss.store import CamStore

    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = tmp_path / f".cams-abc.tmp-{dead.pid}"
    (orphan / "sub").mkdir(parents=True)
    live = tmp_path / f".cams-def.tmp-{os.getppid()}"
    live.mkdir()
    CamStore.write(tmp_path / "cams-new", ["a"], [(1, 2, 2)], [np.ones((1, 2, 2))], {"k": 1},
                   meta={"keys": [[1]], "image_size": [[8, 8]]})
    assert not orphan.exists() and live.exists() and (tmp_path / "cams-new").is_dir()
