"""The study's figures and summary, drawn only from tables: one style (:mod:`.style`), every figure
(:mod:`.figures`) and the Markdown summary (:mod:`.summary`). Layer 3 of docs/design.md."""
