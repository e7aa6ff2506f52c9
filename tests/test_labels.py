"""Property and value tests of the ER label math (paper.md section 1)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from erprm_core.labels import (
    BASELINES,
    er_label,
    er_label_from_fraction,
    eta_text,
    hard_label,
    method_name,
    method_order,
    outcome_label,
    parse_method,
    rule_eta,
    rule_name,
    rule_sort_key,
    soft_label,
)
from erprm_core.running.config import parse_eta_grid, parse_names
from erprm_core.stages.labels import stepwise_labels

rewards01 = st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=32)
real_rewards = st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=32)
etas = st.floats(min_value=1e-3, max_value=1e3)


def test_issue_check_values():
    assert round(er_label([0, 1, 1, 0], 1.0), 4) == 0.6201
    big = er_label([0] * 15 + [1], 1e4)
    assert math.isfinite(big)
    assert abs(big - (1 + math.log(1 / 16) / 1e4)) < 1e-3


def test_paper_k16_eta1_table(paper_k16_eta1_labels):
    got = [round(er_label([1.0] * j + [0.0] * (16 - j), 1.0), 3) for j in range(1, 16)]
    assert got == paper_k16_eta1_labels


@given(rewards01, etas)
def test_endpoints_and_bounds(ys, eta):
    p = float(np.mean(ys))
    lab = er_label(ys, eta)
    assert er_label([0.0] * len(ys), eta) == pytest.approx(0.0, abs=1e-12)
    assert er_label([1.0] * len(ys), eta) == pytest.approx(1.0, abs=1e-12)
    assert p - 1e-12 <= lab <= (1.0 if p > 0 else 0.0) + 1e-12


@given(real_rewards)
def test_exact_limits(ys):
    assert er_label(ys, 0) == pytest.approx(np.mean(ys))
    assert er_label(ys, float("inf")) == max(ys)
    assert er_label(ys, float("-inf")) == min(ys)
    assert soft_label(ys) == pytest.approx(np.mean(ys))
    assert hard_label(ys) == max(ys)


@given(real_rewards, st.floats(-50, 50), st.floats(-50, 50))
def test_monotone_in_eta(ys, a, b):
    lo, hi = sorted([a, b])
    assert er_label(ys, lo) <= er_label(ys, hi) + 1e-9


@given(st.integers(1, 31), st.integers(1, 32), etas)
def test_monotone_in_p(j, k, eta):
    k = max(k, j + 1)
    lower = er_label([1.0] * (j - 1) + [0.0] * (k - j + 1), eta)
    upper = er_label([1.0] * j + [0.0] * (k - j), eta)
    assert lower <= upper + 1e-12


@given(rewards01, etas)
def test_order_invariance_and_closed_form(ys, eta):
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(ys)
    assert er_label(shuffled, eta) == pytest.approx(er_label(ys, eta), abs=1e-12)
    assert er_label_from_fraction(np.mean(ys), eta) == pytest.approx(er_label(ys, eta), abs=1e-9)


@settings(max_examples=50)
@given(st.floats(0.01, 0.99))
def test_small_and_large_eta_expansions(p):
    eta = 1e-4
    assert er_label_from_fraction(p, eta) == pytest.approx(p + eta * p * (1 - p) / 2, abs=1e-7)
    eta = 200.0
    assert er_label_from_fraction(p, eta) == pytest.approx(1 + math.log(p) / eta, abs=1e-6)


@pytest.mark.parametrize("eta", [1e4, -1e4, 1e6, -1e6])
def test_no_overflow_at_large_eta(eta):
    ys = [0.0] * 15 + [1.0]
    val = er_label(ys, eta)
    assert math.isfinite(val)
    # closed form (1/eta) ln((15 + e^eta) / 16), in log space; at eta = 1e4 it is 1 - 2.77e-4, not hard's 1
    expected = (np.logaddexp(math.log(15.0), eta) - math.log(16.0)) / eta
    assert val == pytest.approx(expected, rel=1e-9, abs=1e-15)
    if eta > 0:
        assert 1.0 - val == pytest.approx(math.log(16.0) / eta, rel=1e-6)  # separates ER from hard (1.0)


def test_negative_eta_is_soft_min():
    ys = [0.0, 1.0, 1.0, 1.0]
    assert er_label(ys, -1.0) < np.mean(ys)
    assert er_label(ys, -1e5) == pytest.approx(0.0, abs=1e-4)


def test_arrays_and_axis():
    r = np.array([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=float)
    out = er_label(r, 1.0)
    assert isinstance(out, np.ndarray) and out.shape == (3,)
    assert out[0] == pytest.approx(0.6201, abs=1e-4) and out[1] == 1.0 and out[2] == 0.0
    np.testing.assert_allclose(er_label(r.T, 1.0, axis=0), out)
    assert isinstance(er_label([0, 1], 2.0), float)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="NaN"):
        er_label([0, 1], float("nan"))
    with pytest.raises(ValueError, match="no completions"):
        er_label([], 1.0)
    with pytest.raises(ValueError, match="no completions"):
        er_label(np.zeros((3, 0)), 1.0)


def test_rule_names_round_trip():
    for eta in [0.0, 0.1, 0.5, 1.0, 2.0, 10.0, math.inf, -math.inf]:
        assert rule_eta(rule_name(eta)) == eta
    assert rule_name(0) == "soft" and rule_name(math.inf) == "hard" and rule_name(1) == "er_1"
    with pytest.raises(ValueError):
        rule_eta("orm")


def test_stepwise_labels_last_step_is_outcome():
    out = stepwise_labels([[0, 1, 1, 0], [1, 1, 1, 1]], 0, [0, 1, math.inf])
    assert out["soft"] == [0.5, 1.0, 0.0]
    assert out["hard"] == [1.0, 1.0, 0.0]
    assert out["er_1"][0] == pytest.approx(0.6201, abs=1e-4) and out["er_1"][2] == 0.0
    assert out["orm"] == [None, None, 0.0]
    assert outcome_label(True) == 1.0


def test_parse_eta_grid():
    assert parse_eta_grid("0, 0.1,1,inf") == [0.0, 0.1, 1.0, math.inf]
    for bad in ["0,x", "nan", "", "1,1"]:
        with pytest.raises(ValueError):
            parse_eta_grid(bad)


def test_rule_eta_default_replaces_the_error():
    assert rule_eta("orm", default=None) is None
    assert math.isnan(rule_eta("majority", default=float("nan")))
    assert math.isnan(rule_eta("er_x", default=float("nan")))
    assert rule_eta("er_0.5", default=None) == 0.5 and rule_eta("hard", default=None) == math.inf
    with pytest.raises(ValueError):
        rule_eta("er_x")
    assert eta_text("er_0.5") == "0.5" and eta_text("er_10") == "10"


def test_parse_method_and_method_name_are_inverse():
    cases = {
        "er_1:min": ("er_1", "min", False),
        "hard": ("hard", None, False),
        "weighted_er_0.5:last": ("er_0.5", "last", True),
        "weighted_orm": ("orm", None, True),
        "majority": ("majority", None, False),
    }
    for method, parsed in cases.items():
        assert parse_method(method) == parsed
        assert method_name(*parsed) == method
    assert set(BASELINES) == {"random", "majority", "oracle"}


def test_method_and_rule_orders():
    methods = [
        "oracle",
        "weighted_er_1:min",
        "random",
        "majority",
        "orm:last",
        "hard:min",
        "er_1:min",
        "soft:min",
    ]
    assert method_order([*methods, "er_1:min"]) == [
        "soft:min",
        "er_1:min",
        "hard:min",
        "orm:last",
        "majority",
        "random",
        "weighted_er_1:min",
        "oracle",
    ]
    rules = ["orm", "hard", "zzz", "er_10", "soft", "er_0.5"]
    assert sorted(rules, key=rule_sort_key) == ["soft", "er_0.5", "er_10", "hard", "orm", "zzz"]


def test_parse_names():
    assert parse_names(" er_1, hard,,soft ") == ["er_1", "hard", "soft"]
    assert parse_names(["er_1", 2]) == ["er_1", "2"]
    assert parse_names(None) == [] and parse_names("") == []
    assert parse_names("a,a") == ["a", "a"]
    with pytest.raises(ValueError, match="reward_models lists a name twice"):
        parse_names("a,b,a", unique=True, what="reward_models")
