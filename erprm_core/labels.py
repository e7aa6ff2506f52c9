"""Step-label math of ER-PRM and its baselines (pure numpy).

The entropy-regularised process reward of a prefix, estimated from k sampled completions with rewards
``y_1..y_k``, is the log-mean-exp

    er_label(y, eta) = (1/eta) * ln( (1/k) * sum_j exp(eta * y_j) )

which tends to the mean (Math-Shepherd "soft" label) as eta -> 0, to the max ("hard" label) as
eta -> +inf and to the min as eta -> -inf.

The module also owns the names of label rules and methods: :func:`rule_name` / :func:`rule_eta` /
:func:`eta_text` for rules (``soft``, ``er_<eta>``, ``hard``, ``min``, ``orm``), the one parser of method
names such as ``"er_1:min"`` or ``"weighted_er_1:min"`` (:func:`parse_method`, :func:`method_name`) and the two
orders (:func:`rule_sort_key` for rules, :func:`method_order` for methods).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

BASELINES = ("random", "majority", "oracle")
WEIGHTED_PREFIX = "weighted_"
_RAISE = object()  # rule_eta's default: raise ValueError for a rule without an eta


def _as_rewards(rewards: Any, axis: int) -> tuple[np.ndarray, bool]:
    arr = np.asarray(rewards, dtype=np.float64)
    scalar_out = arr.ndim <= 1
    if arr.ndim == 0:
        raise ValueError("rewards must have a completion axis; got a scalar")
    if arr.shape[axis] == 0:
        raise ValueError("rewards has no completions (the completion axis is empty)")
    return arr, scalar_out


def _out(x: np.ndarray, scalar_out: bool) -> float | np.ndarray:
    return float(x) if scalar_out else x


def er_label(rewards: Any, eta: float, axis: int = -1) -> float | np.ndarray:
    """Entropy-regularised label: ``(1/eta) * ln mean_j exp(eta * r_j)`` along ``axis``.

    ``eta = 0`` gives the mean, ``+inf`` the max and ``-inf`` the min (exact limits). Any real ``eta`` is
    allowed and the computation is a shifted log-sum-exp, so it does not overflow for large ``|eta|``.
    A 1-d input gives a float; a higher-dimensional one gives an array with ``axis`` reduced.

    Raises:
        ValueError: if ``eta`` is NaN or the completion axis is empty.
    """
    eta = float(eta)
    if math.isnan(eta):
        raise ValueError("eta is NaN; use a real number, 0 (soft label) or +-inf (hard label / min)")
    arr, scalar_out = _as_rewards(rewards, axis)
    if eta == 0.0:
        return _out(arr.mean(axis=axis), scalar_out)
    if eta == math.inf:
        return _out(arr.max(axis=axis), scalar_out)
    if eta == -math.inf:
        return _out(arr.min(axis=axis), scalar_out)
    # Centre on the mean so the correction term is O(eta * variance) (no cancellation for small eta).
    mean = arr.mean(axis=axis, keepdims=True)
    spread = float(np.max(arr.max(axis=axis) - arr.min(axis=axis)))
    if abs(eta) * spread < 1e-5:
        # exp() would round to 1 and lose the correction: use the expansion mean + eta * var / 2
        # (the next term is O(eta^2 * spread^3), below 1e-10 here).
        value = mean + eta * arr.var(axis=axis, keepdims=True) / 2
        return _out(np.squeeze(value, axis=axis), scalar_out)
    z = eta * (arr - mean)
    # Shift by the largest exponent so exp() never overflows; the shift is added back exactly.
    shift = z.max(axis=axis, keepdims=True)
    mean_exp = np.exp(z - shift).mean(axis=axis, keepdims=True)
    value = mean + (np.log(mean_exp) + shift) / eta
    # Guard the bounds against rounding: the label always lies between the min and the max.
    value = np.clip(value, arr.min(axis=axis, keepdims=True), arr.max(axis=axis, keepdims=True))
    return _out(np.squeeze(value, axis=axis), scalar_out)


def soft_label(rewards: Any, axis: int = -1) -> float | np.ndarray:
    """Soft label (Math-Shepherd soft estimation): the mean reward of the completions."""
    return er_label(rewards, 0.0, axis=axis)


def hard_label(rewards: Any, axis: int = -1) -> float | np.ndarray:
    """Hard label (Math-Shepherd hard estimation): 1 if any completion reaches the answer, i.e. the max."""
    return er_label(rewards, math.inf, axis=axis)


def outcome_label(is_correct: bool | float) -> float:
    """ORM label of a whole solution: its outcome reward (1.0 if the final answer is right, else 0.0)."""
    return float(is_correct)


def er_label_from_fraction(p: Any, eta: float) -> float | np.ndarray:
    """Closed form for binary rewards: ``(1/eta) * ln(1 - p + p * e^eta)``, p = fraction correct.

    Used for the label(p, eta) curves; agrees with :func:`er_label` on 0/1 rewards. Stable for any eta.
    """
    eta = float(eta)
    if math.isnan(eta):
        raise ValueError("eta is NaN")
    p_arr = np.asarray(p, dtype=np.float64)
    if np.any((p_arr < 0) | (p_arr > 1)):
        raise ValueError("p must lie in [0, 1]")
    if eta == 0.0:
        out = p_arr
    elif eta == math.inf:
        out = (p_arr > 0).astype(np.float64)
    elif eta == -math.inf:
        out = (p_arr >= 1).astype(np.float64)
    else:
        # log((1-p) e^0 + p e^eta) as a two-term log-sum-exp with weights; log(0) terms are -inf.
        with np.errstate(divide="ignore"):
            terms = np.stack([np.log1p(-p_arr), np.log(p_arr) + eta])
        out = np.logaddexp.reduce(terms, axis=0) / eta
    return float(out) if out.ndim == 0 else out


def rule_name(eta: float) -> str:
    """Canonical name of a label rule: ``soft`` (eta = 0), ``hard`` (+inf), ``min`` (-inf), else ``er_<eta>``."""
    eta = float(eta)
    if eta == 0.0:
        return "soft"
    if eta == math.inf:
        return "hard"
    if eta == -math.inf:
        return "min"
    return f"er_{eta:g}"


def rule_eta(rule: str, default: Any = _RAISE) -> Any:
    """Inverse of :func:`rule_name`. A rule with no eta (``orm``, a baseline) raises ValueError, or returns
    ``default`` when one is given (e.g. ``None`` or ``nan``)."""
    if rule == "soft":
        return 0.0
    if rule == "hard":
        return math.inf
    if rule == "min":
        return -math.inf
    if rule.startswith("er_"):
        try:
            return float(rule[3:])
        except ValueError:
            if default is _RAISE:
                raise
            return default
    if default is not _RAISE:
        return default
    raise ValueError(f"label rule {rule!r} has no eta (known: soft, hard, min, er_<eta>)")


def eta_text(rule: str) -> str:
    """The eta of an ``er_<eta>`` rule as written in its name (``er_0.5`` -> ``"0.5"``), for legends."""
    return rule.removeprefix("er_")


def parse_method(method: str) -> tuple[str, str | None, bool]:
    """Split a method name into ``(rule, aggregation or None, weighted)``.

    >>> parse_method("er_1:min")
    ('er_1', 'min', False)
    >>> parse_method("weighted_orm:last")
    ('orm', 'last', True)
    >>> parse_method("majority")
    ('majority', None, False)
    """
    base, _, agg = method.partition(":")
    weighted = base.startswith(WEIGHTED_PREFIX)
    return base.removeprefix(WEIGHTED_PREFIX), agg or None, weighted


def method_name(rule: str, aggregation: str | None = None, weighted: bool = False) -> str:
    """Inverse of :func:`parse_method`: ``("er_1", "min")`` -> ``"er_1:min"``; ``weighted`` adds the
    ``weighted_`` prefix of a weighted-vote method."""
    name = f"{rule}:{aggregation}" if aggregation else rule
    return WEIGHTED_PREFIX + name if weighted else name


def rule_sort_key(rule: str) -> tuple[int, float, str]:
    """Order of label rules in tables: soft, ER by increasing eta, hard, then ORM and anything else."""
    try:
        return (0, rule_eta(rule), rule)
    except ValueError:
        return (1 if rule == "orm" else 2, 0.0, rule)


def method_sort_key(method: str) -> tuple[int, float, str]:
    """Sort key of :func:`method_order`: reward models by eta, ORM, majority, random, weighted votes,
    oracle, then anything else."""
    rule, agg, weighted = parse_method(method)
    if weighted:
        return (5, 0.0, method)
    eta = rule_eta(rule, default=None)
    if eta is not None:
        return (1, eta, agg or "")
    rank = {"orm": 2, "majority": 3, "random": 4, "oracle": 6}.get(rule, 7)
    return (rank, 0.0, method)


def method_order(methods: Iterable[str]) -> list[str]:
    """Sort methods: soft, ER by increasing eta, hard, ORM, then baselines, then weighted votes."""
    return sorted(set(methods), key=method_sort_key)
