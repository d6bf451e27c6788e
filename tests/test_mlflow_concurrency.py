"""Branches that register side by side (visionflow run --task-runner threads) share one
experiment: creating it and its UI tag must not race (seen in CI: sqlite's UNIQUE constraint
on experiment_tags when two register stages started together)."""
from concurrent.futures import ThreadPoolExecutor

from mlflow import MlflowClient

from visionflow.core.paths import Paths
from visionflow.integrations import mlflow as tracking


def test_many_branches_asking_for_the_experiment_at_once_get_one(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.search_experiments()  # create the store's tables before the race
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: tracking._ensure_experiment(MlflowClient(tracking_uri=uri), "shared", uri,
                                                                  Paths(tmp_path)), range(8)))
    assert len(set(ids)) == 1
    exp = client.get_experiment(ids[0])
    assert exp.name == "shared" and exp.tags["mlflow.experimentKind"] == "custom_model_development"
