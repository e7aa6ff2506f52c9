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
import pandas as pd
from IPython.display import Markdown

from erprm_core.report import figures, findings, style
from erprm_core.running import artifacts
from erprm_core.stages import labels

# %% tags=["parameters"]
profile: str = "smoke"  # results/<profile> and runs/<profile> folders to use
etas: str = "0,0.1,0.5,1,2,5,10,inf"  # eta grid, comma-separated (0 is the soft label, inf the hard label)
rollouts_file: str = ""  # rollouts file to label (empty: this profile's runs/<profile>/rollouts.jsonl)

# %%
config = labels.LabelsConfig.from_namespace(globals())
P = artifacts.paths(profile)
res = labels.run(config)  # names 01_rollouts when the rollouts are missing
res.rules

# %% [markdown]
# ## Labels for every rule
# Solutions without any step cannot be labelled; they would be counted here (nothing is dropped silently).

# %% tags=["nbval-check-output"]
res.audit.to_frame()

# %% [markdown]
# ## Label statistics per rule
# Over all labelled steps (ORM: last steps only). `mean_gap_to_soft` is how far a rule lifts labels above the
# Monte Carlo success rate on the same steps; it grows with $\eta$ and is largest for the hard label.

# %%
res.stats_by_rule()

# %% [markdown]
# ## label(p, η)
# The closed form for binary rewards: between the soft diagonal and the hard step function (fig. 1, which
# 06_figures saves).

# %%
style.shown(figures.figure_label_curves(figures.label_curve_table(res.eta_grid)))

# %% [markdown]
# ## Distribution of the labels per rule
# Share of labelled steps in each bin; 0 and 1 have bins of their own. The soft rule spreads labels over
# (0, 1); the larger $\eta$, the more mass moves towards 1, until the hard rule is all-or-nothing.

# %%
style.shown(figures.figure_label_distribution(res.distribution, res.rules), P.figures, "label_distribution")

# %% [markdown]
# ## The labels against the ground truth
# Task `arith` only: each solution's first wrong step is known (`first_error`, from 01_rollouts). A useful
# label is high on the steps before it and low from it on. `auroc_vs_truth` is the AUROC of each rule's
# step labels for "step before the first error" (positive) against "at or after it", over all labelled steps
# and by the number of steps that follow the labelled one (0 = the last step, whose label is the outcome
# under every rule), with 95% bootstrap intervals over problems (table `label_quality`). Every ER label is a
# strictly increasing function of $p$, so for finite $\eta$ it ranks steps exactly as the soft label does
# (equal AUROC up to rounding ties); only the hard label, which merges every $p > 0$, can rank differently.
# `brier_vs_truth` (mean squared difference between label and truth, lower is closer) also sees how far the
# labels sit from the truth, which is what $\eta$ moves.

# %%
if res.quality is not None:
    overall = res.quality[res.quality["steps_remaining"] == "all"].drop(columns="steps_remaining")
    display(overall.round(3))  # noqa: F821
    auroc = res.quality[res.quality["metric"] == "auroc_vs_truth"]
    by_remaining = auroc.pivot(index="steps_remaining", columns="rule", values="value")
    display(by_remaining.loc[auroc["steps_remaining"].unique(), res.rules].round(3))  # noqa: F821
    display(style.shown(figures.figure_label_quality(res.quality), P.figures, "label_quality"))  # noqa: F821
else:
    print("no step-level ground truth for this task (arith only): label_quality skipped")

# %% [markdown]
# ## A worked example
# Chosen by a fixed rule (`labels.pick_worked_example`): the first solution in the rollouts file whose first
# wrong step (ground truth, task `arith`) is step 2 or later and not the answer line, and which has a right step
# with mixed completions ($0 < p < 1$). So it shows right steps, a step where the rules disagree, and what each
# rule does with a wrong step. Per step: the whole step, its ground truth (`right`, `WRONG (<error type>)` at
# the first error, `after the error`), the outcomes of its `k` completions (the last step: the solution's
# outcome), $p$, and the label each rule gives. A right step can still get a low $p$: its completions must
# get every remaining step right, and the policy's accuracy falls with the number of steps (00_policy), so
# a Monte Carlo label also measures how far a step is from the end. Without a ground truth, or when no
# solution qualifies (the smoke policy errs at step 1), the first solution with at least 3 steps and a mixed
# prefix is shown.

# %%
res.example["question"]

# %% tags=["nbval-check-output"]
with pd.option_context("display.max_colwidth", None, "display.width", 250):
    display(res.example_table)  # noqa: F821

# %% [markdown]
# ## Any other η
# The same completions give a label for any $\eta$: the worked example's labels step by step (shaded: at or
# after the first error) and the distribution of all labels, for soft, hard and the $\eta$ between. In
# JupyterLab started by `make lab` this is a slider (ipywidgets) that relabels every rollout for the chosen
# $\eta$; anywhere else (papermill, nbval, `erprm reproduce`) it is a static figure for $\eta$ = 0.5, 2 and 10,
# so an executed notebook holds an image and no widget state. `make lab` sets `ERPRM_INTERACTIVE=1` for its
# kernels; to get the slider in another Jupyter, start it with that variable.

# %%
labels.eta_explorer(res)

# %% [markdown]
# ## What this run shows
# Sentences generated from the tables this notebook wrote, so they hold for this run and profile (a claim
# that goes against the paper links to the research log); then one line on what ran, with the full record a
# link.

# %%
closing = findings.labels_findings(artifacts.read_table(profile, "label_stats"), res.quality)
Markdown(closing + "\n" + artifacts.run_line(profile, "02_labels"))
