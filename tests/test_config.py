"""Config loading: packaged configs, --set overrides, and errors that name the key."""

from pathlib import Path

import pytest

from tune.config import apply_override, load_config, packaged_configs
from tune.space import grid_pairs
from wsss.errors import UserError


def test_packaged_configs_load_and_resolve_paths(tmp_path):
    assert {"demo", "ci", "voc_paper"} <= set(packaged_configs())
    for name in packaged_configs():
        cfg = load_config(name, base_dir=tmp_path)
        assert cfg.name == name
        assert cfg.data.root.is_absolute() and cfg.runtime.runs_root.is_absolute()
    demo = load_config("demo", base_dir=tmp_path)
    assert demo.data.root == tmp_path / "data" / "synthetic-demo"
    assert demo.data.synthetic.n_train == 800


def test_top_level_configs_are_the_packaged_ones():
    top = Path(__file__).resolve().parents[1] / "configs"
    assert sorted(p.stem for p in top.glob("*.yaml")) == packaged_configs()


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config("ci", ["classifier.epochs=3", "cam.scales=[1.0, 0.5]",
                             "data.synthetic.seed=7", "runtime.threads=1"], base_dir=tmp_path)
    assert cfg.classifier.epochs == 3 and cfg.cam.scales == [1.0, 0.5]
    assert cfg.data.synthetic.seed == 7 and cfg.runtime.threads == 1


@pytest.mark.parametrize("override,message", [
    ("classifier.epoch=3", r"classifier\.epoch: unknown key"),
    ("classifier.epochs=many", r"classifier\.epochs: .*integer"),
    ("classifier.epochs=0", r"classifier\.epochs: .*greater than or equal to 1"),
    ("cam.scales=[1.0, -2]", r"cam\.scales: .*> 0"),
    ("runtime.device=tpu", r"runtime\.device"),
    ("surfac.space=paper", r"surfac: unknown key"),
    ("surface.space=pairs", r"surface: .*non-empty 'pairs'"),
    ("classifier.scale_range=[1.5, 0.5]", r"classifier\.scale_range"),
    ("search.objective=pqs", r"search\.objective 'pqs' is not registered"),
    ("search.space=pairs", r"search: .*non-empty 'pairs'"),
    ("search.pick=best", r"search\.pick"),
    ("refine.irn.steps=-1", r"refine\.irn\.steps"),
    ("segmentation.encoder_output_stride=4", r"segmentation\.encoder_output_stride"),
])
def test_bad_values_name_the_key(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        load_config("ci", [override], base_dir=tmp_path)


def test_bad_pair_in_config_names_the_field(tmp_path):
    with pytest.raises(UserError, match=r"surface\.pairs\[1\]\.bg"):
        load_config("ci", ["surface.space=pairs", "surface.pairs=[[0.1, 0.3], [0.5, 0.2]]"],
                    base_dir=tmp_path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(bad)
    bad.write_text("name: x\n")
    with pytest.raises(UserError, match="data: Field required"):
        load_config(bad)
    with pytest.raises(UserError, match="expected key=value"):
        apply_override({}, "classifier.epochs")
    with pytest.raises(UserError, match="name is not a section"):
        apply_override({"name": "x"}, "name.sub=1")


def test_paper_grid_matches_the_paper():
    pairs = grid_pairs("paper")
    assert len(pairs) == 32 and sum(bg == fg for bg, fg in pairs) == 8
    assert pairs[:4] == [(0.05, 0.05), (0.05, 0.15), (0.05, 0.3), (0.05, 0.45)]
    assert pairs[-1] == (0.4, 0.8)
    ext = grid_pairs("extended")
    assert max(fg for _, fg in ext) <= 0.95 and max(bg for bg, _ in ext) == 0.65


def test_errors_point_at_the_file_line_and_the_set_that_caused_them(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: [\n")
    with pytest.raises(UserError, match=rf'in "{bad}", line 3'):
        load_config(bad)
    with pytest.raises(UserError, match=r"at least 1.*\[from --set search\.top_k=-3\]"):
        load_config("ci", ["search.top_k=-3"])
    with pytest.raises(UserError) as e:  # a valid --set is not blamed
        load_config("ci", ["search.top_k=2", "refine.irn.steps=-1"])
    assert "[from --set refine.irn.steps=-1]" in str(e.value) and "top_k" not in str(e.value)
