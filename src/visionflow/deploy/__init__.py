"""From a trained model to its users: the model folder as a predictor, export with parity,
batch prediction, serving and the MLflow pyfunc model."""
