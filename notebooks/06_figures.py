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

from erprm_core.stages import figures

# %% tags=["parameters"]
profile: str = "smoke"  # results/<profile> folder to read tables from and write figures to
er_rule: str = "er_1"  # the ER-PRM label rule of the headline comparison (fixed before looking at results)
aggregation: str = "min"  # step-score aggregation of the PRMs in the headline (the paper uses min)
orm_aggregation: str = "last"  # the ORM scores a solution at its last step
label_etas: str = "0,0.1,0.5,1,2,5,10,inf"  # etas drawn in fig. 1

# %%
config = figures.FiguresConfig.from_namespace(globals())
res = figures.run(config)  # reads the tables of 04 and 05 (names the stage when one is missing)

# %% [markdown]
# ## Fig. 1 · the label as a function of p
# For binary completion rewards the ER label is $\frac{1}{\eta}\ln(1 - p + p e^{\eta})$: the soft label $p$
# as $\eta\to 0$, the hard label $\mathbb{1}[p>0]$ as $\eta\to\infty$.

# %%
res.figures["fig1_label_curves"]

# %% [markdown]
# ## Fig. 2 · best-of-N, beside the paper
# Every panel shows best-of-N accuracy **minus greedy-decoding accuracy**, in points, on one shared y-axis and
# N = 4 to 64 (the paper's range; this run's N = 1 and 2 are left out). The zero line is greedy decoding:
# 00_policy's held-out accuracy for this run (its band is the greedy's own Wilson interval), the start policy
# of the paper's RAFT table for the paper. Left: this run, with 95% bootstrap bands over problems (the
# greedy's uncertainty is not in them) and a random pick as a horizontal line. Middle and right: the paper's
# curves (Mistral-MetaMath-7b generator, min aggregation, read off its figure; no intervals published). The
# legends are below the panels.

# %%
res.figures["fig2_best_of_n"]

# %% [markdown]
# ## Fig. 3 · the eta sweep at N_max
# Every label rule comes from the same rollouts; only the label changes. Soft ($\eta=0$) and hard
# ($\eta=\infty$) are the two ends; the horizontal lines are majority vote, a random pick, the oracle and
# greedy decoding.

# %%
display(res.figures["fig3_eta_sweep"])
res.sweep

# %% [markdown]
# ## Fig. 4 · RAFT
# Greedy accuracy of the policy after each RAFT iteration guided by each reward model (the oracle control
# fine-tunes on correct picks only), beside the paper's RAFT numbers after 3 iterations.

# %%
display(res.figures["fig4_raft"])
figures.raft_accuracy_table(res.raft)

# %% [markdown]
# ## Fig. 5 · paired differences
# One row per paired comparison with its 95% interval, in points: best-of-N accuracy of method A minus
# method B at the largest N on the same candidates (top), and greedy accuracy after the last RAFT iteration
# with reward model A minus B on the same problems (bottom). Rows are grouped by family (the set of tests
# in which p is Holm-adjusted, or prespecified vs post hoc); the p at the right is Holm-adjusted where the
# table has it. An interval that crosses the dashed zero line does not tell the two apart.

# %%
display(res.figures["fig5_paired_differences"])
res.paired_differences

# %% [markdown]
# ## Fig. 6 · the paper beside this run
# The quantities that both report (table `paper_vs_run`): best-of-64 accuracy per reward model, ER-PRM's gain
# over hard and soft labels, greedy accuracy and RAFT's result, in percent (gains in points). The paper used
# a 7B generator on GSM8K (1,319 problems) and MATH500 (500); this run's policy and problem counts are in the
# scale columns. The levels are not comparable across such different scales: read the gains and their signs.

# %%
display(res.figures["fig6_paper_vs_run"])
res.paper_vs_run

# %% [markdown]
# ## Summary table
# Best-of-N accuracy at N_max with 95% intervals, the paired difference ER-PRM minus each method on identical
# candidate pools, and the final RAFT accuracy; below it the setting (policy accuracy, the PRMs' training
# rollouts, the eta sweep), then the paper beside this run with the scale of each side. All of it is copied
# into README.md.

# %%
display(Markdown(res.summary_markdown))
