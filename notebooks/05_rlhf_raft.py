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
# # 05 · RLHF by RAFT
#
# Does a better reward model make a better policy, not just a better picker? RAFT (reward-ranked
# fine-tuning, paper section 2 step 7) turns each reward model into a policy update. Per iteration $i$,
# for every training prompt $x$:
#
# $$y^*(x) = \arg\max_{j \le m} R(x, y_j), \quad y_j \sim \pi_{i-1}(\cdot \mid x), \qquad
# R(x, y) = \min_l \mathrm{PRM}(x, y^{[l]}) \;(\text{ORM: last step})$$
#
# then $\pi_i$ = $\pi_{i-1}$ fine-tuned on the pairs $(x, y^*(x))$ (loss on solution tokens only, learning
# rate $\mathrm{lr}\cdot\mathrm{lr\_decay}^{\,i-1}$), evaluated greedily on the test problems. Every reward
# model starts from the same policy (00_policy) and sees the same random numbers; iteration 0 is the
# no-RLHF baseline. The paper: 3 iterations, $m = 16$, 20k prompts, 2 epochs, lr 5e-7 decayed.
#
# Knobs: `reward_models` (PRM label rules from 03, e.g. `er_1` for ER-PRM with $\eta = 1$; also the
# controls `random` = self-training without a reward, `oracle` = pick by the answer key), `iterations`,
# `m`, `n_prompts`, `lr`, `lr_decay`, `epochs`, `aggregation`. Finished iterations are reused on a rerun;
# a failed one is reported with its reward model and iteration.

# %%
from IPython.display import Markdown

from erprm_core.report import figures, findings, style
from erprm_core.running import artifacts
from erprm_core.stages import raft

# %% tags=["parameters"]
profile: str = "smoke"  # results/<profile> and runs/<profile> folders to use
seed: int = 0  # base seed of this stage (per-iteration seeds derive from it)
reward_models: str = "er_1,hard,soft,orm"  # PRM rules from 03 (er_<eta>, hard, soft, orm), or random, oracle
iterations: int = 1  # RAFT iterations per reward model (the paper: 3)
m: int = 4  # samples per prompt, best one kept (the paper: 16)
n_prompts: int = 16  # RAFT training prompts (first n of the raft split; 0 for all)
n_test: int = 32  # test problems for greedy accuracy (first n of the test split; 0 for all)
lr: float = 1e-4  # SFT learning rate of iteration 1
lr_decay: float = 0.5  # learning rate factor per further iteration (geometric schedule)
lr_schedule: str = "geometric"  # geometric (lr_decay each iteration) or linear, lr (T-i+1)/T as the authors
epochs: float = 1.0  # SFT epochs per iteration (the paper: 2)
temperature: float = 1.0  # sampling temperature of the candidates (evaluation is greedy)
top_p: float = 1.0  # nucleus sampling of the candidates
aggregation: str = "min"  # step-score aggregation of PRMs: min, prod, last, mean (ORM: always last)
max_new_tokens: int = 128  # token limit of a solution
batch_size: int = 64  # sequences per sampling / scoring batch
train_batch_size: int = 8  # SFT batch size
exclude_truncated: bool = True  # candidates cut at the token limit cannot be picked (counted in the audit)
prompt_template: str = "plain"  # policy prompt format: plain (tiny policy) or metamath
backend: str = "hf"  # sampling backend: hf or vllm
device: str = "auto"  # auto, cpu or cuda
torch_threads: int = 0  # CPU threads for torch (0: auto, the cores idle at the start)
cpu_numerics: str = "portable"  # CPU kernel paths: portable (pinned: the same bits on any x86-64 CPU with AVX2) or default

# %%
config = raft.RaftConfig.from_namespace(globals())
P = artifacts.paths(profile)
config.settings()

# %% [markdown]
# ## RAFT iterations
# One run per reward model (checkpoints and records under `runs/<profile>/raft`). The table is tidy: one
# row per reward model x iteration x metric, with 95% intervals (Wilson for greedy accuracy).

# %%
res = raft.run(config)  # names the stage to run when an input is missing; pins the CPU numerics first
res.table[res.table["metric"].isin(["greedy_accuracy", "greedy_gain"])].pivot_table(
    index=["metric", "reward_model"], columns="iteration", values="value"
)

# %% [markdown]
# ## Greedy accuracy per iteration
# Bars are 95% Wilson intervals over the test problems; the grey band is the starting policy. Beside it, the
# paper's RAFT numbers (its start policy and the accuracy after 3 iterations with each reward model; no
# intervals published): fig. 4, which 06_figures saves.

# %%
style.shown(figures.figure_raft(res.table, figures.paper_reference()))

# %% [markdown]
# ## Paired comparisons
# Every policy is evaluated on the same test problems, so differences are measured per problem: ER-PRM
# minus each other reward model after each iteration (95% bootstrap interval, sign-flip permutation p-value),
# and in the table above `greedy_gain` = each policy minus the starting policy. Paired intervals are much
# narrower than the per-policy intervals of the figure.

# %%
res.paired

# %% [markdown]
# ## How well does each reward model pick?
# Over all prompts of an iteration (a prompt without a pick counts as wrong): `selected_outcome` is the
# correctness of the picked solutions, `sample_outcome` that of all samples (a random pick),
# `oracle_outcome` the share of prompts with a correct candidate (a perfect reward model). A reward model is
# useful when `selected_outcome` sits well above `sample_outcome`.

# %%
res.table[res.table["metric"].str.endswith("_outcome")].pivot_table(
    index=["reward_model", "iteration"], columns="metric", values="value"
)

# %% [markdown]
# ## Audit
# Every candidate and prompt by reason: eligible, empty, truncated (excluded), unscored (no step tag
# located; some_steps_unscored: scored on the others), prompts left without a candidate, picks decided by a
# tie-break, picks without a final answer.

# %% tags=["nbval-check-output"]
res.audit

# %% [markdown]
# ## What this run shows
# Sentences generated from the tables this notebook wrote, so they hold for this run and profile (a claim
# that goes against the paper links to the research log); then one line on what ran, with the full record a
# link.

# %%
closing = findings.raft_findings(res.table, res.paired)
Markdown(closing + "\n" + artifacts.run_line(profile, "05_rlhf_raft"))
