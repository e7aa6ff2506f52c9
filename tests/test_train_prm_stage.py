"""The 03_train_prm stage helpers (erprm_core.stages.train_prm): rules, the held-out split, held-out metrics,
the held-out evaluation of PRM checkpoints, and the recipe the stage passes to training."""

from __future__ import annotations

import inspect
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from erprm_core import stats, training
from erprm_core.io import ArtifactError
from erprm_core.prm import ProcessRewardModel
from erprm_core.stages import train_prm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_prm import make_model, make_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def prm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_prm")
    tok = make_tokenizer()
    make_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _labelled(pid, outcome, n=3, **extra):
    labels = {"soft": [0.5] * (n - 1) + [float(outcome)], "er_1": [0.6] * (n - 1) + [float(outcome)]}
    labels["hard"] = [1.0] * (n - 1) + [float(outcome)]
    labels["orm"] = [None] * (n - 1) + [float(outcome)]
    return {"problem_id": pid, "question": "Tom has 3 apples .", "steps": ["3 + 2 = 5"] * n, "outcome": outcome,
            "labels": labels, **extra}  # fmt: skip


def test_select_rules():
    recs = [_labelled("a", 1), _labelled("b", 0)]
    assert train_prm.select_rules(recs, "all") == ["soft", "er_1", "hard", "orm"]
    assert train_prm.select_rules(recs, "orm, er_1") == ["orm", "er_1"]
    assert train_prm.select_rules(recs, ["hard", "soft"]) == ["hard", "soft"]
    with pytest.raises(ValueError, match="er_2"):
        train_prm.select_rules(recs, "er_1,er_2")
    with pytest.raises(ValueError, match="twice"):
        train_prm.select_rules(recs, "soft,soft")
    with pytest.raises(ValueError, match="nothing to choose"):
        train_prm.select_rules([], "all")


def test_split_heldout_is_by_problem_and_deterministic():
    recs = [_labelled(f"p{i}", i % 2, sample_index=j) for i in range(40) for j in range(3)]
    train, held = train_prm.split_heldout(recs, 0.25)
    assert len(train) + len(held) == len(recs)
    assert not {r["problem_id"] for r in train} & {r["problem_id"] for r in held}
    assert 3 <= len({r["problem_id"] for r in held}) <= 20
    train2, held2 = train_prm.split_heldout(list(reversed(recs)), 0.25)
    assert {id(r) for r in held2} == {id(r) for r in held}
    assert train_prm.split_heldout(recs, 0.0)[1] == []
    small = [_labelled("x", 1), _labelled("y", 0)]
    t, h = train_prm.split_heldout(small, 0.01)  # always something on both sides
    assert len(t) == 1 and len(h) == 1
    with pytest.raises(ValueError):
        train_prm.split_heldout(recs, 1.0)
    assert 0 <= train_prm.heldout_fraction_of("p1") < 1
    assert train_prm.heldout_fraction_of("p1") == train_prm.heldout_fraction_of("p1")


def test_heldout_metrics_on_known_scores():
    rows = []
    # solution A (correct): scores 0.9, 0.8, 0.95; solution B (incorrect): 0.7, 0.2, 0.4, first dead step 1
    for sol, outcome, scores, hard in (
        ("A", 1, [0.9, 0.8, 0.95], [1, 1, 1]),
        ("B", 0, [0.7, 0.2, 0.4], [1, 0, 0]),
    ):
        for i, s in enumerate(scores):
            rows.append({"rule": "soft", "problem_id": sol, "sample_index": 0, "step": i, "n_steps": 3, "score": s,
                         "label": float(hard[i]), "hard_label": float(hard[i]), "outcome": outcome})  # fmt: skip
    out = train_prm.heldout_metrics(pd.DataFrame(rows), n_bins=2, position_bins=2)
    m = dict(zip(out["metrics"]["metric"], out["metrics"]["value"], strict=True))
    sq = [(0.9 - 1) ** 2, (0.8 - 1) ** 2, (0.95 - 1) ** 2, (0.7 - 1) ** 2, 0.2**2, 0.4**2]
    assert m["brier"] == pytest.approx(np.mean(sq))
    assert m["auroc_last"] == 1.0 and m["auroc_min"] == 1.0
    assert m["argmin_at_first_dead_step"] == 1.0
    pos = out["min_position"]
    assert pos[(pos["outcome"] == 0) & (pos["bin"] == 1)]["count"].item() == 1  # B's min at step 1 of 0..2
    assert pos[(pos["outcome"] == 1) & (pos["bin"] == 1)]["count"].item() == 1  # A's min at step 1 of 0..2
    assert out["calibration"]["count"].sum() == 6
    ce = -np.mean([np.log(0.9), np.log(0.8), np.log(0.95), np.log(0.7), np.log(0.8), np.log(0.6)])
    assert m["cross_entropy"] == pytest.approx(ce)
    assert m["excess_cross_entropy"] == pytest.approx(ce)  # 0/1 labels: the floor is 0


def test_loss_floor_is_the_labels_entropy():
    """Soft labels of 0.5 put the cross-entropy floor at ln 2; hard labels at 0; missing labels are skipped."""
    recs = [{"labels": {"soft": [0.5, 0.5, None], "hard": [1.0, 0.0, None]}}]
    assert train_prm.label_entropy(recs, "soft") == pytest.approx(np.log(2))
    assert train_prm.label_entropy(recs, "hard") == 0.0
    soft = [0.5] * 4
    ce, floor = stats.excess_cross_entropy([0.5] * 4, soft)
    assert ce == pytest.approx(floor) == pytest.approx(np.log(2))
    ce_off, _ = stats.excess_cross_entropy([0.9] * 4, soft)  # a miscalibrated fit lies above the floor
    assert ce_off - floor == pytest.approx(-0.5 * (np.log(0.9) + np.log(0.1)) - np.log(2))


def test_evaluate_prm_rules(prm_folder):
    recs = [_labelled("a", 1), _labelled("b", 0, n=2)]
    ev = train_prm.evaluate_prm_rules({"soft": prm_folder, "orm": prm_folder}, recs, device="cpu")
    assert set(ev["metrics"]["rule"]) == {"soft", "orm"} and (ev["metrics"]["scoring"] == "two_token").all()
    orm_brier = ev["metrics"].query("rule == 'orm' and metric == 'brier'")
    assert orm_brier["n"].item() == 2  # the ORM has one label per solution
    assert (ev["scoring"]["forward_passes"] == 1).all()
    assert len(ev["scores"]) == 2 * (3 + 2)  # one row per rule and held-out step
    with pytest.raises(ValueError, match="no held-out records"):
        train_prm.evaluate_prm_rules({"soft": prm_folder}, [], device="cpu")


def test_evaluate_prm_rules_metric_values(prm_folder):
    recs = [_labelled("a", 1), _labelled("b", 0, n=2)]
    ev = train_prm.evaluate_prm_rules({"soft": prm_folder, "orm": prm_folder}, recs, device="cpu")
    model = ProcessRewardModel.from_pretrained(prm_folder, device="cpu")
    sa, sb = (model.score(r["question"], r["steps"]) for r in recs)  # scored directly, one solution at a time
    assert ev["scores"].query("rule == 'soft'")["score"].tolist() == pytest.approx(sa + sb, abs=1e-6)
    m = ev["metrics"].set_index(["rule", "metric"])
    # soft labels: a = [0.5, 0.5, 1], b = [0.5, 0]; the ORM labels only the last steps: a = 1, b = 0
    soft_sq = [(x - y) ** 2 for x, y in zip(sa + sb, [0.5, 0.5, 1.0, 0.5, 0.0], strict=True)]
    assert m.loc[("soft", "brier"), "value"] == pytest.approx(np.mean(soft_sq), abs=1e-6)
    assert m.loc[("soft", "brier"), "n"] == 5
    assert m.loc[("orm", "brier"), "value"] == pytest.approx(((sa[-1] - 1) ** 2 + sb[-1] ** 2) / 2, abs=1e-6)
    assert m.loc[("soft", "mean_score"), "value"] == pytest.approx(np.mean(sa + sb), abs=1e-6)

    # two solutions, a correct and b wrong: AUROC is 1 when a scores higher, 0 when lower, 1/2 on a tie
    def two(x, y):
        return 1.0 if x > y else 0.0 if x < y else 0.5

    assert m.loc[("soft", "auroc_last"), "value"] == two(sa[-1], sb[-1])
    assert m.loc[("soft", "auroc_min"), "value"] == two(min(sa), min(sb))
    assert m.loc[("orm", "auroc_min"), "value"] == m.loc[("soft", "auroc_min"), "value"]  # same checkpoint
    assert m.loc[("soft", "ece"), "value"] == pytest.approx(
        stats.expected_calibration_error(sa + sb, [0.5, 0.5, 1.0, 0.5, 0.0]), abs=1e-6
    )


def test_recipe_is_what_train_prm_takes_with_its_defaults():
    config = train_prm.TrainPRMConfig()
    recipe = config.recipe()
    assert set(recipe) <= {f.name for f in fields(config)}
    params = inspect.signature(training.train_prm).parameters
    assert set(recipe) <= set(params)
    # the two knobs that only the command line had: their defaults are train_prm's, so nothing changes
    assert recipe["dtype"] == params["dtype"].default
    assert recipe["gradient_checkpointing"] == params["gradient_checkpointing"].default


def test_train_names_the_missing_stage(tmp_roots):
    with pytest.raises(ArtifactError, match="00_policy"):
        train_prm.train(train_prm.TrainPRMConfig(profile="nothing_here"))
    with pytest.raises(ArtifactError, match="02_labels"):
        train_prm.train(train_prm.TrainPRMConfig(profile="nothing_here", base_model="some/hub-model"))
