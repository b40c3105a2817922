"""A pipeline whose steps run in different processes shares nothing but the data location.

On Kubernetes each step is its own pod; here each is its own worker process with its own
working directory, taskserver home and Prefect home. Only TASKSERVER_DATA_DIR (and Prefect's
result storage inside it) is common, as the chart configures it.
"""

from __future__ import annotations

import shutil

from platform_support import run, wait_until

from taskserver.platform.client_env import RESULTS_DIRNAME, prefect_results_env
from taskserver.samples import sample_pdfs
from taskserver.search import Collection, search


async def _steps(parent_id):
    """The pipeline's child flow runs, by flow name."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    async with get_client() as client:
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])),
            limit=50, offset=0,
        )
        flows = {run.flow_id: (await client.read_flow(run.flow_id)).name for run in children}
        return {flows[run.flow_id]: run for run in children}


def test_ingest_steps_run_on_other_workers_and_hand_over_through_the_data_location(prefect_server, start_worker, tmp_path):
    from taskserver.platform.submission import status, submit

    data = tmp_path / "shared-data"
    (data / "inputs").mkdir(parents=True)
    for pdf in sample_pdfs():
        shutil.copy(pdf, data / "inputs" / pdf.name)
    # One slot each: the pipeline run holds one worker, so every step must run on the other.
    for name in ("a", "b"):
        own = tmp_path / f"worker-{name}"
        own.mkdir()
        env = {"TASKSERVER_HOME": str(own / "home"), "PREFECT_HOME": str(own / "prefect-home"),
               "TASKSERVER_DATA_DIR": str(data), **prefect_results_env(str(data))}
        start_worker("cpu", slots=1, env=env, cwd=own)

    run_id = submit("ingest-documents", "normal",
                    {"inputs": "inputs", "output_dir": "collections/samples", "steps_as_runs": True})
    wait_until(lambda: status(run_id).is_final, timeout=900, what="the pipeline run to finish", interval=2)

    final = status(run_id)
    assert final.state_type == "COMPLETED", final.message
    steps = run(_steps(run_id))
    assert set(steps) == {"process-pdfs", "encode", "cluster"}
    for name, step in steps.items():
        assert step.state.is_completed(), f"{name}: {step.state.message}"
        assert step.deployment_id is not None, f"{name} ran in-process, not as its own deployment run"
        assert step.work_queue_name == "normal"  # the pipeline's own priority
    # Relative paths resolved against the shared location, in every process alike.
    collection = Collection(str(data / "collections" / "samples"))
    assert len(collection.chunks()) > 3
    assert search(collection.location, "how does training survive preemption?", k=1)[0].source.endswith(
        "gpu-scheduling.pdf")
    assert (data / RESULTS_DIRNAME).is_dir()
