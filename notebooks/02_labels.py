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
# # 02 · Step labels
#
# One set of rollouts, many label rules. For a prefix whose $k$ completions were graded $y_1..y_k$
# ($p$ = fraction correct), the entropy-regularised label is the log-mean-exp
#
# $$\ell_\eta = \frac{1}{\eta} \ln \frac{1}{k} \sum_{j} e^{\eta y_j} = \frac{1}{\eta} \ln\big(1 - p + p\,e^{\eta}\big),$$
#
# which is the soft label $p$ at $\eta \to 0$ (Math-Shepherd soft estimation) and the hard label
# $\mathbb{1}[p > 0]$ at $\eta \to \infty$ (Math-Shepherd hard estimation); in between it is optimistic about a
# prefix in proportion to $\eta$. The last step of every solution gets its true outcome under every rule; the
# ORM labels only that last step. Only the rule changes between the PRMs of 03: no new sampling.
#
# Knobs: `etas` (the grid; `0` = soft, `inf` = hard) and `rollouts_file` (empty = this profile's rollouts).

# %%
import math

import matplotlib.pyplot as plt
import seaborn as sns

from erprm_core import artifacts, labels, plotting, sampling

# %% tags=["parameters"]
profile: str = "smoke"  # results/<profile> and runs/<profile> folders to use
etas: str = "0,0.1,0.5,1,2,5,10,inf"  # eta grid, comma-separated (0 is the soft label, inf the hard label)
rollouts_file: str = ""  # rollouts file to label (empty: this profile's runs/<profile>/rollouts.jsonl)

# %%
P = artifacts.paths(profile)
eta_grid = labels.parse_eta_grid(etas)
source = artifacts.require(rollouts_file or P.rollouts_file, "01_rollouts", profile, "rollouts")
[labels.rule_name(e) for e in eta_grid]

# %% [markdown]
# ## Labels for every rule
# Solutions without any step cannot be labelled; they would be counted here (nothing is dropped silently).

# %%
res = sampling.run_labels(P, eta_grid, source)
audit = res.audit.to_frame()
artifacts.write_table(audit, profile, "labels_audit")
audit

# %% [markdown]
# ## Label statistics per rule
# Over all labelled steps (ORM: last steps only). `mean_gap_to_soft` is how far a rule lifts labels above the
# Monte Carlo success rate on the same steps; it grows with $\eta$ and is largest for the hard label.

# %%
stats = sampling.label_statistics(res.records)
artifacts.write_table(stats, profile, "label_stats")
stats.pivot(index="rule", columns="metric", values="value").loc[res.rules].round(4)

# %% [markdown]
# ## label(p, η)
# The closed form for binary rewards: between the soft diagonal and the hard step function.

# %%
fig = plotting.plot_label_curves([e for e in eta_grid if 0 < e < math.inf])
plotting.save_figure(fig, P.figures, "label_curves")

# %% [markdown]
# ## Distribution of the labels per rule
# Share of labelled steps in each bin; 0 and 1 have bins of their own. The soft rule spreads labels over
# (0, 1); the larger $\eta$, the more mass moves towards 1, until the hard rule is all-or-nothing.

# %%
dist = sampling.label_distribution(res.records, bins=10)
artifacts.write_table(dist, profile, "label_distribution")
share = dist.pivot(index="rule", columns="bin", values="share").loc[res.rules, dist["bin"].unique()]
fig, ax = plt.subplots(figsize=(9, 3.8))
sns.heatmap(share, annot=True, fmt=".2f", cmap="Blues", cbar=False, ax=ax)
ax.set(xlabel="label bin", ylabel="rule")
plotting.save_figure(fig, P.figures, "label_distribution")

# %% [markdown]
# ## A worked example
# One solution whose prefixes have mixed completions (the first such in the rollouts file): each step, the
# outcomes of its `k` completions (the last step: the solution's outcome), $p$, and the label each rule gives.

# %%
example = sampling.pick_worked_example(res.rollouts)
example["question"]

# %% tags=["nbval-check-output"]
sampling.worked_example_table(example, eta_grid)

# %% [markdown]
# ## Record

# %%
artifacts.update_manifest(
    profile, "02_labels", etas=etas, rules=res.rules, rollouts=source.name, labelled_solutions=len(res.records),
    labelled_steps=sum(len(r["steps"]) for r in res.records),
)["stages"]["02_labels"]  # fmt: skip
