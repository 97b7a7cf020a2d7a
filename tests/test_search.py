"""Promotion rules (pure) and a real stage-1 search on a local Ray cluster (slow, run in CI)."""

import json

import pandas as pd
import pytest

from tune.config import load_config
from tune.search import promote, run_search
from tune.space import SamplerBounds, define_by_run
from wsss.errors import UserError


def table(rows):
    return pd.DataFrame(rows, columns=["bg", "fg", "objective", "degenerate",
                                       "training_iteration"])


def test_promote_global_and_per_bg_with_deterministic_ties():
    t = table([(0.1, 0.2, 0.9, 0, 3), (0.1, 0.3, 0.8, 0, 3), (0.2, 0.3, 0.8, 0, 3),
               (0.2, 0.2, 1.0, 1, 3),  # degenerate: never promoted
               (0.3, 0.5, 0.95, 0, 1),  # stopped early by ASHA: never promoted
               (0.05, 0.3, 0.8, 0, 3)])
    g = promote(t, k=3, policy="global", epochs=3)
    assert list(zip(g.bg, g.fg)) == [(0.1, 0.2), (0.05, 0.3), (0.1, 0.3)]  # ties: bg, fg asc
    p = promote(t, k=3, policy="per_bg", epochs=3)
    assert list(zip(p.bg, p.fg)) == [(0.1, 0.2), (0.05, 0.3), (0.2, 0.3)]  # one FG per BG


def test_promote_fewer_than_k_warns_and_none_is_an_error(caplog):
    t = table([(0.1, 0.2, 0.9, 0, 3), (0.2, 0.2, 1.0, 1, 3)])
    assert len(promote(t, k=3, policy="global", epochs=3)) == 1
    assert "only 1 trials qualify" in caplog.text
    with pytest.raises(UserError, match="1 stopped early, 1 degenerate"):
        promote(table([(0.1, 0.2, 0.9, 0, 1), (0.2, 0.2, 1.0, 1, 3)]), k=2, policy="global",
                epochs=3)


def test_sampled_space_respects_the_gap():
    import optuna

    bounds = SamplerBounds(bg_min=0.0, bg_max=0.7, min_gap=0.05, fg_max=0.95)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = define_by_run(bounds)
    for _ in range(200):
        trial = study.ask()
        space(trial)
        bg, fg = trial.params["bg"], trial.params["fg"]
        assert 0 <= bg <= 0.7 and bg + 0.05 - 1e-12 <= fg <= 0.95
        study.tell(trial, 0.0)


@pytest.mark.slow
def test_stage1_search_on_local_ray(ci_config, ci_prepared):
    pairs = "[[0.1, 0.35], [0.2, 0.45], [0.3, 0.3], [0.25, 0.5]]"
    runs = ci_config.runtime.runs_root  # the session's stores: stage 0 is all cached
    cfg = load_config("ci", ["search.space=pairs", f"search.pairs={pairs}", "affinity.epochs=2",
                             "affinity.subset=40", "search.top_k=2", "search.grace_period=1",
                             f"data.root={ci_config.data.root}", f"runtime.runs_root={runs}"])
    out = run_search(cfg)
    t = out["table"]
    assert sorted(zip(t.bg, t.fg)) == [(0.1, 0.35), (0.2, 0.45), (0.25, 0.5), (0.3, 0.3)]
    assert {"tecm", "tecm_pooled", "pqs_pseudo", "objective", "training_iteration"} <= set(t)
    assert (t.loc[t.degenerate == 1, "objective"] == 0).all()  # degenerate never drives
    assert t.training_iteration.between(1, 2).all()
    saved = json.loads((runs / "ci" / "candidates.json").read_text())
    assert saved["objective"] == "tecm" and 1 <= len(saved["candidates"]) <= 2
    best = t[(t.training_iteration == 2) & (t.degenerate == 0)].objective.max()
    assert saved["candidates"][0]["objective"] == pytest.approx(best)
    assert all(c["bg"] != c["fg"] for c in saved["candidates"])
    # MLflow (a real SQLite store): one parent, one child per trial, nothing left RUNNING
    from mlflow import MlflowClient

    client = MlflowClient(out["tracking_uri"])
    assert out["tracking_uri"] == f"sqlite:///{(runs / 'mlflow.db').resolve()}"
    parent = client.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["affinity.epochs"] == "2" and parent.data.tags["git_commit"]
    assert parent.data.tags["version.torch"] and parent.data.tags["config_hash"]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    assert sorted((c.data.params["bg"], c.data.params["fg"]) for c in children) == [
        ("0.1", "0.35"), ("0.2", "0.45"), ("0.25", "0.5"), ("0.3", "0.3")]
    for child in children:
        assert child.data.tags["stage"] == "1"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "tecm")]
        row = t[t.mlflow_run_id == child.info.run_id].iloc[0]
        assert steps == list(range(1, int(row.training_iteration) + 1))
        assert child.data.metrics["tecm"] == pytest.approx(row.tecm)
        assert child.data.tags["stopped_early"] == ("false" if row.training_iteration == 2
                                                    else "true")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"stage1.csv", "candidates.json"} <= artifacts
