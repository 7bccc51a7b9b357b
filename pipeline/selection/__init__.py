"""Model selection: patient-grouped cross-validation, sweeps as Ray Tune trials, and their reports.
Runs training and evaluation, so it sits above both."""
