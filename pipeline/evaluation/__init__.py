"""Evaluation: test-split metrics, the evaluation report, Grad-CAM, terminal summaries. Depends on
the layers below it (base, data, serving, training)."""
