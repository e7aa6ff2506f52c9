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
# # 01 · Rollouts
#
# Every step label of the study comes from Monte Carlo completions. The policy writes `n_solutions` solutions
# per training problem (one step per line, last line "The answer is: N"); for every step prefix
# $a^{[l]}$ except the last, the completer (by default the policy itself, $\pi_0$) writes `k` completions, each
# graded against the reference answer: $y_j \in \{0, 1\}$. 02_labels turns them into labels, e.g. the ER label
#
# $$r(a^{[l]}, x) = \frac{1}{\eta} \ln \frac{1}{k} \sum_{j=1}^{k} e^{\eta\, y_j},$$
#
# so every label rule (soft, hard, ER for any $\eta$, ORM) is computed from the SAME rollouts stored here.
#
# This is the costliest stage. The sampler batches all prefixes of a shard together, runs each prefix once
# and shares its KV cache among its `k` completions, and stops a completion at its answer line or EOS.
# Problems are processed in resumable shards with seeds per problem/solution/step/completion, so an
# interrupted run resumes to exactly the same file. Knobs: `n_solutions`, `k` (the paper: 16), `temperature`
# and `top_p` (the paper: 1.0 / 1.0), `max_new_tokens`, `completer_name`, `backend` (`vllm` at paper scale).

# %%
import pandas as pd
from IPython.display import Markdown

from erprm_core.report import figures, findings, style
from erprm_core.running import artifacts
from erprm_core.stages import policy, rollouts

# %% tags=["parameters"]
profile: str = "smoke"  # results/<profile> and runs/<profile> folders to use
seed: int = 0  # base seed of this stage (per problem/solution/step/completion seeds derive from it)
n_problems: int = 8  # training problems to roll out (first n of the train_prm split; 0 for all)
n_solutions: int = 2  # solutions sampled per problem
k: int = 4  # completions per step prefix (the paper: 16)
temperature: float = 1.0  # sampling temperature of solutions and completions (the paper: 1.0)
top_p: float = 1.0  # nucleus sampling (the paper: 1.0)
max_new_tokens: int = 128  # token limit of a solution and of a completion (cut ones are audited)
completer_name: str = ""  # completer model: empty for the policy itself (pi_0), else a hub name or folder
prompt_template: str = "plain"  # policy prompt format: plain (tiny policy) or metamath
backend: str = "hf"  # sampling backend: hf (transformers, CPU/GPU) or vllm (optional extra, GPU)
batch_size: int = 64  # sequences decoded together
shard_size: int = 8  # problems per resumable shard
device: str = "auto"  # auto, cpu or cuda
dtype: str = "auto"  # auto (bf16 on a capable GPU, else fp32), float32, bfloat16, float16
torch_threads: int = 0  # CPU threads for torch (0: auto, the cores idle at the start)
cpu_numerics: str = "portable"  # CPU kernel paths: portable (pinned: the same bits on any x86-64 CPU with AVX2) or default
vllm_memory: float = 0.0  # vLLM gpu_memory_utilization per engine (0: 0.9, or 0.45 each with a completer)

# %%
config = rollouts.RolloutsConfig.from_namespace(globals())
P = artifacts.paths(profile)

# %% [markdown]
# ## Solutions and completions
# Shards already on disk (same parameters, problems and model) are reused; a corrupt one is named in a
# warning and recomputed. The summary counts solutions, prefixes, completions and tokens.

# %%
res = rollouts.run(config)  # names the stage to run when an input is missing; pins the CPU numerics first
display(res.setup)  # noqa: F821
res.summary

# %% [markdown]
# ## Audit
# Nothing is dropped: solutions without a parseable final answer (graded wrong), solutions and completions
# cut at `max_new_tokens`, one-step solutions (no prefix to complete, only the outcome labels them) are
# counted here.

# %% tags=["nbval-check-output"]
res.audit.to_frame()

# %% [markdown]
# ## A few solutions

# %%
pd.DataFrame(res.records[:4])[
    ["problem_id", "sample_index", "steps", "pred", "outcome", "completion_rewards"]
]

# %% [markdown]
# ## Where the rollout solutions first go wrong
# Task `arith` only: every rollout record also carries its ground truth, `first_error` (0-based index of the
# first wrong step, -1 when all are right) and `error_type` (see 00_policy), which 02_labels passes on to
# measure the labels against. Share of the solutions by error type; other tasks have no step-level truth.

# %%
if res.records and "error_type" in res.records[0]:
    display(policy.error_type_table([r["error_type"] for r in res.records]))  # noqa: F821
else:
    print("no step-level ground truth for this task (arith only)")

# %% [markdown]
# ## How often a prefix still reaches the answer
# $p$ = fraction of a prefix's `k` completions that are correct, against the steps that remain after the
# prefix (1 = only the last step is left), for solutions that end right and wrong; counting from the end
# lines up problems of different lengths. Prefixes of correct solutions should keep a high $p$; in wrong ones
# $p$ drops where the error enters. Bars: 95% intervals; below, the number of prefixes behind each point.

# %%
style.shown(figures.figure_prefix_success(res.prefixes), P.figures, "rollouts_prefix_success")

# %% [markdown]
# ## What this run shows
# Sentences generated from the tables this notebook wrote, so they hold for this run and profile (a claim
# that goes against the paper links to the research log); then one line on what ran, with the full record a
# link.

# %%
closing = findings.rollouts_findings(artifacts.read_table(profile, "rollouts_summary"), res.prefixes)
Markdown(closing + "\n" + artifacts.run_line(profile, "01_rollouts"))
