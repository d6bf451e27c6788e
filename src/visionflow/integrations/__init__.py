"""The only modules that import the services: mlflow (tracking and registry), fiftyone (the App),
prefect (the flow's runner), and dvc.yaml's generation with its derived code deps."""
