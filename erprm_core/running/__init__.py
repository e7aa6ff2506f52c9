"""Running the study: profile paths and artifacts, configs, machine setup, the papermill pipeline, the dry
run, the cost model and the ``erprm`` command (layers 4 and 6 of docs/design.md)."""
