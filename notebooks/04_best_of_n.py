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
# # 04 · Best-of-N
#
# Does a better step label make a better picker? The policy writes $N_{max}$ candidate solutions for each
# test problem; every reward model scores every candidate ONCE; best-of-N then picks, among $N$ candidates,
# the one with the highest solution score
#
# $$\hat y = \arg\max_{j \le N} R(x, y_j), \qquad R(x, y) = \min_l \mathrm{PRM}(x, y^{[l]}) \quad
# (\text{the paper's aggregation; also prod, last, mean}),$$
#
# and scores 1 if $\hat y$ is correct. Accuracy at $N$ is the EXACT expectation over all $\binom{N_{max}}{N}$
# subsets of the pool (ties split evenly), so no candidate is privileged; votes are averaged over random
# subsets. All reward models see the identical pool, so their differences are paired: we bootstrap 95%
# intervals over problems and test ER-PRM against the hard- and soft-label PRMs problem by problem.
# Baselines: random pick, majority vote, PRM-weighted vote, oracle pass@N.
#
# Knobs: `n_max`, `n_test` (pool size), `temperature`/`top_p` (candidate diversity), `aggregation` (the
# headline), `er_rule` (the ER-PRM compared in the headline, fixed in advance), `unanswered_last` (rank
# solutions without a final answer last), `n_subsets`, `n_boot`.

# %%
import pandas as pd
from IPython.display import Markdown

from erprm_core import labels
from erprm_core.prm import AGGREGATIONS
from erprm_core.report import figures, findings, style
from erprm_core.running import artifacts
from erprm_core.stages import best_of_n

# %% tags=["parameters"]
profile: str = "smoke"  # results/<profile> and runs/<profile> folders to use
seed: int = 0  # base seed: candidate sampling, vote subsets and bootstrap
n_max: int = 8  # candidates per test problem (the paper: 64)
n_test: int = 16  # test problems in the pool (first n of the test split; 0 for all)
temperature: float = 1.0  # sampling temperature of the candidates (the paper: 1.0)
top_p: float = 1.0  # nucleus sampling of the candidates
max_new_tokens: int = 128  # token limit of a candidate (truncated candidates are kept, graded wrong)
batch_size: int = 64  # sequences per sampling batch
shard_size: int = 16  # test problems per resumable pool shard
score_batch_size: int = 16  # solutions per PRM forward batch
aggregation: str = "min"  # headline step-score aggregation: min (the paper), prod, last, mean
er_rule: str = "er_1"  # the ER-PRM of the headline comparison (fixed before looking at results)
orm_aggregation: str = "last"  # aggregation of the ORM (it is trained on the last step only)
rules: str = ""  # comma-separated PRM rules to evaluate (empty: every PRM that 03 trained)
weighted_rules: str = ""  # comma-separated rules for PRM-weighted votes (empty: er_rule, hard, soft)
n_subsets: int = 200  # random subsets per problem and N for the votes
n_boot: int = 2000  # bootstrap resamples for the 95% intervals
scoring: str = "two_token"  # step score: two_token (softmax over +/-) or full_vocab
unanswered_last: bool = True  # rank candidates without a final answer (or truncated) below answered ones
prompt_template: str = "plain"  # policy prompt format: plain (tiny policy) or metamath
backend: str = "hf"  # sampling backend: hf or vllm
device: str = "auto"  # auto, cpu or cuda
dtype: str = "auto"  # weights dtype of the policy and the PRMs: auto, float32, bfloat16
torch_threads: int = 0  # CPU threads for torch (0: auto, the cores idle at the start)
cpu_numerics: str = "portable"  # CPU kernel paths: portable (pinned: the same bits on any x86-64 CPU with AVX2) or default

# %%
config = best_of_n.BestOfNConfig.from_namespace(globals())
P = artifacts.paths(profile)

# %% [markdown]
# ## The pool and its scores
# Candidates are sampled in resumable shards (seeded per problem and candidate, so a resumed run equals an
# uninterrupted one), graded, then scored by every PRM: one forward pass per distinct solution, step
# scores cached per rule under `runs/<profile>/pool`. Candidates without a final answer or cut at the
# token limit stay in the pool (graded wrong, no vote) and are counted in the audit below.

# %%
res = best_of_n.run(config)  # names the stage to run when an input is missing; pins the CPU numerics first
pd.Series({k: v for k, v in res.stats.items() if k != "prms"}, name="value").to_frame()

# %% tags=["nbval-check-output"]
res.audit

# %% [markdown]
# ## Best-of-N accuracy
# One row per method and N in `bon.csv` (methods `<rule>:<aggregation>`, `weighted_<rule>:<agg>`, and the
# baselines). Below: the headline aggregation, accuracy in %.

# %%
headline = res.headline_methods()
shown = res.bon[res.bon["method"].isin(headline + [labels.WEIGHTED_PREFIX + m for m in headline])]
table = shown.pivot(index="method", columns="n", values="value") * 100
table.loc[labels.method_order(shown["method"])].round(1)

# %% [markdown]
# The curves as accuracy minus greedy decoding (00_policy's held-out accuracy, the zero line), in points, on
# N = 4 to 64 (the paper's range; N = 1 and 2 are left out) with 95% bootstrap bands over problems (ER-PRM at
# the pre-set `er_rule`, hard, soft, ORM, the training-free verifiers when present, majority vote and the
# oracle) and a random pick as a horizontal line, beside the paper's curves less its own greedy accuracy, on
# one shared y-axis: fig. 2, which 06_figures saves.

# %%
title = f"This run ({profile}), 95% CI"
style.shown(figures.figure_best_of_n(res.bon, headline, figures.paper_reference(), title, res.greedy))

# %% [markdown]
# ## Paired comparisons on the identical pool
# `diff` = accuracy(ER) - accuracy(other) in points of fraction, with its 95% bootstrap interval over
# problems and a two-sided sign-flip permutation p-value; `n_a_better` / `n_b_better` count problems where
# one method beats the other. Rows labelled `post hoc` use the ER eta that did best on this very pool: they
# are exploratory, not a test.

# %%
cols = ["method_a", "method_b", "n", "acc_a", "acc_b", "diff", "ci_low", "ci_high", "p_value", "n_a_better",
        "n_b_better", "selection"]  # fmt: skip
res.paired[cols].round(4)

# %% [markdown]
# ## Ranking the candidates of one problem
# Best-of-N only asks a verifier to put a right candidate above the wrong ones of the same problem. Over the
# test problems with both outcomes in the pool: the share of (right, wrong) pairs the method orders right
# (ties half), with a 95% bootstrap interval over problems; 0.5 is a coin. `likelihood` (the policy's mean
# token log-probability of the candidate) and `fewer_steps` need no training.

# %%
res.ranking.round(3)

# %% [markdown]
# ## One candidate through every PRM
# The wrong candidate (with an answer) that the headline ER-PRM ranks highest in the pool: each step's score
# under every rule beside the ground truth, and the step where each rule's minimum falls (the one a `min`
# aggregation judges the candidate by). A PRM that has learned to verify puts its minimum at the first error.

# %%
print(res.example_note)
res.example.round(3) if len(res.example) else None

# %% [markdown]
# ## What each reward model picks from the full pool
# Shares of the picks at $N = N_{max}$ (ties split) that are correct, cast no vote (no final answer, or
# truncated), were truncated, and their mean number of steps; the `pool` row is a uniform pick. A PRM
# scores PREFIXES: a solution that stopped early keeps the optimistic value of its last prefix, so with
# raw scores a PRM may prefer unfinished solutions. With `unanswered_last` (the default) the evaluation
# ranks them below every answered candidate ("answered first" rows); they stay in the pool for the
# random and oracle baselines.

# %%
res.picks[res.picks["method"].isin(["pool", *headline])].set_index(["ranking", "method"]).round(3)

# %% [markdown]
# ## The eta sweep at $N_{max}$
# Every PRM comes from the same rollouts; only the label rule changes (at the headline `aggregation`). Soft
# ($\eta = 0$) and hard ($\eta = \infty$) are the two ends; the horizontal lines are majority vote, a random
# pick, the oracle and greedy decoding, each named with its value at the right; beside it the paper's soft, ER
# and hard PRMs at the same $N$ where it reports one: fig. 3, which 06_figures saves.

# %%
baselines = figures.bon_baselines(res.bon, n_max, res.greedy)
display(style.shown(figures.figure_eta_sweep(res.sweep, baselines, figures.paper_reference())))  # noqa: F821
pd.Series(res.best_eta, name="best ER eta (chosen post hoc)").to_frame()

# %% [markdown]
# ## Aggregations at $N_{max}$
# The same step scores aggregated four ways: min (the paper's), product, last step, mean.

# %%
style.shown(figures.figure_aggregations(res.aggregations, n_max, AGGREGATIONS), P.figures, "bon_aggregations")

# %% [markdown]
# ## What this run shows
# Sentences generated from the tables this notebook wrote, so they hold for this run and profile (a claim
# that goes against the paper links to the research log); then one line on what ran, with the full record a
# link.

# %%
closing = findings.best_of_n_findings(res.bon, res.paired, res.ranking, res.headline)
Markdown(closing + "\n" + artifacts.run_line(profile, "04_best_of_n"))
