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
# # 06 · Figures and summary
#
# Reads only `results/<profile>/tables/` (written by stages 00-05) and the paper's reported numbers
# (`erprm_core/reference/paper_results.csv`), and writes every figure (PNG + PDF) and the Markdown summary
# table that README.md includes. Rerun alone with `erprm figures --profile <profile>`.

# %%
from IPython.display import Markdown, display

from erprm_core import artifacts, labels, report

# %% tags=["parameters"]
profile: str = "smoke"  # results/<profile> folder to read tables from and write figures to
er_rule: str = "er_1"  # the ER-PRM label rule of the headline comparison (fixed before looking at results)
aggregation: str = "min"  # step-score aggregation of the PRMs in the headline (the paper uses min)
orm_aggregation: str = "last"  # the ORM scores a solution at its last step
label_etas: str = "0,0.1,0.5,1,2,5,10,inf"  # etas drawn in fig. 1

# %%
P = artifacts.paths(profile)
bon = artifacts.read_table(profile, "bon", stage="04_best_of_n")
paired = artifacts.read_table(profile, "bon_paired", stage="04_best_of_n")
raft = artifacts.read_table(profile, "raft", stage="05_rlhf_raft")
reference = report.paper_reference()
n_max = int(bon["n"].max())

# %% [markdown]
# ## Fig. 1 · the label as a function of p
# For binary completion rewards the ER label is $\frac{1}{\eta}\ln(1 - p + p e^{\eta})$: the soft label $p$
# as $\eta\to 0$, the hard label $\mathbb{1}[p>0]$ as $\eta\to\infty$.

# %%
curves = report.label_curve_table(labels.parse_eta_grid(label_etas))
artifacts.write_table(curves, profile, "label_curves")
fig1 = report.figure_label_curves(curves)
report.plotting.save_figure(fig1, P.figures, "fig1_label_curves")

# %% [markdown]
# ## Fig. 2 · best-of-N, beside the paper
# Left: this run (95% bootstrap intervals over problems). Middle and right: the paper's curves
# (Mistral-MetaMath-7b generator, min aggregation, read off its figure; no intervals were published).

# %%
methods = report.headline_methods(bon, er_rule, aggregation, orm_aggregation)
fig2 = report.figure_best_of_n(bon, methods, reference, f"This run ({profile}), 95% CI")
report.plotting.save_figure(fig2, P.figures, "fig2_best_of_n")

# %% [markdown]
# ## Fig. 3 · the eta sweep at N_max
# Every label rule comes from the same rollouts; only the label changes. Soft ($\eta=0$) and hard
# ($\eta=\infty$) are the two ends.

# %%
sweep = report.eta_sweep_table(bon, n_max, aggregation)
artifacts.write_table(sweep, profile, "eta_sweep")
base = bon[(bon["n"] == n_max) & bon["method"].isin(["majority", "oracle"])]
fig3 = report.figure_eta_sweep(sweep, base)
report.plotting.save_figure(fig3, P.figures, "fig3_eta_sweep")
sweep

# %% [markdown]
# ## Fig. 4 · RAFT
# Greedy accuracy of the policy after each RAFT iteration guided by each reward model.

# %%
fig4 = report.figure_raft(raft)
report.plotting.save_figure(fig4, P.figures, "fig4_raft")
raft[raft["metric"] == "greedy_accuracy"].pivot_table(
    index="reward_model", columns="iteration", values="value"
)

# %% [markdown]
# ## Summary table
# Best-of-N accuracy at N_max with 95% intervals, the paired difference ER-PRM minus each method on identical
# candidate pools, and the final RAFT accuracy; below it the setting (policy accuracy, the PRMs' training
# rollouts, the eta sweep). Table and facts are copied into README.md.

# %%
summary = report.summary_table(bon, paired, raft, er_rule, aggregation, orm_aggregation)
facts = report.summary_facts(
    *(artifacts.read_table(profile, t) if P.table(t).is_file() else None
      for t in ("policy_eval", "policy_accuracy_by_steps", "rollouts_summary")),
    sweep, n_problems_pool=int(bon["n_problems"].max()) if "n_problems" in bon else None, aggregation=aggregation,
)  # fmt: skip
markdown = report.to_markdown(summary) + "\n" + facts
report.write_summary(profile, markdown)
display(Markdown(markdown))
