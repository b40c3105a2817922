"""`prefect --no-prompt deploy --all` with the committed prefect.yaml, offline, as a platform team runs it."""

from __future__ import annotations

import subprocess

from platform_support import BIN, REPO, PrefectServer, base_env, run

from taskserver.platform.deployments import deployment_specs
from taskserver.platform.tasks import ALL_POOLS


async def _deployments():
    from prefect import get_client

    async with get_client() as client:
        found = {}
        for deployment in await client.read_deployments(limit=200, offset=0):
            flow = await client.read_flow(deployment.flow_id)
            found[f"{flow.name}/{deployment.name}"] = deployment
        return found


def test_deploy_all_creates_every_flow_priority_deployment(tmp_path, monkeypatch):
    server = PrefectServer(tmp_path / "server", f"sqlite+aiosqlite:///{tmp_path / 'server' / 'prefect.db'}").start()
    try:
        env = base_env(PREFECT_API_URL=server.api_url, PREFECT_HOME=str(tmp_path / "prefect-home"))
        for pool in ALL_POOLS:  # `prefect deploy` needs the pools; the bootstrap normally makes them
            subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool.name, "--type", "process"],
                           env=env, check=True, capture_output=True, timeout=120)
        done = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

        monkeypatch.setenv("PREFECT_API_URL", server.api_url)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            deployments = run(_deployments())
        specs = deployment_specs()
        assert {spec.full_name for spec in specs} <= set(deployments)
        for spec in specs:
            deployment = deployments[spec.full_name]
            assert deployment.work_pool_name == spec.pool.name, spec.full_name
            assert deployment.work_queue_name == spec.priority.work_queue
            assert deployment.job_variables == spec.job_variables
    finally:
        server.stop()
