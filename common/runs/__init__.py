"""Runs: a launch, its planned runs (seeds, folds), what each run writes and reports, notebooks' launch settings."""
