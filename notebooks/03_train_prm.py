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
# # 03 · Train the process reward models
#
# One PRM per label rule (ER for every $\eta$ of the grid, soft, hard, and the outcome reward model), all
# from the same base model with the same recipe and seed: only the labels differ, so any difference
# downstream is the label rule's. A PRM is a plain causal LM reading
# `question + " " + step_1 + " ки" + step_2 + " ки" ...`; at each step tag $l$ it predicts
#
# $$s_l = \mathrm{softmax}\big(z_{+}, z_{-}\big)_0 , \qquad
# \mathcal{L} = -\sum_{l\ \text{labelled}} \big[\, y_l \log s_l + (1 - y_l) \log (1 - s_l) \,\big]$$
#
# with $z_\pm$ the logits of the tokens " +" / " -" at the tag and $y_l \in [0, 1]$ the step's label
# (soft targets stay float; the ORM labels only the last step). The same code decides the tag positions
# for training and scoring, and every sample whose tags do not line up, or whose labels were cut by
# `max_length`, is counted in the audit.
#
# Knobs: `rules` ("all" or a comma list), `base_model` ("" = the 00_policy checkpoint, or a hub name at
# paper scale), the recipe (`epochs`, `lr`, `batch_size`, `max_length`, ...; the paper: 1 epoch, lr 5e-7,
# batch 64, block 512), `heldout_fraction` (problems kept out of training for the checks below) and
# `scoring` (two-token softmax, or the full-vocabulary softmax some published numbers use). For multi-GPU
# training run `configs/accelerate/README.md`'s `accelerate launch` command first: this notebook then finds
# the finished checkpoints, skips their training and evaluates them.

# %%
from IPython.display import Markdown

from erprm_core import labels
from erprm_core.report import figures, findings, style
from erprm_core.running import artifacts
from erprm_core.stages import train_prm

# %% tags=["parameters"]
profile: str = "smoke"  # results/<profile> and runs/<profile> folders to use
seed: int = 0  # training seed, the same for every rule
rules: str = "all"  # label rules to train: "all" (every rule in the labels file) or a comma list, e.g. "er_1,soft,hard,orm"
base_model: str = ""  # base of every PRM: empty for the 00_policy checkpoint, else a hub name or local folder
heldout_fraction: float = 0.2  # share of problems (by id hash) kept out of training for the held-out checks
epochs: float = 2.0  # training epochs per PRM (the paper: 1)
lr: float = 1e-3  # peak learning rate (the paper: 5e-7 for an 8B model)
batch_size: int = 8  # sequences per device per optimizer step
grad_accum: int = 1  # gradient accumulation steps (global batch: batch_size x grad_accum x devices)
max_length: int = 256  # token limit of a formatted solution; tags beyond it lose their label (audited)
lr_scheduler: str = "cosine"  # learning-rate schedule (transformers name)
warmup_ratio: float = 0.0  # share of the steps used for linear warm-up
weight_decay: float = 0.0  # AdamW weight decay
gradient_checkpointing: bool = False  # recompute activations to save memory (multi-GPU runs)
dtype: str = "float32"  # weights dtype of the base model during training
retrain: bool = False  # retrain rules whose checkpoint is already complete
scoring: str = "two_token"  # held-out step score: two_token (softmax over " +"/" -") or full_vocab
score_batch_size: int = 32  # solutions per scoring forward pass
device: str = "auto"  # device for held-out scoring: auto, cpu or cuda (training: the Trainer's choice)
torch_threads: int = 0  # CPU threads for torch (0: auto, the cores idle at the start)
cpu_numerics: str = "portable"  # CPU kernel paths: portable (pinned: the same bits on any x86-64 CPU with AVX2) or default

# %%
config = train_prm.TrainPRMConfig.from_namespace(globals())
P = artifacts.paths(profile)
config.recipe()

# %% [markdown]
# ## Training, one PRM per rule
# Rules whose checkpoint in `runs/<profile>/prms/<rule>` is complete are skipped (their stored curves are
# reused) unless `retrain`. Held-out problems never reach training. The table also shows the token ids of
# the step tag and of " +" / " -", each checked to be one token in context (else training stops with an
# error naming the tokenizer and the token).

# %%
res = train_prm.run(config)  # names the stage to run when an input is missing; pins the CPU numerics first
res.runs.drop(columns=["train_runtime_s", "tokens_per_s"])

# %% [markdown]
# ## Audit: every training sample by reason
# `kept`; `truncated` (kept, some labels cut by `max_length`; `labels_lost` counts those labels);
# `truncated_no_label_left`, `tag_count_mismatch` (step tags in the text are not one per step),
# `label_count_mismatch`, `empty` are skipped. Counts per rule (the ORM has one label per solution).

# %% tags=["nbval-check-output"]
res.audit.pivot_table(index="reason", columns="rule", values="count", aggfunc="sum", fill_value=0)

# %% [markdown]
# ## Training curves
# Each rule's loss minus its floor (the mean binary entropy of its labels: a soft target's cross-entropy
# cannot reach 0, a hard one's can), so the rules compare on one axis; the open circle at the end is the same
# quantity on the held-out problems.

# %%
style.shown(figures.figure_training_curves(res.log, 5, res.metrics), P.figures, "prm_training_curves")

# %% [markdown]
# ## Held-out checks
# On the held-out problems' rollouts: `brier` / `ece` of the step scores against the rule's own labels
# (how well each PRM learned what it was taught), `auroc_last` / `auroc_min` (does the last / the minimum
# step score separate correct from incorrect solutions), and `argmin_at_first_dead_step` (for incorrect
# solutions: the lowest-scored step is the first one after which no completion reached the answer).

# %%
metrics = res.metrics.pivot_table(index="rule", columns="metric", values="value")
metrics.loc[labels.method_order(metrics.index)]

# %% [markdown]
# ## Against the ground truth: first wrong step and ranking within a problem
# Task `arith` only, on the same held-out problems (which 04 never sees). `first_error_f1`: ProcessBench's
# metric on this task ("synthetic twin" of ProcessBench): the PRM's prediction is its first step scored below
# the threshold (-1 if none), `error_acc` the share of solutions with a wrong step whose first wrong step it
# names exactly, `correct_acc` the share of all-right solutions it passes, F1 their harmonic mean; at the
# paper's threshold 0.5 and at each rule's own threshold chosen here for the best F1 (`threshold_source`
# `validation`; the mean label rises with eta, so one fixed threshold favours the sharper rules), which 07
# applies to the test pool. Intervals resample whole problems (a problem's solutions are not independent).
# `within_problem_pairwise`: for pairs of one correct and one wrong solution of the same problem, the share
# where the rule's headline aggregation (min; the ORM: last) ranks the correct one higher, ties half,
# averaged over problems with both outcomes (bootstrap interval over problems; 0.5 = chance). Table `prm_truth`; the values are also rows of `prm_eval`.

# %%
if res.truth is not None:
    display(res.truth.round(3))  # noqa: F821
    display(style.shown(figures.figure_first_error(res.truth), P.figures, "prm_first_error"))  # noqa: F821
else:
    print("no step-level ground truth for this task (arith only): prm_truth skipped")

# %% [markdown]
# ## Calibration
# Mean step score against mean label per score bin (diagonal = calibrated against its own rule). ER labels
# sit above the soft ones for $\eta > 0$, so a well-trained ER-PRM is calibrated to its tilted target, not to
# the raw success rate.

# %%
style.shown(figures.figure_calibration(res.calibration), P.figures, "prm_calibration")

# %% [markdown]
# ## Where the minimum step score falls
# With `min` aggregation the lowest step decides a solution's score. For incorrect solutions a useful PRM
# puts it where the reasoning breaks; for correct ones it should not matter much.

# %%
style.shown(figures.figure_min_position(res.min_position), P.figures, "prm_min_position")

# %% [markdown]
# ## What this run shows
# Sentences generated from the tables this notebook wrote, so they hold for this run and profile (a claim
# that goes against the paper links to the research log); then one line on what ran, with the full record a
# link.

# %%
closing = findings.prm_findings(res.truth)
Markdown(closing + "\n" + artifacts.run_line(profile, "03_train_prm"))
