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
# # 00 · The policy
#
# Every later stage needs problems and a policy $\pi_0$ that solves them step by step: its samples are the
# candidates that the PRMs rank (best-of-N), its completions give the Monte Carlo labels
#
# $$r(a^{[l]}, x) = \frac{1}{\eta} \ln \mathbb{E}_{\pi_0(\cdot \mid x, a^{[l]})}\big[e^{\eta\, r(a, x)}\big],$$
#
# and RAFT fine-tunes it. For the ranking to matter the policy must be imperfect in an interesting way:
# greedy accuracy well below pass@$k$, the share of problems that at least one of $k$ samples solves.
#
# The embedded default (`policy_name = ""`) is a small Llama model trained from scratch on the synthetic
# task `arith`: GSM8K-style word problems with 2-6 dependent steps, one step per line, the last line
# `The answer is: N`. A word-level tokenizer holds every word and every number as one token. Paper profiles
# set `policy_name` to a hub model (e.g. Mistral-MetaMath-7b): nothing is trained, the name is recorded.
#
# Knobs: the split sizes, the difficulty (`min_steps`, `max_steps`, `max_value`, `max_operand`,
# `max_factor`), the model size, the SFT recipe, and the evaluation (`n_samples` per problem for pass@k).

# %%
import matplotlib.pyplot as plt
import pandas as pd

from erprm_core import artifacts, numerics, plotting, tasks, training

# %% tags=["parameters"]
profile: str = "smoke"  # results/<profile> and runs/<profile> folders to use
seed: int = 0  # seed of the problem generator, model initialisation, training and sampling
task: str = "arith"  # problem source: arith (generated), gsm8k or math (hub or local JSONL)
source: str = ""  # gsm8k/math only: local JSONL file or folder (empty: the hub dataset)
n_train_sft: int = 3200  # problems for the policy's supervised fine-tuning (train side)
n_train_prm: int = 16  # problems whose rollouts label the PRM training data (train side, 01_rollouts)
n_raft: int = 32  # RAFT prompts (train side, 05_rlhf_raft)
n_test: int = 40  # held-out test problems (best-of-N, RAFT evaluation, this notebook's evaluation)
min_steps: int = 2  # arith: fewest arithmetic steps per problem
max_steps: int = 4  # arith: most arithmetic steps per problem
max_value: int = 99  # arith: bound of every number (operands, intermediates, answers); tokenizer range
max_operand: int = 10  # arith: bound of the numbers added or subtracted
max_factor: int = 5  # arith: bound of the multipliers and divisors
policy_name: str = ""  # empty: train the tiny policy from scratch; else a hub name or folder to load
hidden_size: int = 64  # tiny model width
num_layers: int = 2  # tiny model depth (decoder layers)
num_heads: int = 4  # attention heads
intermediate_size: int = 128  # MLP width
max_position_embeddings: int = 384  # longest sequence (prompt + solution) in tokens
epochs: float = 1.0  # passes over the SFT problems
train_steps: int = -1  # optimizer steps (overrides epochs when > 0)
lr: float = 0.01  # peak learning rate (cosine schedule)
batch_size: int = 16  # sequences per optimizer step
warmup_ratio: float = 0.03  # share of steps for linear warm-up
n_samples: int = 4  # samples per problem at temperature 1.0 for pass@k (k in 1, 4, 16, 64 up to n_samples)
n_passk_problems: int = 16  # test problems used for pass@k (the first ones)
temperature: float = 1.0  # sampling temperature for pass@k
max_new_tokens: int = 128  # token limit of a generated solution
eval_batch_size: int = 64  # sequences per generation batch
backend: str = "hf"  # sampling backend: hf (CPU/GPU) or vllm (optional extra, GPU)
prompt_template: str = "plain"  # policy prompt format: plain (tiny policy) or metamath
device: str = "auto"  # auto, cpu or cuda
dtype: str = "auto"  # auto (bf16 on a GPU that has it, else float32), float32, bfloat16
torch_threads: int = 0  # CPU threads for torch (0: auto, the cores idle at the start)
cpu_numerics: str = "avx2"  # CPU kernel paths: avx2 (pinned, same bits on any x86-64) or default

# %%
P = artifacts.paths(profile)  # the first stage: nothing upstream to check
numerics_info = numerics.configure(cpu_numerics, torch_threads)  # first: before any tensor operation
torch_threads = numerics_info["torch_threads"]
sizes = {"train_sft": n_train_sft, "train_prm": n_train_prm, "raft": n_raft, "test": n_test}
if policy_name:
    sizes.pop("train_sft")  # a hub policy is not fine-tuned here
generator = dict(min_steps=min_steps, max_steps=max_steps, max_value=max_value, max_operand=max_operand,
                 max_factor=max_factor)  # fmt: skip
ks = [k for k in (1, 4, 16, 64) if k <= n_samples]
sizes

# %% [markdown]
# ## Problems
# Train-side splits are disjoint slices of one seeded stream; the test side is decided by a hash of each
# problem's arithmetic (start value, operations, operands), so no computation appears on both sides.

# %%
problems, split_summary = tasks.write_problem_splits(profile, task, sizes, seed=seed, source=source or None,
                                                     generator=generator)  # fmt: skip
example = problems["test"][0]
print(example["question"] + "\n" + example["solution"])
split_summary

# %% [markdown]
# ## Training (or loading) the policy
# Supervised fine-tuning with the loss on the solution tokens only (prompt tokens masked), EOS appended.
# The trained model is saved with `save_pretrained` and loaded back through the same loader as a hub model.

# %%
result = training.prepare_policy(
    profile, problems.get("train_sft"), policy_name=policy_name, seed=seed, max_number=max_value,
    hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, intermediate_size=intermediate_size,
    max_position_embeddings=max_position_embeddings, epochs=epochs, max_steps=train_steps, lr=lr,
    batch_size=batch_size, warmup_ratio=warmup_ratio, device=device, dtype=dtype, prompt_template=prompt_template,
)  # fmt: skip
pd.Series(result.info)

# %%
artifacts.write_table(result.log[["step", "epoch", "loss", "learning_rate"]], profile, "policy_training")
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(result.log["step"], result.log["loss"], color="black")
ax.set(xlabel="optimizer step", ylabel="loss (solution tokens)", yscale="log", title="Policy SFT")
plotting.save_figure(fig, P.figures, "policy_training")

# %% [markdown]
# ## Evaluation on held-out problems
# Greedy accuracy with a 95% Wilson interval; pass@$k$ at temperature 1.0 from `n_samples` samples per
# problem with the unbiased estimator $1 - \binom{n-c}{k} / \binom{n}{k}$ ($c$ correct of $n$) and a
# bootstrap 95% interval over problems. The gap between greedy and pass@$k$ is what reranking can recover.

# %%
evaluation = training.evaluate_policy(
    result.model, result.tokenizer, problems["test"], n_samples=n_samples, ks=ks,
    n_sample_problems=n_passk_problems, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
    batch_size=eval_batch_size, prompt_template=prompt_template, backend=backend,
)  # fmt: skip
artifacts.write_table(evaluation.table, profile, "policy_eval")
evaluation.table

# %%
by_steps = evaluation.by_steps
artifacts.write_table(by_steps, profile, "policy_accuracy_by_steps")
passk = evaluation.table[evaluation.table["metric"] == "pass_at_k"]
greedy = evaluation.table[evaluation.table["metric"] == "greedy_accuracy"].iloc[0]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
ax1.errorbar(by_steps["n_steps"], by_steps["accuracy"], yerr=[by_steps["accuracy"] - by_steps["ci_low"],
             by_steps["ci_high"] - by_steps["accuracy"]], marker="o", color="black", capsize=3)  # fmt: skip
ax1.set(xlabel="arithmetic steps", ylabel="greedy accuracy", ylim=(0, 1), title="Accuracy by number of steps")
ax2.fill_between(
    passk["k"], passk["ci_low"], passk["ci_high"], alpha=0.2, color=plotting.BASE_COLOURS["oracle"]
)
ax2.plot(passk["k"], passk["value"], marker="o", color=plotting.BASE_COLOURS["oracle"], label="pass@k (T=1)")
ax2.axhline(greedy["value"], ls="--", color="black", label="greedy")
ax2.set(xscale="log", xlabel="k", ylabel="accuracy", ylim=(0, 1), title="pass@k")
ax2.legend()
plotting.save_figure(fig, P.figures, "policy_accuracy")

# %% [markdown]
# ## A few sampled solutions

# %%
with pd.option_context("display.max_colwidth", 300):
    display(training.sample_examples(problems["test"], evaluation.samples, n_problems=3, per_problem=2))  # noqa: F821

# %%
manifest = artifacts.update_manifest(profile, "00_policy", seed=seed, task=task, split_sizes=sizes, torch_threads=torch_threads, numerics=numerics_info,
                                     split_checksums=dict(zip(split_summary["split"], split_summary["sha1"], strict=True)),
                                     eval_generated_tokens=evaluation.generated_tokens, **result.info)  # fmt: skip
