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
# Left: this run (95% bootstrap intervals over problems); a random pick and greedy decoding (00_policy's
# held-out accuracy, Wilson interval) are horizontal lines. Middle and right: the paper's curves
# (Mistral-MetaMath-7b generator, min aggregation, read off its figure; no intervals were published) and its
# greedy accuracy (the start policy of its RAFT table).

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
# ## Summary table
# Best-of-N accuracy at N_max with 95% intervals, the paired difference ER-PRM minus each method on identical
# candidate pools, and the final RAFT accuracy; below it the setting (policy accuracy, the PRMs' training
# rollouts, the eta sweep). Table and facts are copied into README.md.

# %%
display(Markdown(res.summary_markdown))
