"""`visionflow schedule` / prefect.yaml: the deployment and its schedule, read back from a
real (temporary) Prefect server."""
import asyncio
from pathlib import Path

import pytest
import yaml

from visionflow.integrations.prefect import build_deployment, load_flow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_deployment_with_cron_schedule_round_trips(prefect_server):
    from prefect.client.orchestration import get_client

    deployment = build_deployment(REPO / "params.yaml", cron="15 3 * * 1", name="nightly-test")
    deployment_id = deployment.apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    stored = asyncio.run(read())
    assert stored.name == "nightly-test"
    assert stored.parameters == {"params_file": str(REPO / "params.yaml")}
    assert [s.schedule.cron for s in stored.schedules] == ["15 3 * * 1"]
    assert all(s.active for s in stored.schedules)


def test_prefect_yaml_points_at_the_flow():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    path, _, name = dep["entrypoint"].partition(":")
    assert (REPO / path).exists() and name == "pipeline"
    assert load_flow(REPO).name == "visionflow-pipeline"
    assert dep["schedules"][0]["cron"] == "0 3 * * *"
    assert dep["parameters"] == {"params_file": "params.yaml"}
