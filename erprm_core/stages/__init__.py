"""One module per notebook (stage): each declares its knobs once in a Config dataclass and has one ``run``.

The notebook ``notebooks/NN_name.ipynb`` builds ``<Name>Config`` from its parameters cell and calls
``run(config)``; the stage checks its upstream artifacts, computes, writes its tables and records
``asdict(config)`` plus its statistics in the manifest. :data:`STAGE_MODULES` names the module of each stage
(names only: importing this package imports no stage and no heavy dependency).
"""

STAGE_MODULES = {
    "00_policy": "erprm_core.stages.policy",
    "01_rollouts": "erprm_core.stages.rollouts",
    "02_labels": "erprm_core.stages.labels",
    "03_train_prm": "erprm_core.stages.train_prm",
    "04_best_of_n": "erprm_core.stages.best_of_n",
    "05_rlhf_raft": "erprm_core.stages.raft",
    "06_figures": "erprm_core.stages.figures",
    "07_processbench": "erprm_core.stages.processbench",
}
"""Stage name (the notebook's file name) -> the module that holds its Config and run()."""
