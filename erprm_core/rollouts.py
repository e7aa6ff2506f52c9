"""Solutions and per-step Monte Carlo completions through a sampler (the computations of 01_rollouts).

* :func:`sample_solutions` draws ``n`` solutions per problem from a policy, splits them into steps
  (:func:`erprm_core.steps.split_steps`) and grades them (:mod:`erprm_core.grading`).
* :func:`rollout_completions` draws ``k`` completions of every step prefix of every solution except the
  last step and grades each one: ``completion_rewards[i][j]`` is 1 when prefix ``i`` followed by completion
  ``j`` reaches the reference answer. These are the Monte Carlo samples behind every step label (02_labels).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from erprm_core import grading
from erprm_core.sampler import Sampler
from erprm_core.steps import policy_prompt, split_steps

# Columns every rollout record has (schema "rollout" of the kit); extra columns are kept for audits.
ROLLOUT_COLUMNS = (
    "problem_id", "question", "answer", "task", "sample_index", "steps",
    "pred", "outcome", "truncated", "completion_rewards", "n_tokens",
)  # fmt: skip


def _task_of(problem: dict[str, Any], task: str | None) -> str:
    found = task or problem.get("task")
    if not found:
        raise ValueError(f"problem {problem.get('id')!r} has no 'task' and no task= was given")
    return found


def sample_solutions(
    sampler: Sampler,
    problems: Sequence[dict[str, Any]],
    n: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    seed: int = 0,
    prompt_template: str = "plain",
    task: str | None = None,
) -> list[dict[str, Any]]:
    """Sample ``n`` solutions per problem and grade them; one record per (problem, sample_index).

    A record holds ``problem_id, sample_index, text, steps, pred, outcome (0/1), truncated, n_tokens,
    finish``. ``temperature=0`` is greedy. The prompt is ``policy_prompt(question, prompt_template)``. Sample
    ``j`` of problem ``p`` is seeded by ``row_seed(seed, "solution", p["id"], j)`` (see the module docstring
    for what is reproducible). ``task`` overrides each problem's ``task`` for grading. ``sampler`` is a ready
    sampler (``erprm_core.generation.make_sampler``). Records come in problem order, then sample order.
    """
    prompts = [policy_prompt(p["question"], prompt_template) for p in problems]
    keys = [("solution", p["id"]) for p in problems]
    gens = sampler.generate(prompts, n, keys, seed, temperature, top_p, max_new_tokens, desc="solutions")
    records = []
    for problem, per_problem in zip(problems, gens, strict=True):
        task_name = _task_of(problem, task)
        for j, gen in enumerate(per_problem):
            records.append(
                {
                    "problem_id": problem["id"],
                    "sample_index": j,
                    "text": gen.text,
                    "steps": split_steps(gen.text),
                    "pred": grading.extract_answer(gen.text, task_name),
                    "outcome": int(grading.is_correct(gen.text, problem["answer"], task_name)),
                    "truncated": gen.truncated,
                    "n_tokens": gen.n_tokens,
                    "finish": gen.finish,
                }
            )
    return records


def completion_prefix(question: str, steps: Sequence[str], i: int, prompt_template: str = "plain") -> str:
    """The text the completer continues for the prefix ending at step ``i`` (0-based).

    ``policy_prompt(question) + "\\n".join(steps[: i + 1]) + "\\n"``: the solution's first ``i + 1`` steps,
    one per line, then a newline so the completer starts the next step.
    """
    return policy_prompt(question, prompt_template) + "\n".join(steps[: i + 1]) + "\n"


def rollout_completions(
    sampler: Sampler,
    solutions: Sequence[dict[str, Any]],
    k: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    seed: int = 0,
    prompt_template: str = "plain",
) -> list[dict[str, Any]]:
    """For each solution, ``k`` graded completions of every step prefix except the last.

    ``solutions`` are dicts with ``problem_id, sample_index, question, answer, task, steps``. Returns, per
    solution and in the same order, ``{"completion_rewards": [[0/1] * k per prefix], "completion_tokens":
    int, "completions_truncated": int}``. Completion ``j`` of prefix ``i`` is seeded by
    ``row_seed(seed, "completion", problem_id, sample_index, i, j)`` and graded on
    ``"\\n".join(steps[: i + 1]) + "\\n" + completion`` against the reference answer. All prefixes of all
    solutions are batched together; each prefix is run once and shared by its k completions.
    """
    prompts, keys, owners = [], [], []
    for s_index, sol in enumerate(solutions):
        for i in range(len(sol["steps"]) - 1):
            prompts.append(completion_prefix(sol["question"], sol["steps"], i, prompt_template))
            keys.append(("completion", sol["problem_id"], sol["sample_index"], i))
            owners.append((s_index, i))
    out = [{"completion_rewards": [], "completion_tokens": 0, "completions_truncated": 0} for _ in solutions]
    if not prompts:
        return out
    gens = sampler.generate(prompts, k, keys, seed, temperature, top_p, max_new_tokens, desc="completions")
    for (s_index, i), per_prefix in zip(owners, gens, strict=True):
        sol = solutions[s_index]
        head = "\n".join(sol["steps"][: i + 1]) + "\n"
        rewards = [int(grading.is_correct(head + g.text, sol["answer"], sol["task"])) for g in per_prefix]
        rec = out[s_index]
        rec["completion_rewards"].append(rewards)
        rec["completion_tokens"] += sum(g.n_tokens for g in per_prefix)
        rec["completions_truncated"] += sum(g.truncated for g in per_prefix)
    return out
