"""Bring any Prefect API to the platform's declared state: pools, priority queues, deployments,
the zombie-run automation and, optionally, webhook notifications. Idempotent: a second run
changes nothing and says so.

Every name and number comes from ``priorities.py``, ``tasks.py`` and ``deployments.py``.
Each pool's built-in ``default`` queue cannot be deleted, so it is kept and given the priority
after the last level: runs sent there by hand still execute, but after all platform work.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import (
    DeploymentScheduleCreate,
    WorkPoolCreate,
    WorkPoolUpdate,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.schedules import CronSchedule
from prefect.blocks.webhook import Webhook
from prefect.events.actions import CallWebhook, ChangeFlowRunState
from prefect.events.schemas.automations import Automation, AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectNotFound

from taskserver.errors import InvalidInputError, ParameterError, RegistrationError
from taskserver.platform.deployments import (
    ZOMBIE_WINDOW_SECONDS,
    DeploymentSpec,
    code_dir,
    deployment_specs,
    pull_steps,
)
from taskserver.platform.priorities import PRIORITIES
from taskserver.platform.queue_order import UNKNOWN_QUEUE_PRIORITY, read_queues
from taskserver.platform.registration import parameter_schema, verify
from taskserver.platform.containers import EXTRA_HINT, IMAGE_CODE_DIR
from taskserver.platform.tasks import (
    ALL_POOLS, CONTAINER_WORKER_TYPE, PROCESS_WORKER_TYPE, Pool, TaskType, catalogue, is_module_entrypoint,
)
from taskserver.settings import env_name, get_settings

DEFAULT_QUEUE = "default"
DEFAULT_QUEUE_PRIORITY = UNKNOWN_QUEUE_PRIORITY
"""Prefect's ``default`` queue is outside the model: after every level, as the workers order it."""
DEFAULT_QUEUE_DESCRIPTION = (
    "Prefect's own queue, which every pool has; no taskserver deployment uses it, so it stays "
    "empty and comes after every priority. To choose a priority, run the deployment named after it."
)
ZOMBIE_AUTOMATION = "taskserver: crash zombie flows"
POOL_LIMITS_ENV = env_name("pool_limits")
QUEUE_LIMITS_ENV = env_name("queue_limits")
NOTIFY_BLOCK = "taskserver-notify"
NOTIFY_FAILURE_AUTOMATION = "taskserver: notify on failure"
NOTIFY_COMPLETION_AUTOMATION = "taskserver: notify on completion"
NOTIFY_FAILURE_EVENTS = ("prefect.flow-run.Failed", "prefect.flow-run.Crashed")
NOTIFY_COMPLETION_EVENT = "prefect.flow-run.Completed"
# Rendered by the server's Jinja sandbox for each event; `tojson` keeps quotes in messages valid.
# Ad-hoc runs have no deployment, hence the guard.
NOTIFY_PAYLOAD = """{
  "source": "taskserver",
  "event": {{ event.event | tojson }},
  "state": {{ event.resource.get("prefect.state-name") | tojson }},
  "message": {{ event.resource.get("prefect.state-message", "") | tojson }},
  "flow_run": {"id": {{ flow_run.id | string | tojson }}, "name": {{ flow_run.name | tojson }}},
  "flow": {{ flow.name | default(none) | tojson }},
  "deployment": {% if deployment %}{{ (flow.name ~ "/" ~ deployment.name) | tojson }}{% else %}null{% endif %},
  "occurred": {{ event.occurred | string | tojson }}
}"""


@dataclass
class Limits:
    """Concurrency limits: ``pool`` by pool name, ``queue`` by ``"<pool>/<priority>"``. None = unlimited."""

    pool: dict[str, int | None] = field(default_factory=dict)
    queue: dict[str, int | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, pool_items: list[str] = (), queue_items: list[str] = ()) -> "Limits":
        """Parse ``cpu=4`` and ``cpu/low=2`` items (CLI flags or comma-separated env values)."""
        pools = {p.name for p in ALL_POOLS}
        queues = {f"{p.name}/{level.name}" for p in ALL_POOLS for level in PRIORITIES}
        return cls(
            pool=_parse_items(pool_items, pools, "pool limit"),
            queue=_parse_items(queue_items, queues, "queue limit"),
        )

    @classmethod
    def from_env(cls) -> "Limits":
        settings = get_settings()
        return cls.parse(settings.pool_limits, settings.queue_limits)


def _parse_items(items: list[str], allowed: set[str], what: str) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for item in items:
        key, sep, value = item.strip().partition("=")
        if not sep or key not in allowed:
            raise ParameterError(f"{what} {item!r}", f"expected NAME=N with NAME one of {sorted(allowed)}")
        if value.strip().lower() in ("", "none", "unlimited"):
            out[key] = None
            continue
        try:
            number = int(value)
        except ValueError:
            number = -1
        if number < 0:
            raise ParameterError(f"{what} {item!r}", "the limit must be a whole number >= 0, or 'none'")
        out[key] = number
    return out


def redact_url(url: str) -> str:
    """Scheme and host only: webhook URLs carry their credentials in the path or query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}/…" if parts.scheme and parts.hostname else "<webhook URL>"


@dataclass
class Notifications:
    """Where failures (and chosen deployments' completions) are announced. Empty URL = none.

    ``completed`` holds deployment names ``<flow>/<priority>``. ``webhook_url`` is a secret and
    stays out of ``repr``.
    """

    webhook_url: str = field(default="", repr=False)
    completed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.webhook_url = self.webhook_url.strip()
        self.completed = sorted({name.strip() for name in self.completed if name.strip()})
        if self.webhook_url:
            parts = urlsplit(self.webhook_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ParameterError(
                    f"notify webhook URL {redact_url(self.webhook_url)}",
                    "expected an http:// or https:// URL with a host",
                    "set TASKSERVER_NOTIFY_WEBHOOK_URL or --notify-webhook",
                )
        elif self.completed:
            raise ParameterError(
                f"notify completed {self.completed}", "completion notifications need a webhook URL",
                "set TASKSERVER_NOTIFY_WEBHOOK_URL or --notify-webhook",
            )

    @classmethod
    def from_settings(cls, webhook_url: str | None = None, completed: list[str] | None = None) -> "Notifications":
        """The settings object's values; non-empty arguments (CLI flags) override them."""
        settings = get_settings()
        return cls(
            webhook_url=webhook_url or settings.notify_webhook_url.get_secret_value(),
            completed=list(completed) if completed else list(settings.notify_completed),
        )


@dataclass
class BootstrapReport:
    changes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def summary(self) -> str:
        lines = [f"changed: {c}" for c in self.changes] or ["no changes: already up to date"]
        lines += [f"skipped: {s}" for s in self.skipped]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def notification_automations(block_document_id: Any, completed_deployment_ids: list[str]) -> list[AutomationCore]:
    """The failure automation, plus the completion one when deployments were chosen."""
    webhook = CallWebhook(block_document_id=block_document_id, payload=NOTIFY_PAYLOAD)
    wanted = [
        AutomationCore(
            name=NOTIFY_FAILURE_AUTOMATION,
            description="Calls the taskserver webhook when any flow run fails or crashes.",
            enabled=True,
            trigger=EventTrigger(
                expect=set(NOTIFY_FAILURE_EVENTS),
                match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
                for_each={"prefect.resource.id"},
                posture=Posture.Reactive,
                threshold=1,
                within=timedelta(0),
            ),
            actions=[webhook],
        )
    ]
    if completed_deployment_ids:
        wanted.append(
            AutomationCore(
                name=NOTIFY_COMPLETION_AUTOMATION,
                description="Calls the taskserver webhook when a run of a chosen deployment completes.",
                enabled=True,
                trigger=EventTrigger(
                    expect={NOTIFY_COMPLETION_EVENT},
                    match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
                    match_related=ResourceSpecification({
                        "prefect.resource.role": "deployment",
                        "prefect.resource.id": sorted(f"prefect.deployment.{i}" for i in completed_deployment_ids),
                    }),
                    for_each={"prefect.resource.id"},
                    posture=Posture.Reactive,
                    threshold=1,
                    within=timedelta(0),
                ),
                actions=[webhook],
            )
        )
    return wanted


def base_job_template_for(pool: Pool, pool_type: str) -> dict[str, Any]:
    """The pool's base job template: the Kubernetes engineer's generator, else the worker's default."""
    if pool_type == "kubernetes":
        try:
            from taskserver.platform.kubernetes import base_job_template  # type: ignore[attr-defined]
        except ImportError:
            base_job_template = None
        if base_job_template is not None:
            return base_job_template(pool)
        from prefect_kubernetes.worker import KubernetesWorker

        return KubernetesWorker.get_default_base_job_template()
    if pool_type == PROCESS_WORKER_TYPE:
        from taskserver.platform.worker import PriorityProcessWorker

        return PriorityProcessWorker.get_default_base_job_template()
    if pool_type == CONTAINER_WORKER_TYPE:
        try:
            from taskserver.platform.container_worker import ContainerWorker
        except ImportError as exc:
            raise InvalidInputError(f"pool type {pool_type!r}", f"needs prefect-docker ({exc})", EXTRA_HINT) from None
        return ContainerWorker.get_default_base_job_template()
    from prefect.workers.base import BaseWorker

    try:
        worker_class = BaseWorker.get_worker_class_from_type(pool_type)
    except Exception:
        worker_class = None
    if worker_class is None:
        raise InvalidInputError(f"pool type {pool_type!r}", "no worker of that type is installed")
    return worker_class.get_default_base_job_template()


def zombie_automation() -> AutomationCore:
    """Self-hosted Prefect's missing "crash zombie flows" automation (Prefect docs' definition)."""
    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description=(
            "Marks a flow run Crashed when no event (heartbeat or state change) arrives within"
            f" {ZOMBIE_WINDOW_SECONDS}s of its last heartbeat."
        ),
        enabled=True,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=ZOMBIE_WINDOW_SECONDS),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message="Flow run marked as crashed due to missing heartbeats.",
            )
        ],
    )


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _unordered(value: Any) -> Any:
    """Sort lists of strings: triggers hold sets, whose dumped order differs between processes."""
    if isinstance(value, dict):
        return {k: _unordered(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_unordered(v) for v in value]
        return sorted(items) if all(isinstance(v, str) for v in items) else items
    return value


def _automation_view(automation: AutomationCore | Automation) -> str:
    return _canonical(_unordered({
        "description": automation.description,
        "enabled": automation.enabled,
        "trigger": automation.trigger.model_dump(mode="json", exclude={"id"}),
        "actions": [x.model_dump(mode="json") for x in automation.actions],
    }))


class _Bootstrapper:
    def __init__(self, client: PrefectClient, pool_type: str, limits: Limits, directory: Path,
                 notifications: Notifications | None = None):
        self.client = client
        self.pool_type = pool_type
        self.limits = limits
        self.directory = directory
        self.notify = notifications or Notifications()
        self.report = BootstrapReport()

    def type_of(self, pool: Pool) -> str:
        """The warm pool has its own worker type everywhere; job pools take the platform's."""
        return pool.worker_type or self.pool_type

    def code_dir_of(self, pool: Pool) -> str:
        """Where a pool's runs find the code: a container's image keeps its own copy."""
        return IMAGE_CODE_DIR if self.type_of(pool) == CONTAINER_WORKER_TYPE else str(self.directory)

    async def pools(self) -> None:
        for pool in ALL_POOLS:
            pool_type = self.type_of(pool)
            template = base_job_template_for(pool, pool_type)
            limit = self.limits.pool.get(pool.name)
            try:
                current = await self.client.read_work_pool(pool.name)
            except ObjectNotFound:
                await self.client.create_work_pool(
                    WorkPoolCreate(
                        name=pool.name,
                        type=pool_type,
                        description=pool.description,
                        base_job_template=template,
                        concurrency_limit=limit,
                    )
                )
                self.report.changes.append(f"pool {pool.name}: created ({pool_type})")
                continue
            if current.type != pool_type:
                raise InvalidInputError(
                    f"pool {pool.name!r}",
                    f"exists with type {current.type!r}, not {pool_type!r}",
                    "Prefect cannot change a pool's type: delete the pool or bootstrap with its type",
                )
            update: dict[str, Any] = {}
            if _canonical(current.base_job_template) != _canonical(template):
                update["base_job_template"] = template
            if current.concurrency_limit != limit:
                update["concurrency_limit"] = limit
            if current.description != pool.description:
                update["description"] = pool.description
            if update:
                await self.client.update_work_pool(pool.name, WorkPoolUpdate(**update))
                self.report.changes.append(f"pool {pool.name}: updated {sorted(update)}")

    async def queues(self) -> None:
        for pool in ALL_POOLS:
            wanted = {
                level.work_queue: (level.queue_priority, self.limits.queue.get(f"{pool.name}/{level.name}"), level.description)
                for level in PRIORITIES
            }
            existing = {q.name: q for q in await read_queues(self.client, pool.name)}
            for name, (priority, limit, description) in wanted.items():
                if name not in existing:
                    await self.client.create_work_queue(
                        name=name, work_pool_name=pool.name, priority=priority,
                        concurrency_limit=limit, description=description,
                    )
                    self.report.changes.append(f"queue {pool.name}/{name}: created")
                    continue
                queue = existing[name]
                update: dict[str, Any] = {}
                if queue.concurrency_limit != limit:
                    update["concurrency_limit"] = limit
                if queue.description != description:
                    update["description"] = description
                if queue.is_paused:
                    update["is_paused"] = False
                if update:
                    await self.client.update_work_queue(queue.id, **update)
                    self.report.changes.append(f"queue {pool.name}/{name}: updated {sorted(update)}")
            default = existing.get(DEFAULT_QUEUE)
            if default is not None and default.description != DEFAULT_QUEUE_DESCRIPTION:
                await self.client.update_work_queue(default.id, description=DEFAULT_QUEUE_DESCRIPTION)
                self.report.changes.append(f"queue {pool.name}/{DEFAULT_QUEUE}: updated ['description']")
            wanted_priority = {name: spec[0] for name, spec in wanted.items()}
            wanted_priority[DEFAULT_QUEUE] = DEFAULT_QUEUE_PRIORITY
            await self._settle_priorities(pool, wanted_priority)

    async def _settle_priorities(self, pool: Pool, wanted: dict[str, int]) -> None:
        # Setting a taken priority shifts the holder, so set in ascending order and re-check
        # until the read-back state is exact.
        for _ in range(5):
            current = {q.name: q for q in await read_queues(self.client, pool.name)}
            wrong = [(p, n) for n, p in wanted.items() if n in current and current[n].priority != p]
            if not wrong:
                return
            for priority, name in sorted(wrong):
                await self.client.update_work_queue(current[name].id, priority=priority)
                self.report.changes.append(
                    f"queue {pool.name}/{name}: priority {current[name].priority} -> {priority}"
                )
        current = {q.name: q.priority for q in await read_queues(self.client, pool.name)}
        raise InvalidInputError(
            f"work pool {pool.name!r}", f"queue priorities did not settle: {current}, wanted {wanted}"
        )

    async def deployments(self, tasks: list[TaskType]) -> None:
        for spec in deployment_specs(tasks):
            await self._deployment(spec)

    def _schema(self, spec: DeploymentSpec) -> dict[str, Any] | None:
        """The flow's parameters; None when its file is not in this checkout (yet)."""
        if not is_module_entrypoint(spec.task.entrypoint):
            if not (self.directory / spec.task.entrypoint.rpartition(":")[0]).exists():
                return None
        return parameter_schema(spec.task, self.directory)

    async def _deployment(self, spec: DeploymentSpec) -> None:
        schema = self._schema(spec)
        if schema is None:
            self.report.skipped.append(f"{spec.full_name}: {spec.task.entrypoint} does not exist")
            return
        desired = {
            "entrypoint": spec.task.entrypoint,
            "path": self.code_dir_of(spec.pool),
            "pull_steps": pull_steps(self.code_dir_of(spec.pool)),
            "work_pool_name": spec.pool.name,
            "work_queue_name": spec.work_queue_name,
            "job_variables": spec.job_variables,
            "tags": spec.tags,
            "description": spec.description,
            "parameters": spec.parameters,
            "parameter_openapi_schema": schema,
            "enforce_parameter_schema": True,
        }
        desired_schedules = [
            {"cron": s.cron, "timezone": s.timezone, "active": s.active} for s in spec.schedules
        ]
        try:
            current = await self.client.read_deployment_by_name(spec.full_name)
        except ObjectNotFound:
            current = None
        if current is not None:
            have = {key: getattr(current, key) for key in desired}
            have_schedules = [
                {"cron": s.schedule.cron, "timezone": s.schedule.timezone, "active": s.active}
                for s in current.schedules
                if isinstance(s.schedule, CronSchedule)
            ]
            if _canonical(have) == _canonical(desired) and len(have_schedules) == len(current.schedules) \
                    and _canonical(have_schedules) == _canonical(desired_schedules):
                return
        flow_id = await self.client.create_flow_from_name(spec.flow_name)
        await self.client.create_deployment(
            flow_id=flow_id,
            name=spec.name,
            schedules=[
                DeploymentScheduleCreate(
                    schedule=CronSchedule(cron=s.cron, timezone=s.timezone), active=s.active
                )
                for s in spec.schedules
            ],
            **desired,
        )
        self.report.changes.append(f"deployment {spec.full_name}: {'updated' if current else 'created'}")

    async def automations(self) -> None:
        await self._automation(zombie_automation())

    async def _automation(self, wanted: AutomationCore) -> None:
        """Create, update or de-duplicate one automation, found by name."""
        existing = await self.client.read_automations_by_name(wanted.name)
        if not existing:
            await self.client.create_automation(wanted)
            self.report.changes.append(f"automation {wanted.name!r}: created")
            return
        first, *duplicates = existing
        for extra in duplicates:
            await self.client.delete_automation(extra.id)
            self.report.changes.append(f"automation {wanted.name!r}: removed a duplicate")
        if _automation_view(first) != _automation_view(wanted):
            await self.client.update_automation(first.id, wanted)
            self.report.changes.append(f"automation {wanted.name!r}: updated")

    async def _remove_automation(self, name: str) -> None:
        for found in await self.client.read_automations_by_name(name):
            await self.client.delete_automation(found.id)
            self.report.changes.append(f"automation {name!r}: removed (not configured)")

    def check_notified_names(self, tasks: list[TaskType]) -> None:
        """Fail before changing anything when a chosen deployment is not one the platform declares."""
        known = {spec.full_name for spec in deployment_specs(tasks)}
        unknown = [name for name in self.notify.completed if name not in known]
        if unknown:
            raise ParameterError(
                f"notify completed deployments {unknown}",
                "no such deployment; names are <flow>/<priority>",
                f"known: {', '.join(sorted(known))}",
            )

    async def notifications(self) -> None:
        """The webhook block and notification automations, or their removal.

        The configuration is the declared state: with no webhook URL configured, bootstrap deletes
        the block and both notification automations it made, so that turning notifications off
        is one setting, and no stale secret URL stays on the server. Likewise the completion
        automation goes when no deployments are chosen.
        """
        config = self.notify
        if not config.webhook_url:
            for name in (NOTIFY_FAILURE_AUTOMATION, NOTIFY_COMPLETION_AUTOMATION):
                await self._remove_automation(name)
            try:
                document = await self.client.read_block_document_by_name(NOTIFY_BLOCK, block_type_slug="webhook")
            except ObjectNotFound:
                return
            await self.client.delete_block_document(document.id)
            self.report.changes.append(f"webhook block {NOTIFY_BLOCK!r}: removed (not configured)")
            return
        block_id = await self._webhook_block(config.webhook_url)
        deployment_ids: list[str] = []
        missing: list[str] = []
        for name in config.completed:
            try:
                deployment_ids.append(str((await self.client.read_deployment_by_name(name)).id))
            except ObjectNotFound:
                missing.append(name)
        if missing:
            raise ParameterError(
                f"notify completed deployments {missing}", "not deployed on this server",
                "their flow files may be missing: see the skipped lines of the bootstrap report",
            )
        wanted = notification_automations(block_id, deployment_ids)
        for automation in wanted:
            await self._automation(automation)
        if not deployment_ids:
            await self._remove_automation(NOTIFY_COMPLETION_AUTOMATION)

    async def _webhook_block(self, url: str) -> Any:
        """Create or update the Webhook block; leave it alone when its URL and method already match."""
        shown = redact_url(url)
        try:
            document = await self.client.read_block_document_by_name(
                NOTIFY_BLOCK, block_type_slug="webhook", include_secrets=True
            )
        except ObjectNotFound:
            document = None
        if document is not None:
            stored_url = document.data.get("url")
            if hasattr(stored_url, "get_secret_value"):
                stored_url = stored_url.get_secret_value()
            if stored_url == url and document.data.get("method", "POST") == "POST":
                return document.id
        block_id = await Webhook(url=url, method="POST").asave(NOTIFY_BLOCK, overwrite=True, client=self.client)
        self.report.changes.append(
            f"webhook block {NOTIFY_BLOCK!r}: {'updated' if document else 'created'} ({shown})"
        )
        return block_id


async def bootstrap_async(
    pool_type: str = PROCESS_WORKER_TYPE,
    limits: Limits | None = None,
    extra_tasks: list[TaskType] | tuple[TaskType, ...] = (),
    directory: Path | None = None,
    client: PrefectClient | None = None,
    notifications: Notifications | None = None,
) -> BootstrapReport:
    """Create or update pools, queues, deployments and automations on the current Prefect API.

    ``notifications`` defaults to the settings (``TASKSERVER_NOTIFY_*``).
    """
    limits = limits if limits is not None else Limits.from_env()
    notifications = notifications if notifications is not None else Notifications.from_settings()
    directory = (directory or code_dir()).resolve()
    if client is None:
        async with get_client() as owned:
            return await bootstrap_async(pool_type, limits, extra_tasks, directory, owned, notifications)
    # The installed task types first, whole: a bad registration creates nothing at all.
    installed = catalogue()
    checked = verify(installed, directory)
    if checked.problems:
        raise RegistrationError.of(checked.problems)
    tasks = list(installed.tasks) + list(extra_tasks)
    work = _Bootstrapper(client, pool_type, limits, directory, notifications)
    work.report.warnings += checked.warnings
    work.check_notified_names(tasks)
    await work.pools()
    await work.queues()
    await work.deployments(tasks)
    await work.automations()
    await work.notifications()
    return work.report


def bootstrap(
    pool_type: str = PROCESS_WORKER_TYPE,
    limits: Limits | None = None,
    extra_tasks: list[TaskType] | tuple[TaskType, ...] = (),
    directory: Path | None = None,
    notifications: Notifications | None = None,
) -> BootstrapReport:
    return asyncio.run(
        bootstrap_async(pool_type, limits, extra_tasks, directory, notifications=notifications)
    )


async def platform_state(client: PrefectClient) -> dict[str, Any]:
    """A comparable snapshot of what the bootstrap manages (for tests and `taskserver bootstrap --check`)."""
    state: dict[str, Any] = {"pools": {}, "deployments": {}, "automations": []}
    for pool in ALL_POOLS:
        try:
            wp = await client.read_work_pool(pool.name)
        except ObjectNotFound:
            continue
        queues = await read_queues(client, pool.name)
        state["pools"][pool.name] = {
            "type": wp.type,
            "concurrency_limit": wp.concurrency_limit,
            "base_job_template": wp.base_job_template,
            "updated": str(wp.updated),
            "queues": {
                q.name: {"priority": q.priority, "limit": q.concurrency_limit, "paused": q.is_paused,
                         "updated": str(q.updated)}
                for q in queues
            },
        }
    for d in await client.read_deployments():
        state["deployments"][d.id.hex] = {
            "name": d.name, "flow_id": str(d.flow_id), "updated": str(d.updated),
            "queue": d.work_queue_name, "pool": d.work_pool_name,
        }
    state["automations"] = sorted(
        (a.name, str(a.id)) for a in await client.read_automations()
    )
    return state
