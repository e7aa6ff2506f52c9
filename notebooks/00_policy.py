# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · The policy
#
# Every later stage needs problems and a policy $\pi_0$ that solves them step by step: its samples are the
# candidates that the PRMs rank (best-of-N), its completions give the Monte Carlo labels
#
# $$r(a^{[l]}, x) = \frac{1}{\eta} \ln \mathbb{E}_{\pi_0(\cdot \mid x, a^{[l]})}\big[e^{\eta\, r(a, x)}\big],$$
#
# and RAFT fine-tunes it. For the ranking to matter the policy must be imperfect in an interesting way:
# greedy accuracy well below pass@$k$, the share of problems that at least one of $k$ samples solves.
#
# The embedded default (`policy_name = ""`) is a small Llama model trained from scratch on the synthetic
# task `arith`: GSM8K-style word problems with 2-6 dependent steps, one step per line, the last line
# `The answer is: N`. A word-level tokenizer holds every word and every number as one token. Paper profiles
# set `policy_name` to a hub model (e.g. Mistral-MetaMath-7b): nothing is trained, the name is recorded.
#
# Knobs: the split sizes, the difficulty (`min_steps`, `max_steps`, `max_value`, `max_operand`,
# `max_factor`), the model size, the SFT recipe, and the evaluation (`n_samples` per problem for pass@k).

# %%
import pandas as pd
from IPython.display import Markdown

from erprm_core.report import figures, findings, style
from erprm_core.running import artifacts
from erprm_core.stages import policy

# %% tags=["parameters"]
profile: str = "smoke"  # results/<profile> and runs/<profile> folders to use
seed: int = 0  # seed of the problem generator, model initialisation, training and sampling
task: str = "arith"  # problem source: arith (generated), gsm8k or math (hub or local JSONL)
source: str = ""  # gsm8k/math only: local JSONL file or folder (empty: the hub dataset)
n_train_sft: int = 3200  # problems for the policy's supervised fine-tuning (train side)
n_train_prm: int = 16  # problems whose rollouts label the PRM training data (train side, 01_rollouts)
n_raft: int = 32  # RAFT prompts (train side, 05_rlhf_raft)
n_test: int = 40  # held-out test problems (best-of-N, RAFT evaluation, this notebook's evaluation)
min_steps: int = 2  # arith: fewest arithmetic steps per problem
max_steps: int = 4  # arith: most arithmetic steps per problem
max_value: int = 99  # arith: bound of every number (operands, intermediates, answers); tokenizer range
max_operand: int = 10  # arith: bound of the numbers added or subtracted
max_factor: int = 5  # arith: bound of the multipliers and divisors
policy_name: str = ""  # empty: train the tiny policy from scratch; else a hub name or folder to load
hidden_size: int = 64  # tiny model width
num_layers: int = 2  # tiny model depth (decoder layers)
num_heads: int = 4  # attention heads
intermediate_size: int = 128  # MLP width
max_position_embeddings: int = 384  # longest sequence (prompt + solution) in tokens
epochs: float = 1.0  # passes over the SFT problems
train_steps: int = -1  # optimizer steps (overrides epochs when > 0)
lr: float = 0.01  # peak learning rate (cosine schedule)
batch_size: int = 16  # sequences per optimizer step
warmup_ratio: float = 0.03  # share of steps for linear warm-up
n_samples: int = 4  # samples per problem at temperature 1.0 for pass@k (k in 1, 4, 16, 64 up to n_samples)
n_passk_problems: int = 16  # test problems used for pass@k (the first ones)
temperature: float = 1.0  # sampling temperature for pass@k
max_new_tokens: int = 128  # token limit of a generated solution
eval_batch_size: int = 64  # sequences per generation batch
backend: str = "hf"  # sampling backend: hf (CPU/GPU) or vllm (optional extra, GPU)
prompt_template: str = "plain"  # policy prompt format: plain (tiny policy) or metamath
device: str = "auto"  # auto, cpu or cuda
dtype: str = "auto"  # auto (bf16 on a GPU that has it, else float32), float32, bfloat16
torch_threads: int = 0  # CPU threads for torch (0: auto, the cores idle at the start)
cpu_numerics: str = "portable"  # CPU kernel paths: portable (pinned: the same bits on any x86-64 CPU with AVX2) or default

# %%
config = policy.PolicyConfig.from_namespace(globals())
P = artifacts.paths(profile)  # the first stage: nothing upstream to check
res = policy.run(config)  # pins the CPU numerics first, before any tensor operation
res.sizes

# %% [markdown]
# ## Problems
# Train-side splits are disjoint slices of one seeded stream; the test side is decided by a hash of each
# problem's arithmetic (start value, operations, operands), so no computation appears on both sides.

# %%
example = res.problems["test"][0]
print(example["question"] + "\n" + example["solution"])
res.split_summary

# %% [markdown]
# ## Training (or loading) the policy
# Supervised fine-tuning with the loss on the solution tokens only (prompt tokens masked), EOS appended.
# The trained model is saved with `save_pretrained` and loaded back through the same loader as a hub model.

# %%
pd.Series(res.policy.info)

# %%
style.shown(figures.figure_policy_training(res.policy.log), P.figures, "policy_training")

# %% [markdown]
# ## Evaluation on held-out problems
# Greedy accuracy with a 95% Wilson interval; pass@$k$ at temperature 1.0 from `n_samples` samples per
# problem with the unbiased estimator $1 - \binom{n-c}{k} / \binom{n}{k}$ ($c$ correct of $n$) and a
# bootstrap 95% interval over problems. Greedy decoding runs on every test problem, the samples on the first
# `n_passk_problems` only (the figure's labels say how many). The gap between greedy and pass@$k$ is what
# reranking can recover.

# %% tags=["nbval-check-output"]
res.evaluation.table

# %%
fig = figures.figure_policy_accuracy(res.evaluation.table, res.evaluation.by_steps, config.n_passk_problems)
style.shown(fig, P.figures, "policy_accuracy")

# %% [markdown]
# ## What the greedy solutions get wrong
# Task `arith` only: every question determines its reference solution line by line, so each greedy solution
# has a ground truth (`erprm_core.tasks.arith_truth`): the first wrong step and its kind. `arithmetic_slip`:
# the right event and inputs, a wrong result; `wrong_operand_or_event`: a wrong number, operation or
# restated event; `skipped_or_repeated_event`: another event than the one due (or the answer too early);
# `bad_final_line`: a wrong or malformed answer line; `truncation`: stopped early; `none`: all right.
# Table `policy_errors`; other tasks have no step-level ground truth and skip it.

# %%
if res.errors is not None:
    display(res.errors)  # noqa: F821
else:
    print(f"task {task!r}: no step-level ground truth, so no error-type table (arith only)")

# %% [markdown]
# ## A few sampled solutions

# %%
with pd.option_context("display.max_colwidth", 300):
    display(res.examples)  # noqa: F821

# %% [markdown]
# ## What this run shows
# Sentences generated from the tables this notebook wrote, so they hold for this run and profile (a claim
# that goes against the paper links to the research log); then one line on what ran, with the full record a
# link.

# %%
closing = findings.policy_findings(artifacts.read_table(profile, "policy_eval"))
Markdown(closing + "\n" + artifacts.run_line(profile, "00_policy"))
