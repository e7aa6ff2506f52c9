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
# # 07 · Does the PRM find the first wrong step? (ProcessBench)
#
# Best-of-N (04) asks whether a PRM picks good answers; a *process* reward model should also say where the
# reasoning breaks. ProcessBench (Zheng et al. 2024, arXiv 2412.06559) measures exactly that: the PRM's
# prediction is its first step scored below a threshold $\tau$ (0.5), or $-1$ when no step is,
#
# $$\hat e = \min\{\, l : \mathrm{PRM}(x, y^{[l]}) < \tau \,\} , \qquad
# \mathrm{F1} = \frac{2\, \mathrm{acc}_{err}\, \mathrm{acc}_{ok}}{\mathrm{acc}_{err} + \mathrm{acc}_{ok}} ,$$
#
# with $\mathrm{acc}_{err}$ the share of solutions with a wrong step whose first wrong step $\hat e$ names
# exactly, and $\mathrm{acc}_{ok}$ the share of all-right solutions it passes ($\hat e = -1$).
#
# `benchmark: synthetic` (tiny, smoke) runs the same metric on the 04 pool of the synthetic task, whose every
# step has a ground truth (the true intermediate values are known): no model runs, the scores are 04's.
# `benchmark: processbench` (paper profiles) scores the real benchmark with every PRM of 03 and with released
# checkpoints pinned to a revision (`released_prms: name@revision`), resumable per PRM and split; the same code
# is the `erprm processbench` command.

# %%
from IPython.display import Markdown

from erprm_core.report import figures, findings, style
from erprm_core.running import artifacts
from erprm_core.stages import processbench

# %% tags=["parameters"]
profile: str = "smoke"  # results/<profile> and runs/<profile> folders to use
benchmark: str = "synthetic"  # synthetic (the arith twin on the 04 pool, no model runs) or processbench (the real benchmark)
rules: str = "all"  # PRMs of 03 to evaluate: "all" or a comma list of rules
released_prms: str = ""  # processbench only: comma list of released PRMs as hub name@revision (or local folders)
data: str = "hub"  # processbench only: "hub" (Qwen/ProcessBench) or a folder of <split>.json files
data_revision: str = ""  # processbench only: hub revision of the data set (empty: the default branch)
splits: str = "gsm8k,math,olympiadbench,omnimath"  # processbench only: comma list of splits
limit: int = 0  # processbench only: score the first N records of each split (0: all)
threshold: float = 0.5  # a step scored below it is the predicted first error (ProcessBench's protocol)
batch_size: int = 8  # processbench only: solutions per scoring forward pass
max_length: int = 0  # processbench only: token limit of a formatted solution (0: the model's)
scoring: str = "two_token"  # processbench only: two_token (softmax over " +"/" -") or full_vocab
device: str = "auto"  # processbench only: auto, cpu or cuda
dtype: str = "auto"  # processbench only: weights dtype for scoring (auto: bf16 on a GPU that has it)
n_boot: int = 2000  # bootstrap resamples of each F1 interval
seed: int = 0  # seed of the bootstrap
torch_threads: int = 0  # CPU threads for torch (0: auto)
cpu_numerics: str = "portable"  # CPU kernel paths: portable (pinned: the same bits on any x86-64 CPU with AVX2) or default

# %%
config = processbench.ProcessBenchConfig.from_namespace(globals())
res = processbench.run(config)  # names the stage to run when an input is missing; pins the CPU numerics first

# %% [markdown]
# ## First-error F1 per PRM
# One row per PRM and split; `f1_low` / `f1_high` is a 95% bootstrap interval (synthetic: over problems, since
# a problem's candidates are not independent; ProcessBench: over records). `n_excluded` counts solutions whose
# prediction hinges on a step the PRM could not score (cut by its length limit): left out, never dropped
# silently.

# %%
res.table.round(3)

# %% [markdown]
# ### Two views of the synthetic benchmark, two thresholds
# `distinct`: each distinct solution once (mostly wrong ones: duplicates are the easy right answers);
# `pool`: each candidate as often as it occurs in 04's pool, the mix a PRM is used on. `paper`: threshold
# 0.5; `validation`: each rule's threshold chosen on 03's held-out problems (never on this pool).
# `step_auroc`: how well the step scores separate right from wrong steps, with no threshold at all.

# %%
if res.table["view"].nunique() > 1:  # the synthetic twin (the real benchmark has one view per split)
    display(res.table.pivot_table(index="prm", columns=["view", "threshold_source"], values="f1").round(3))  # noqa: F821
    display(res.table.drop_duplicates(["prm", "view"]).pivot_table(index="prm", columns="view",  # noqa: F821
                                                                   values="step_auroc").round(3))  # fmt: skip

# %% [markdown]
# ## F1 against the threshold
# The published protocol fixes $\tau = 0.5$ (dotted line); a PRM trained on soft or ER labels is calibrated
# to a different target than the hard-label one, so the best threshold can differ by rule.

# %%
fig = figures.figure_processbench_sweep(res.sweep, threshold, "First-error F1", by="prm")
style.shown(fig, artifacts.paths(profile).figures, "step_eval_sweep")

# %% [markdown]
# ## Which errors does each PRM find? (synthetic benchmark)
# Per ground-truth error type: the share of solutions whose first wrong step the PRM names exactly (`none`:
# the share of all-right solutions it passes), with Wilson 95% intervals. A wrongly copied operand keeps the
# arithmetic of its step consistent, so only a PRM that checks the step against the question can see it.

# %%
if len(res.by_type):
    display(res.by_type.pivot_table(index="error_type", columns="prm", values="accuracy").round(3))  # noqa: F821
else:
    print("the real benchmark has no error types")

# %% [markdown]
# ## What this run shows
# Sentences generated from the tables this notebook wrote, so they hold for this run and profile (a claim
# that goes against the paper links to the research log); then one line on what ran, with the full record a
# link.

# %%
closing = findings.step_eval_findings(res.table)
Markdown(closing + "\n" + artifacts.run_line(profile, "07_processbench"))
