"""ER-PRM reproducibility kit: label math, models, training, evaluation and the notebook pipeline.

The package is layered (docs/design.md "Layers"): the core modules (steps, labels, grading, io, tasks,
models, stats, evaluators, prm, training, sampler, rollouts, raft), ``generation`` (sampler backends),
``report`` (figures and summary), ``running`` (artifacts, configs, pipeline, the ``erprm`` command) and
``stages`` (one module per notebook). Import what you use from its module; this package re-exports nothing.
"""

__version__ = "0.1.0"
