"""A task type from outside taskserver: ``extract-keywords``, registered through the
``taskserver.tasks`` entry point (pyproject.toml), with no change to taskserver itself."""

from taskserver.platform.tasks import CPU_POOL, WARM_LANE, TaskType

TASK = TaskType(
    name="extract-keywords",
    # A module path (package.module.function): the flow is imported from the installed package.
    entrypoint="taskserver_keywords.flow.extract_keywords",
    pool=CPU_POOL,
    description="The top TF-IDF keywords of each text (scikit-learn).",
    default_lane=WARM_LANE,
    warm_capable=True,
    data_parameters=("texts", "input_path"),
    # Also small requests on the request lane (taskserver request submit extract-keywords ...).
    request_handler="taskserver_keywords.requests:HANDLER",
)
