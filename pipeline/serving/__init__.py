"""Serving: the checkpoint and predictor, the MLflow pyfunc and its contract, the Model Registry
and batch scoring. Depends on the base package and :mod:`pipeline.data`."""
