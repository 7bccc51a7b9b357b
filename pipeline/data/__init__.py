"""Data: fetching archives, reading datasets, patient-grouped splits, the prepared-data layout and
the augmentation policy. Depends only on the base package."""
