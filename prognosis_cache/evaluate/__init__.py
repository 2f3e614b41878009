"""Evaluate features from the cache: patient-grouped splits, batched solvers, metrics and the probe engine."""
