"""Training: the plain-PyTorch epoch code, optimisers and regimes, run storage, and the Ray Train
driver and worker. Depends on the base package, :mod:`pipeline.data` and :mod:`pipeline.serving`
(training ends in a servable model)."""
