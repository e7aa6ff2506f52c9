"""Research drivers: each logged number of docs/research-tiny-regime.md is rerun by one of these modules."""
