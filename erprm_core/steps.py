"""Step splitting and the Math-Shepherd / ER-PRM text format.

A solution is a list of steps, one per non-empty line. A PRM reads
``question + " " + "".join(step + " ки" for step in steps)``: the step tag "ки" closes every step and the
model's next-token logits for " +" / " -" at each tag give the step score. Used by rollouts, prm, training.
"""

from __future__ import annotations

STEP_TAG = "ки"
GOOD_TOKEN = "+"
BAD_TOKEN = "-"

# How a policy is prompted. "plain" is the tiny model's format (question, newline, then one step per line,
# the last "The answer is: N"); "metamath" is the Alpaca template Mistral-MetaMath-7b was trained with.
PROMPT_TEMPLATES = {
    "plain": "{question}\n",
    "metamath": (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\n{question}\n\n### Response: Let's think step by step.\n"
    ),
}


def split_steps(solution: str) -> list[str]:
    """Split a solution into steps: one per line, surrounding whitespace stripped, empty lines ignored."""
    return [line.strip() for line in solution.splitlines() if line.strip()]


def join_steps(steps: list[str]) -> str:
    """Inverse of :func:`split_steps` for clean steps: one step per line."""
    return "\n".join(steps)


def format_prm_input(question: str, steps: list[str], step_tag: str = STEP_TAG) -> str:
    """Return ``question + " " + "".join(step + " " + step_tag for step in steps)`` (Math-Shepherd format)."""
    return question + " " + "".join(f"{step} {step_tag}" for step in steps)


def policy_prompt(question: str, template: str = "plain") -> str:
    """The text a policy continues with its solution; ``template`` names an entry of PROMPT_TEMPLATES."""
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"prompt template {template!r} unknown; choose one of {sorted(PROMPT_TEMPLATES)}")
    return PROMPT_TEMPLATES[template].format(question=question)
