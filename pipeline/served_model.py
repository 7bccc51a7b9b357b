"""The file MLflow loads as the model ("models from code"): it only declares the
pyfunc instance. Nothing in the package imports it; :func:`pipeline.serving.log_model`
logs it, and MLflow runs it when the model is loaded."""

from mlflow.models import set_model

from pipeline.serving import CellClassifier

set_model(CellClassifier())
