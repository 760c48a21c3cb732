"""``slimtune sweep``: every combination of a grid of run-config values, resumable, with a results table and plot."""
