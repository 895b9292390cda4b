"""The model file ``search.training.register_model`` logs (MLflow's models from code, so nothing is pickled): loading
the registered model runs it, which needs this project installed."""

from __future__ import annotations

import mlflow

from search.training import TrainedModel

mlflow.models.set_model(TrainedModel())
