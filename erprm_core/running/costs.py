"""Per-stage compute cost of a profile, computed from its configs: tokens, forward passes, GPU-hours.

REPRODUCING.md's cost tables are ``cost_markdown("paper-gsm8k")`` / ``cost_markdown("paper-math")``,
written into the file by :func:`sync_reproducing_md`. The counts follow the stages' loops exactly (problems
x solutions x step prefixes x k completions, candidates x PRMs, RAFT reward models x iterations, ...);
what a config cannot tell - how long the policy's solutions are, how many steps they have, how fast the
hardware is - is an explicit :class:`Assumptions` value, printed with the table. Change them (or the
configs, via ``overrides``) and the table follows.

Counting conventions (one row per stage and piece of work):

- ``sequences``: generated sequences, or sequences run through a model (scored / trained);
- ``generated_tokens``: new tokens decoded; ``processed_tokens``: tokens read in one forward pass
  (prompts, scored solutions, training sequences x epochs);
- ``forward_passes``: model calls at the sequence level - one per generated token (decoding), one per
  scored solution, one forward+backward per training sequence and epoch;
- ``train_tokens``: tokens that get gradients (sequence tokens x epochs);
- ``gpu_hours``: generated tokens / generation throughput + scored tokens / scoring throughput + training
  tokens / training throughput, each per GPU, so the sum does not depend on the number of GPUs.

Used by REPRODUCING.md (the table) and tests/test_costs.py. Pure arithmetic on the configs: no model, no
hub access.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from erprm_core.running import artifacts, config

__all__ = [
    "Assumptions",
    "COLUMNS",
    "assumptions_markdown",
    "cost_markdown",
    "cost_table",
    "cost_table_from_parameters",
    "stage_parameters",
    "sync_reproducing_md",
]

COLUMNS = [
    "stage",
    "work",
    "model",
    "sequences",
    "generated_tokens",
    "processed_tokens",
    "forward_passes",
    "train_tokens",
    "gpu_hours",
]


@dataclass(frozen=True)
class Assumptions:
    """What the configs do not say; every number of the estimate that is not counted is one of these.

    Lengths are in tokens of the 7B models' tokenizers (Mistral / Llama-3 are within ~10% of each other on
    this text). Throughputs are per GPU (one H100 80GB, bf16) and are assumptions, not measurements:
    measure your own (``erprm bench``, vLLM's ``benchmark_throughput.py``) and pass them in.
    """

    # Per task: mean policy solution length, mean steps (lines) per solution, mean question length.
    # GSM8K: MetaMath-Mistral-7B writes ~4-5 short lines; MATH: ~7 longer ones.
    solution_tokens: Mapping[str, float] = field(default_factory=lambda: {"gsm8k": 160.0, "math": 330.0})
    steps_per_solution: Mapping[str, float] = field(default_factory=lambda: {"gsm8k": 4.5, "math": 7.0})
    question_tokens: Mapping[str, float] = field(default_factory=lambda: {"gsm8k": 70.0, "math": 90.0})
    # The policy prompt around the question (the metamath template: ~40 tokens); PRM inputs have none.
    template_tokens: float = 40.0
    # A completion of the prefix of l steps (of L) writes the remaining steps: on average half a solution.
    completion_fraction: float = 0.5
    # Extra tokens per step in the PRM format (" ки" and the separator).
    tag_tokens_per_step: float = 2.0
    # Generation with vLLM, 7B, bf16, offline batched decoding with prefix caching (output tokens/s/GPU).
    vllm_tokens_per_s: float = 5000.0
    # Generation with the HF backend (00_policy's evaluation, backend: hf), 7B, batch 64 (tokens/s/GPU).
    hf_tokens_per_s: float = 800.0
    # PRM scoring: one forward pass over question + solution, 8B, bf16 (tokens/s/GPU; ~2N FLOPs/token).
    score_tokens_per_s: float = 12000.0
    # Full fine-tuning, 7-8B, bf16, DeepSpeed ZeRO-2, gradient checkpointing (tokens/s/GPU; ~8N FLOPs/token
    # at ~40% of an H100's dense bf16 peak).
    train_tokens_per_s: float = 3000.0
    # A ProcessBench record (problem + steps + step tags) in the 8B PRMs' tokenizer: the first release's mean
    # over its 3,400 records, estimated as characters / 3.6 (GSM8K ~335, MATH ~455, the olympiad sets ~680).
    processbench_tokens: float = 620.0

    def for_task(self, task: str) -> tuple[float, float, float]:
        """``(solution_tokens, steps_per_solution, question_tokens)`` of ``task`` (math500 counts as math)."""
        key = "math" if task in ("math", "math500") else task
        if key not in self.solution_tokens:
            raise ValueError(
                f"no length assumptions for task {task!r}; known: {sorted(self.solution_tokens)} "
                "(pass Assumptions(solution_tokens=..., steps_per_solution=..., question_tokens=...))"
            )
        return self.solution_tokens[key], self.steps_per_solution[key], self.question_tokens[key]

    def as_dict(self) -> dict[str, Any]:
        """The assumptions as a flat dict (mappings kept), for printing next to the table."""
        return {k: dict(v) if isinstance(v, Mapping) else v for k, v in asdict(self).items()}


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def stage_parameters(profile: str, overrides: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every stage's full parameters for ``profile``: notebook defaults, then the config, then ``overrides``.

    Validated by :func:`erprm_core.running.config.plan` (unknown keys and wrong types are errors).
    """
    out = {}
    for stage in config.plan(profile, overrides=overrides):
        declared = config.notebook_parameters(stage.notebook)
        params = {name: _literal(info["default"]) for name, info in declared.items()}
        params.update(stage.parameters)
        out[stage.name] = params
    return out


def _row(stage: str, work: str, model: str, **values: float) -> dict[str, Any]:
    row = {"stage": stage, "work": work, "model": model}
    for col in COLUMNS[3:]:
        row[col] = float(values.get(col, 0.0))
    return row


def _generation(stage, work, model, sequences, new_tokens, prompt_tokens, tokens_per_s) -> dict[str, Any]:
    generated = sequences * new_tokens
    return _row(
        stage,
        work,
        model,
        sequences=sequences,
        generated_tokens=generated,
        processed_tokens=sequences * prompt_tokens,
        forward_passes=generated,
        gpu_hours=generated / tokens_per_s / 3600,
    )


def _scoring(stage, work, model, sequences, tokens, a: Assumptions) -> dict[str, Any]:
    return _row(
        stage,
        work,
        model,
        sequences=sequences,
        processed_tokens=sequences * tokens,
        forward_passes=sequences,
        gpu_hours=sequences * tokens / a.score_tokens_per_s / 3600,
    )


def _training(stage, work, model, sequences, tokens, epochs, a: Assumptions) -> dict[str, Any]:
    train = sequences * tokens * epochs
    return _row(
        stage,
        work,
        model,
        sequences=sequences,
        processed_tokens=train,
        forward_passes=sequences * epochs,
        train_tokens=train,
        gpu_hours=train / a.train_tokens_per_s / 3600,
    )


def _prm_rules(label_params: Mapping[str, Any], train: Mapping[str, Any]) -> int:
    if str(train.get("rules", "all")).strip() == "all":
        return len(config.parse_eta_grid(label_params.get("etas", "0,inf"))) + 1  # + the ORM
    return len(config.parse_names(str(train["rules"])))


@dataclass(frozen=True)
class _Shapes:
    """The sizes every stage's rows share: token lengths of the task, throughputs and the policy's name."""

    a: Assumptions
    p0: Mapping[str, Any]
    sol: float
    steps: float
    prompt: float  # what the policy reads
    prm_seq: float  # what a PRM reads (no template)
    rate_of: dict[str, float]
    policy: str

    @staticmethod
    def cap(n_tokens: float, limit: Any) -> float:
        """``n_tokens`` capped at a token limit (a limit of 0 or None means no cap)."""
        return min(n_tokens, float(limit)) if limit else n_tokens


def _shapes(p0: Mapping[str, Any], a: Assumptions) -> _Shapes:
    task = p0.get("task", "arith")
    sol, steps, question = a.for_task(task)
    return _Shapes(
        a=a,
        p0=p0,
        sol=sol,
        steps=steps,
        prompt=question + a.template_tokens,
        prm_seq=question + sol + a.tag_tokens_per_step * steps,
        rate_of={"hf": a.hf_tokens_per_s, "vllm": a.vllm_tokens_per_s},
        policy=p0.get("policy_name") or "tiny policy",
    )


def _policy_rows(params: Mapping[str, Mapping[str, Any]], s: _Shapes) -> list[dict[str, Any]]:
    a, p0, policy, prompt = s.a, s.p0, s.policy, s.prompt
    rows = []
    new = s.cap(s.sol, p0.get("max_new_tokens"))
    n_test = p0.get("n_test", 0)
    rows.append(
        _generation("00_policy", "greedy test solutions", policy, n_test, new, prompt, a.hf_tokens_per_s)
    )
    n_pass = min(p0.get("n_passk_problems", 0), n_test) if n_test >= 0 else p0.get("n_passk_problems", 0)
    rows.append(
        _generation(
            "00_policy",
            "pass@k samples",
            policy,
            n_pass * p0.get("n_samples", 0),
            new,
            prompt,
            a.hf_tokens_per_s,
        )
    )
    return rows


def _rollout_rows(params: Mapping[str, Mapping[str, Any]], s: _Shapes) -> list[dict[str, Any]]:
    a, p0, policy, prompt, sol, steps = s.a, s.p0, s.policy, s.prompt, s.sol, s.steps
    rows = []
    p1 = params["01_rollouts"]
    rate = s.rate_of[p1.get("backend", "hf")]
    n_problems = p1.get("n_problems", 0) or p0.get("n_train_prm", 0)
    solutions = n_problems * p1.get("n_solutions", 1)
    new = s.cap(sol, p1.get("max_new_tokens"))
    rows.append(_generation("01_rollouts", "solutions", policy, solutions, new, prompt, rate))
    prefixes = solutions * max(steps - 1.0, 0.0)
    completer = p1.get("completer_name") or policy
    comp = s.cap(sol * a.completion_fraction, p1.get("max_new_tokens"))
    row = _generation(
        "01_rollouts",
        "completions (k per step prefix)",
        completer,
        prefixes * p1.get("k", 1),
        comp,
        0.0,
        rate,
    )
    row["processed_tokens"] = prefixes * (prompt + sol * 0.5)  # each prefix read once (prefix caching)
    rows.append(row)
    return rows


def _label_rows(params: Mapping[str, Mapping[str, Any]], s: _Shapes) -> list[dict[str, Any]]:
    return [_row("02_labels", "label arithmetic (CPU, seconds)", "-")]


def _prm_rows(params: Mapping[str, Mapping[str, Any]], s: _Shapes) -> list[dict[str, Any]]:
    a, p0, policy = s.a, s.p0, s.policy
    rows = []
    p3 = params["03_train_prm"]
    n_rules = _prm_rules(params.get("02_labels", {}), p3)
    solutions = (params.get("01_rollouts", {}).get("n_problems", 0) or p0.get("n_train_prm", 0)) * params.get(
        "01_rollouts", {}
    ).get("n_solutions", 1)
    held = p3.get("heldout_fraction", 0.0)
    seq = s.cap(s.prm_seq, p3.get("max_length"))
    base = p3.get("base_model") or policy
    rows.append(
        _training(
            "03_train_prm",
            f"train {n_rules} PRMs",
            base,
            n_rules * solutions * (1 - held),
            seq,
            p3.get("epochs", 1.0),
            a,
        )
    )
    rows.append(_scoring("03_train_prm", "score held-out steps", base, n_rules * solutions * held, seq, a))
    return rows


def _bon_rows(params: Mapping[str, Mapping[str, Any]], s: _Shapes) -> list[dict[str, Any]]:
    a, p0, policy = s.a, s.p0, s.policy
    rows = []
    p4 = params["04_best_of_n"]
    n_test = p4.get("n_test", 0) or p0.get("n_test", 0)
    candidates = n_test * p4.get("n_max", 1)
    new = s.cap(s.sol, p4.get("max_new_tokens"))
    rows.append(
        _generation(
            "04_best_of_n",
            "candidate pool",
            policy,
            candidates,
            new,
            s.prompt,
            s.rate_of[p4.get("backend", "hf")],
        )
    )
    n_rules = (
        len(config.parse_names(str(p4["rules"])))
        if p4.get("rules")
        else _prm_rules(params.get("02_labels", {}), params.get("03_train_prm", {}))
    )
    base = params.get("03_train_prm", {}).get("base_model") or policy
    rows.append(
        _scoring(
            "04_best_of_n", f"score the pool with {n_rules} PRMs", base, n_rules * candidates, s.prm_seq, a
        )
    )
    return rows


def _raft_rows(params: Mapping[str, Mapping[str, Any]], s: _Shapes) -> list[dict[str, Any]]:
    a, p0, policy, prompt, sol = s.a, s.p0, s.policy, s.prompt, s.sol
    rows = []
    p5 = params["05_rlhf_raft"]
    rewards = config.parse_names(str(p5.get("reward_models", "")))
    scored = [r for r in rewards if r not in ("random", "oracle")]
    iters = p5.get("iterations", 1)
    prompts = p5.get("n_prompts", 0) or p0.get("n_raft", 0)
    n_test = p5.get("n_test", 0) or p0.get("n_test", 0)
    m = p5.get("m", 1)
    new = s.cap(sol, p5.get("max_new_tokens"))
    rate = s.rate_of[p5.get("backend", "hf")]
    # iteration 1 samples the same starting policy for every reward model: sampled once, shared
    sample_runs = (1 + len(rewards) * (iters - 1)) if rewards else 0
    rows.append(
        _generation(
            "05_rlhf_raft",
            "candidates (m per prompt)",
            policy,
            sample_runs * prompts * m,
            new,
            prompt,
            rate,
        )
    )
    base = params.get("03_train_prm", {}).get("base_model") or policy
    rows.append(
        _scoring("05_rlhf_raft", "score candidates", base, len(scored) * iters * prompts * m, s.prm_seq, a)
    )
    rows.append(
        _training(
            "05_rlhf_raft",
            "fine-tune on the picks",
            policy,
            len(rewards) * iters * prompts,
            prompt + sol,
            p5.get("epochs", 1.0),
            a,
        )
    )
    rows.append(
        _generation(
            "05_rlhf_raft",
            "greedy evaluation",
            policy,
            (1 + len(rewards) * iters) * n_test,
            new,
            prompt,
            rate,
        )
    )
    return rows


def _figure_rows(params: Mapping[str, Mapping[str, Any]], s: _Shapes) -> list[dict[str, Any]]:
    return [_row("06_figures", "figures from tables (CPU, seconds)", "-")]


# Records per ProcessBench split (first release; the hub copy has the same counts).
PROCESSBENCH_RECORDS = {"gsm8k": 400, "math": 1000, "olympiadbench": 1000, "omnimath": 1000}


def _processbench_rows(params: Mapping[str, Mapping[str, Any]], s: _Shapes) -> list[dict[str, Any]]:
    p7 = params["07_processbench"]
    if p7.get("benchmark", "synthetic") != "processbench":
        return [_row("07_processbench", "first-error F1 from 04's scores (CPU, seconds)", "-")]
    rules = str(p7.get("rules", "all")).strip()
    n_rules = (
        _prm_rules(params.get("02_labels", {}), params.get("03_train_prm", {}))
        if rules == "all"
        else len(config.parse_names(rules))
    )
    n_prms = n_rules + len(config.parse_names(str(p7.get("released_prms") or "")))
    limit = int(p7.get("limit") or 0)
    splits = config.parse_names(str(p7.get("splits", "")))
    records = sum(min(PROCESSBENCH_RECORDS.get(x, 0), limit) if limit else PROCESSBENCH_RECORDS.get(x, 0)
                  for x in splits)  # fmt: skip
    base = params.get("03_train_prm", {}).get("base_model") or s.policy
    work = f"score ProcessBench with {n_prms} PRMs"
    return [_scoring("07_processbench", work, base, n_prms * records, s.a.processbench_tokens, s.a)]


_STAGE_ROWS = {
    "00_policy": _policy_rows,
    "01_rollouts": _rollout_rows,
    "02_labels": _label_rows,
    "03_train_prm": _prm_rows,
    "04_best_of_n": _bon_rows,
    "05_rlhf_raft": _raft_rows,
    "06_figures": _figure_rows,
    "07_processbench": _processbench_rows,
}


def cost_table_from_parameters(
    params: Mapping[str, Mapping[str, Any]], assumptions: Assumptions | None = None
) -> pd.DataFrame:
    """The cost rows (see the module docstring) for full stage parameters ``{stage: {name: value}}``.

    Sizes of 0 ("all") resolve to the split sizes of 00_policy. A missing stage contributes nothing.
    """
    a = assumptions or Assumptions()
    shapes = _shapes(params.get("00_policy", {}), a)
    rows: list[dict[str, Any]] = []
    for stage, stage_rows in _STAGE_ROWS.items():
        if stage in params:
            rows.extend(stage_rows(params, shapes))
    df = pd.DataFrame(rows, columns=COLUMNS)
    if len(df):
        total = {c: df[c].sum() for c in COLUMNS[3:]}
        df = pd.concat(
            [df, pd.DataFrame([{"stage": "total", "work": "", "model": "", **total}])], ignore_index=True
        )
    return df


def cost_table(
    profile: str, assumptions: Assumptions | None = None, overrides: list[str] | None = None
) -> pd.DataFrame:
    """Cost rows of ``profile``'s stages (configs + ``-p``-style ``overrides``) under ``assumptions``."""
    return cost_table_from_parameters(stage_parameters(profile, overrides), assumptions)


def _human(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1e9:
        return f"{x / 1e9:.2f}B"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.1f}M"
    if abs(x) >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def cost_markdown(
    profile: str, assumptions: Assumptions | None = None, overrides: list[str] | None = None
) -> str:
    """:func:`cost_table` as a Markdown table (counts in k/M/B, GPU-hours to 0.1), as in REPRODUCING.md."""
    df = cost_table(profile, assumptions, overrides)
    head = (
        "| stage | work | model | sequences | generated tokens | processed tokens | forward passes "
        "| train tokens | H100-hours |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in df.itertuples(index=False):
        cells = [r.stage, r.work, f"`{r.model}`" if r.model not in ("", "-") else r.model]
        cells += [_human(getattr(r, c)) for c in COLUMNS[3:-1]]
        cells.append(f"{r.gpu_hours:.1f}" if r.gpu_hours >= 0.05 or r.gpu_hours == 0 else "<0.1")
        if r.stage == "total":
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


ASSUMPTION_HELP = {
    "solution_tokens": "mean length of a policy solution, per task",
    "steps_per_solution": "mean steps (lines) per solution, per task; a solution has steps - 1 prefixes",
    "question_tokens": "mean length of a question, per task",
    "template_tokens": "length of the policy's prompt template around the question (metamath)",
    "completion_fraction": "a completion writes this share of a solution (the remaining steps)",
    "tag_tokens_per_step": "extra tokens per step in the PRM input (the step tag)",
    "vllm_tokens_per_s": "vLLM generation, 7B, bf16, offline batch with prefix caching, output tokens/s/GPU",
    "hf_tokens_per_s": "HF backend generation, 7B, bf16, batch 64, output tokens/s/GPU",
    "score_tokens_per_s": "PRM scoring forward passes, 8B, bf16, tokens/s/GPU",
    "train_tokens_per_s": "full fine-tuning 7-8B, bf16, ZeRO-2, gradient checkpointing, tokens/s/GPU",
    "processbench_tokens": "mean PRM input of a ProcessBench record (first release, characters / 3.6)",
}


def assumptions_markdown(assumptions: Assumptions | None = None) -> str:
    """The assumptions as a Markdown bullet list (printed under the cost tables in REPRODUCING.md)."""
    a = (assumptions or Assumptions()).as_dict()
    return "\n".join(f"- `{k}` = {v}: {ASSUMPTION_HELP.get(k, '')}" for k, v in a.items())


def sync_reproducing_md(path: Any = None) -> bool:
    """Rewrite the generated blocks of REPRODUCING.md (``<!-- costs:NAME:start -->`` ... ``:end -->``).

    NAME is a profile (its :func:`cost_markdown`) or ``assumptions`` (:func:`assumptions_markdown`).
    Returns True when the file changed. tests/test_costs.py checks that the file is in sync.
    """
    path = Path(path or artifacts.repo_root() / "REPRODUCING.md")
    text = path.read_text(encoding="utf-8")

    def block(match: re.Match) -> str:
        name = match.group(1)
        body = assumptions_markdown() if name == "assumptions" else cost_markdown(name)
        return f"<!-- costs:{name}:start -->\n{body}\n<!-- costs:{name}:end -->"

    new = re.sub(r"<!-- costs:([\w-]+):start -->.*?<!-- costs:\1:end -->", block, text, flags=re.S)
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text
