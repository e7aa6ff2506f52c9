"""ER-PRM reproducibility kit: label math, models, training, evaluation and the notebook pipeline.

Modules (one concern each): labels, grading, steps, tasks, models, sampling, prm, training, evaluation,
raft, artifacts, pipeline, plotting. See README.md and the notebooks for how they fit together.
"""

__version__ = "0.1.0"
