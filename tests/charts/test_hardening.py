"""The chart on a shared cluster: each test here is one finding of the security review of the
rendered manifests, and fails on the chart as it was before the finding was fixed.

Rendered with the real helm binary (as tests/charts/test_chart.py does); `lookup` is exercised
against kmock's in-memory Kubernetes API through `helm template --dry-run=server`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import kubernetes_validate
import pytest
from prefect.utilities.templating import apply_values

from taskserver.platform.kubernetes import PoolJobOptions, base_job_template
from taskserver.platform.priorities import PRIORITIES
from taskserver.platform.tasks import POOLS

from test_chart import CHART, HELM, KUBERNETES_VERSION, PROFILES, containers, helm, of_kind, pod_specs, render

pytestmark = pytest.mark.skipif(HELM is None, reason="helm not installed: run tests/charts/get_helm.sh")

RESTRICTED_VOLUME_KINDS = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}


def fails(*sets: str, profile: str = "default-values.yaml") -> str:
    args = ["template", "ts", str(CHART), "-n", "taskserver", "-f", str(CHART / "ci" / profile)]
    for value in sets:
        args += ["--set", value]
    result = helm(*args, check=False)
    assert result.returncode != 0, f"helm template {' '.join(sets)} rendered"
    return result.stderr


def restricted_violations(name: str, spec: dict[str, Any]) -> list[str]:
    """Pod Security Standards, `restricted` profile (kubernetes.io/docs/concepts/security/pod-security-standards)."""
    found = []
    pod_context = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            found.append(f"{name}: {key}")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_KINDS:
            found.append(f"{name}: volume {volume['name']} is {kinds}")
    if pod_context.get("seccompProfile", {}).get("type") not in {"RuntimeDefault", "Localhost"}:
        seccomp_per_container = True
    else:
        seccomp_per_container = False
    for container in spec.get("initContainers", []) + spec["containers"]:
        where = f"{name}:{container['name']}"
        context = container.get("securityContext", {})
        if context.get("privileged"):
            found.append(f"{where}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation is not false")
        if not (context.get("runAsNonRoot") or pod_context.get("runAsNonRoot")):
            found.append(f"{where}: runAsNonRoot")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            found.append(f"{where}: runAsUser 0")
        if "ALL" not in context.get("capabilities", {}).get("drop", []):
            found.append(f"{where}: capabilities not dropped")
        if set(context.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{where}: adds capabilities")
        if seccomp_per_container and context.get("seccompProfile", {}).get("type") not in {"RuntimeDefault", "Localhost"}:
            found.append(f"{where}: no seccomp profile")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{where}: hostPort")
    return found


def job_pod_specs(objects) -> list[tuple[str, dict[str, Any]]]:
    """The pod spec of each pool's flow-run Job, from the base job template the bootstrap builds."""
    (configmap,) = [c for c in of_kind(objects, "ConfigMap") if "job-options" in c["metadata"]["name"]]
    document = json.loads(configmap["data"]["job-options.json"])
    specs = []
    for pool in POOLS:
        template = base_job_template(pool, PoolJobOptions.model_validate(document[pool.name]))
        defaults = {name: variable.get("default") for name, variable in template["variables"]["properties"].items()}
        manifest = apply_values(template["job_configuration"]["job_manifest"], defaults)
        specs.append((f"job/{pool.name}", manifest["spec"]["template"]["spec"]))
    return specs


# --- 1. one credential can create any pod: a jobs namespace of their own ---------------------------


def test_jobs_run_in_their_own_namespace_labelled_restricted_by_default() -> None:
    objects = render("default-values.yaml")
    (namespace,) = of_kind(objects, "Namespace")
    assert namespace["metadata"]["name"] == "taskserver-jobs"
    labels = namespace["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
    assert namespace["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    (configmap,) = [c for c in of_kind(objects, "ConfigMap") if "job-options" in c["metadata"]["name"]]
    assert {o["namespace"] for o in json.loads(configmap["data"]["job-options.json"]).values()} == {"taskserver-jobs"}
    # Nothing of the database's is in the jobs namespace.
    postgres_secret = [s for s in of_kind(objects, "Secret") if s["metadata"]["name"].endswith("-postgresql")]
    assert postgres_secret and all(s["metadata"].get("namespace", "taskserver") == "taskserver" for s in postgres_secret)
    # The release namespace itself is still allowed, and then no Namespace is rendered.
    assert not of_kind(render("default-values.yaml", "jobs.namespace=taskserver"), "Namespace")


@pytest.mark.parametrize("profile", PROFILES)
def test_every_chart_and_job_pod_meets_pod_security_restricted(profile: str) -> None:
    objects = render(profile)
    specs = pod_specs(objects) + job_pod_specs(objects)
    assert len(specs) >= 8
    violations = [v for name, spec in specs for v in restricted_violations(name, spec)]
    assert not violations, violations


def test_admission_policy_limits_job_pods_to_the_charts_accounts_and_images() -> None:
    assert not [o for o in render("default-values.yaml") if o["kind"].startswith("ValidatingAdmissionPolicy")]
    objects = render("default-values.yaml", "jobs.admissionPolicy.enabled=true", "jobs.admissionPolicy.extraImages={docker.io/library/busybox:1.36}")
    (policy,) = of_kind(objects, "ValidatingAdmissionPolicy")
    (binding,) = of_kind(objects, "ValidatingAdmissionPolicyBinding")
    for obj in (policy, binding):
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "taskserver-jobs"}
    account_rule, image_rule = (v["expression"] for v in policy["spec"]["validations"])
    accounts = set(json.loads(account_rule[account_rule.index("["):]))
    # Exactly the accounts the jobs and the warm worker run as.
    used = {spec.get("serviceAccountName") for _, spec in job_pod_specs(objects)}
    used |= {d["spec"]["template"]["spec"]["serviceAccountName"] for d in of_kind(objects, "Deployment") if d["metadata"].get("namespace") == "taskserver-jobs"}
    assert accounts == used
    images = set(json.loads(image_rule[image_rule.index("["):image_rule.rindex(")")]))
    used_images = {c["image"] for _, spec in job_pod_specs(objects) for c in spec["containers"]}
    assert used_images <= images and "docker.io/library/busybox:1.36" in images
    assert {r["resources"][0] for r in policy["spec"]["matchConstraints"]["resourceRules"]} == {"pods", "jobs"}


def test_readme_documents_the_trust_model() -> None:
    text = (CHART / "README.md").read_text()
    section = text[text.index("## Trust model"):]
    for phrase in ("PREFECT_API_AUTH_STRING", "job variables", "jobs.admissionPolicy.enabled", "restricted"):
        assert phrase in section, phrase


# --- 2. NetworkPolicy on by default ----------------------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return set(selector.get("matchLabels", {}).items()) <= set(labels.items())


def test_network_policies_are_on_by_default_and_admit_exactly_the_charts_clients() -> None:
    objects = render("default-values.yaml")
    policies = {p["metadata"]["name"]: p for p in of_kind(objects, "NetworkPolicy")}
    server, postgres = policies["ts-taskserver-server"], policies["ts-taskserver-postgresql"]
    peers = server["spec"]["ingress"][0]["from"]

    def admitted(policy_peers, namespace: str, labels: dict[str, str]) -> bool:
        for peer in policy_peers:
            ns = peer.get("namespaceSelector")
            in_namespace = ns is None and namespace == "taskserver" or ns is not None and _selects(ns, {"kubernetes.io/metadata.name": namespace})
            if in_namespace and _selects(peer.get("podSelector", {}), labels):
                return True
        return False

    pods = [(o["metadata"].get("namespace", "taskserver"), o["metadata"]["name"], (o["spec"].get("template", o)["metadata"]["labels"]))
            for o in objects if o["kind"] in {"Deployment", "StatefulSet", "Job", "Pod"}]
    for namespace, name, labels in pods:
        component = labels["app.kubernetes.io/component"]
        if component in {"server", "postgresql"}:
            continue
        assert admitted(peers, namespace, labels), f"{name} cannot reach the API"
        assert not admitted(postgres["spec"]["ingress"][0]["from"], namespace, labels), f"{name} reaches Postgres"
    # Flow-run pods: labelled by prefect-kubernetes, in the jobs namespace.
    assert admitted(peers, "taskserver-jobs", {"app.kubernetes.io/managed-by": "prefect"})
    # Any other pod of the cluster, or of the release namespace, is refused.
    assert not admitted(peers, "default", {"app": "anything"})
    assert not admitted(peers, "taskserver", {"app": "anything"})
    server_labels = next(labels for _, _, labels in pods if labels["app.kubernetes.io/component"] == "server")
    assert admitted(postgres["spec"]["ingress"][0]["from"], "taskserver", server_labels)


def test_an_ingress_needs_its_controller_admitted_by_the_network_policy() -> None:
    stderr = fails("server.ingress.enabled=true", "server.ingress.tlsSecretName=tls")
    assert "admits no ingress controller" in stderr


# --- 3. and 10. read-only root filesystems, size-limited scratch, ephemeral-storage ---------------


@pytest.mark.parametrize("profile", PROFILES)
def test_every_container_has_a_read_only_root_and_bounded_scratch(profile: str) -> None:
    objects = render(profile)
    found = containers(objects)
    assert len(found) >= 8
    for name, container, spec in found:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert "ephemeral-storage" in limits and "ephemeral-storage" in requests, name
        mounted = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounted, f"{name}: no writable /tmp"
    for name, spec in pod_specs(objects):
        for volume in spec.get("volumes", []):
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), f"{name}: emptyDir {volume['name']} has no sizeLimit"


@pytest.mark.parametrize("profile", PROFILES)
def test_every_prefect_client_keeps_its_homes_on_a_writable_scratch_volume(profile: str) -> None:
    """With a read-only root, anything taskserver or Prefect writes under a home must land on an
    emptyDir. The warm worker's `encode` once failed under `data.mode=none` ("Read-only file
    system: '/home/taskserver/.taskserver'", its embedding cache), found by the podman run."""
    clients = [(name, c, spec) for name, c, spec in containers(render(profile))
               if any(e["name"] == "PREFECT_API_URL" for e in c.get("env", []))]
    assert len(clients) >= 4, [name for name, _, _ in clients]
    for name, container, spec in clients:
        env = {e["name"]: e.get("value") for e in container["env"]}
        scratch = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for home in ("PREFECT_HOME", "TASKSERVER_HOME"):
            assert env.get(home), f"{name}: no {home}"
            mounts = [m for m in container.get("volumeMounts", []) if env[home].startswith(m["mountPath"].rstrip("/") + "/")]
            assert mounts and mounts[-1]["name"] in scratch and not mounts[-1].get("readOnly"), \
                f"{name}: {home}={env[home]} is not on a writable emptyDir"


# --- 4. the UI copies itself into a writable directory ---------------------------------------------


def test_the_ui_static_directory_is_a_writable_mounted_volume() -> None:
    (server,) = [d for d in of_kind(render("default-values.yaml"), "Deployment") if d["metadata"]["name"].endswith("-server")]
    spec = server["spec"]["template"]["spec"]
    container = spec["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    directory = env["PREFECT_UI_STATIC_DIRECTORY"]
    (mount,) = [m for m in container["volumeMounts"] if directory.startswith(m["mountPath"])]
    assert not mount.get("readOnly")
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume


# --- 5. several servers need a shared broker -------------------------------------------------------


def test_several_servers_without_redis_messaging_are_refused() -> None:
    assert "needs a shared message broker" in fails("server.replicas=2")
    (server,) = [d for d in of_kind(render("external-db-values.yaml"), "Deployment") if d["metadata"]["name"].endswith("-server")]
    assert server["spec"]["replicas"] == 2
    env = {e["name"]: e for e in server["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PREFECT_MESSAGING_BROKER"]["value"] == env["PREFECT_MESSAGING_CACHE"]["value"] == "prefect_redis.messaging"
    assert env["PREFECT_REDIS_MESSAGING_HOST"]["value"] == "redis-master.redis.svc"
    assert env["PREFECT_REDIS_MESSAGING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "taskserver-redis"
    # Prefect itself reads the broker and cache from these variables.
    from prefect.settings import Settings

    events = Settings(**{}).server.events.model_validate({"prefect_messaging_broker": env["PREFECT_MESSAGING_BROKER"]["value"], "prefect_messaging_cache": env["PREFECT_MESSAGING_CACHE"]["value"]})
    assert (events.messaging_broker, events.messaging_cache) == ("prefect_redis.messaging", "prefect_redis.messaging")


# --- 6. passwords must not regenerate over an existing database ------------------------------------


def _kubeconfig(url: str) -> str:
    return (
        "apiVersion: v1\nkind: Config\nclusters:\n- name: k\n  cluster: {server: \"%s\"}\n"
        "users:\n- name: k\n  user: {token: not-a-real-token}\ncontexts:\n- name: k\n"
        "  context: {cluster: k, user: k, namespace: taskserver}\ncurrent-context: k\n" % url
    )


def _render_against_cluster(tmp_path, objects: dict[tuple[str, str], dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    """`helm template --dry-run=server` against kmock holding ``objects`` ({(resource, name): body})."""
    import kmock

    async def run() -> subprocess.CompletedProcess[str]:
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            for resource, kind in (("v1/secrets", "Secret"), ("v1/persistentvolumeclaims", "PersistentVolumeClaim")):
                emulator.resources[resource].kind = kind
                emulator.resources[resource].namespaced = True
            for (resource, name), body in objects.items():
                emulator.objects[resource, "taskserver", name] = body
            config = tmp_path / "kubeconfig"
            config.write_text(_kubeconfig(str(server.url).rstrip("/")))
            process = await asyncio.create_subprocess_exec(
                HELM, "template", "ts", str(CHART), "-n", "taskserver", "--dry-run=server", "--kubeconfig", str(config),
                "--show-only", "templates/secrets.yaml", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), timeout=120)
            return subprocess.CompletedProcess([HELM], process.returncode, out.decode(), err.decode())

    return asyncio.run(run())


CLAIM = ("v1/persistentvolumeclaims", "data-ts-taskserver-postgresql-0")
SECRET = ("v1/secrets", "ts-taskserver-postgresql")


def test_a_new_password_is_refused_over_an_existing_database_claim(tmp_path) -> None:
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": CLAIM[1], "namespace": "taskserver"}}
    result = _render_against_cluster(tmp_path, {CLAIM: claim})
    assert result.returncode != 0
    assert "a new password would lock the server out of the existing database" in result.stderr


def test_an_existing_password_is_kept_and_the_superuser_password_added(tmp_path) -> None:
    old = base64.b64encode(b"the-old-password").decode()
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": CLAIM[1], "namespace": "taskserver"}}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET[1], "namespace": "taskserver"}, "data": {"password": old}}
    result = _render_against_cluster(tmp_path, {CLAIM: claim, SECRET: secret})
    assert result.returncode == 0, result.stderr
    import yaml

    (rendered,) = [d for d in yaml.safe_load_all(result.stdout) if d and d["metadata"]["name"] == SECRET[1]]
    assert rendered["data"]["password"] == old
    assert rendered["data"]["postgres-password"] and rendered["data"]["postgres-password"] != old


def test_readme_documents_existing_secrets_for_gitops() -> None:
    text = (CHART / "README.md").read_text()
    section = text[text.index("### GitOps"):]
    assert "postgresql.existingSecret" in section and "auth.existingSecret" in section and "--dry-run" in section


# --- 7. PriorityClasses: optional, prefixed, and fenced ---------------------------------------------


def test_priority_classes_can_be_left_out_or_prefixed_everywhere_they_are_used() -> None:
    assert not of_kind(render("default-values.yaml", "priorityClasses.create=false"), "PriorityClass")
    objects = render("gpu-kueue-values.yaml", "priorityClasses.namePrefix=team-a-")
    classes = {c["metadata"]["name"] for c in of_kind(objects, "PriorityClass")}
    assert classes == {f"team-a-{level.priority_class_name}" for level in PRIORITIES}
    assert {c["metadata"]["name"] for c in of_kind(objects, "WorkloadPriorityClass")} == classes
    warm = [d for d in of_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-warm")][0]
    assert warm["spec"]["template"]["spec"]["priorityClassName"] in classes
    # The Job a deployment of priority "high" creates names the prefixed class.
    (configmap,) = [c for c in of_kind(objects, "ConfigMap") if "job-options" in c["metadata"]["name"]]
    options = PoolJobOptions.model_validate(json.loads(configmap["data"]["job-options.json"])["gpu"])
    template = base_job_template(next(p for p in POOLS if p.gpu), options)
    manifest = apply_values(template["job_configuration"]["job_manifest"], {"priority_class_name": "taskserver-high", "gpu_type": "a100", "gpu_count": 1, "kueue_queue_name": "q"})
    assert manifest["spec"]["template"]["spec"]["priorityClassName"] == "team-a-taskserver-high"
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "team-a-taskserver-high"
    text = (CHART / "README.md").read_text()
    assert "ResourceQuota" in text and "scopeSelector" in text and "PriorityClass" in text


# --- 8. images: fully qualified, registry and digest -----------------------------------------------

QUALIFIED = re.compile(r"^(localhost|[a-z0-9-]+(\.[a-z0-9-]+)+)(:[0-9]+)?/[a-z0-9._/-]+(:[\w.-]+)?(@sha256:[a-f0-9]{64})?$")


@pytest.mark.parametrize("profile", PROFILES)
def test_every_image_is_fully_qualified(profile: str) -> None:
    objects = render(profile)
    for name, container, _ in containers(objects):
        assert QUALIFIED.match(container["image"]), f"{name}: {container['image']}"
    for _, spec in job_pod_specs(objects):
        assert QUALIFIED.match(spec["containers"][0]["image"])


def test_registry_and_digest_values_reach_every_image() -> None:
    digest = "sha256:" + "a" * 64
    objects = render("default-values.yaml", "images.registry=registry.example.com:5000", f"images.cpu.digest={digest}", "postgresql.image.registry=mirror.example.com")
    images = {name.split(":")[-1]: c["image"] for name, c, _ in containers(objects)}
    assert images["worker"] == f"registry.example.com:5000/taskserver-cpu:0.1.0@{digest}"
    assert images["server"] == "registry.example.com:5000/prefecthq/prefect:3.8.8-python3.11"
    assert images["postgresql"] == "mirror.example.com/postgres:16.9-alpine"
    assert "digest" in fails("images.cpu.digest=latest")


# --- 9. basic auth over plain HTTP ------------------------------------------------------------------


def test_an_ingress_with_basic_auth_and_no_tls_is_refused() -> None:
    labels = "networkPolicy.ingressFromNamespaceLabels.kubernetes\\.io/metadata\\.name=ingress-nginx"
    assert "password would cross the network in clear" in fails("server.ingress.enabled=true", labels)
    render("default-values.yaml", "server.ingress.enabled=true", labels, "server.ingress.tlsTerminatedUpstream=true")


# --- 11. Postgres: an app role that is not a superuser, passwords as files --------------------------


def test_postgres_app_role_is_not_the_superuser_and_passwords_are_files() -> None:
    objects = render("default-values.yaml")
    (statefulset,) = of_kind(objects, "StatefulSet")
    spec = statefulset["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert "POSTGRES_PASSWORD" not in env
    assert env["POSTGRES_USER"]["value"] != "prefect"
    password_file = env["POSTGRES_PASSWORD_FILE"]["value"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    secret_mount = mounts[password_file.rsplit("/", 1)[0]]
    (secret_volume,) = [v for v in spec["volumes"] if v["name"] == secret_mount["name"]]
    assert secret_volume["secret"]["secretName"] == "ts-taskserver-postgresql"
    (secret,) = [s for s in of_kind(objects, "Secret") if s["metadata"]["name"] == "ts-taskserver-postgresql"]
    assert {"password", "postgres-password"} <= set(secret["data"])
    # The init script creates the app role without superuser rights; the server connects as it.
    (init,) = [c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"].endswith("-postgresql-init")]
    script = init["data"]["10-app-role.sh"]
    assert "NOSUPERUSER" in script and "NOCREATEROLE" in script and "OWNER" in script
    assert mounts["/docker-entrypoint-initdb.d"]["name"] in {v["name"] for v in spec["volumes"] if v.get("configMap", {}).get("name") == init["metadata"]["name"]}
    (server,) = [d for d in of_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-server")]
    server_env = {e["name"]: e for e in server["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert server_env["PREFECT_SERVER_DATABASE_USER"]["value"] == env["TASKSERVER_APP_USER"]["value"] == "prefect"
    assert server_env["PREFECT_SERVER_DATABASE_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "password"


# --- 12. a hung recovery loop is restarted ---------------------------------------------------------


@pytest.mark.parametrize("interval", ["15", "40"])
def test_a_recovery_loop_that_stopped_passing_fails_its_liveness_probe(tmp_path, interval: str) -> None:
    (recovery,) = [d for d in of_kind(render("default-values.yaml", f"recovery.interval={interval}"), "Deployment")
                   if d["metadata"]["name"].endswith("-recovery")]
    spec = recovery["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    command = container["command"]
    seconds = float(command[command.index("--interval") + 1])
    assert seconds == float(interval)
    heartbeat = command[command.index("--heartbeat-file") + 1]
    # The file lies on a writable emptyDir (the root filesystem stays read-only).
    (mount,) = [m for m in container["volumeMounts"] if heartbeat.startswith(m["mountPath"].rstrip("/") + "/")]
    assert not mount.get("readOnly")
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["sizeLimit"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    liveness, startup = container["livenessProbe"], container["startupProbe"]
    assert liveness["exec"]["command"] == startup["exec"]["command"]
    # A hung loop is restarted within minutes; a slow start gets time for its first pass.
    assert liveness["periodSeconds"] * liveness.get("failureThreshold", 3) <= 120
    assert startup["periodSeconds"] * startup.get("failureThreshold", 3) >= 120

    # The probe exactly as rendered (python is the image's interpreter), on a file here.
    probe = liveness["exec"]["command"]
    assert probe[0] == "python"
    local = tmp_path / "heartbeat"

    def probe_passes() -> bool:
        args = [arg.replace(heartbeat, str(local)) for arg in probe[1:]]
        return subprocess.run([sys.executable, *args], capture_output=True, timeout=30).returncode == 0

    assert not probe_passes(), "passes before the first pass wrote the file"
    local.touch()
    assert probe_passes(), "fails right after a pass"
    now = time.time()
    os.utime(local, (now - 2 * seconds, now - 2 * seconds))
    assert probe_passes(), "fails while the loop is only one pass late"
    stale = now - max(4 * seconds + 60, 10 * seconds) - 5
    os.utime(local, (stale, stale))
    assert not probe_passes(), "passes with a heartbeat many intervals old"
