"""The rendered chart's own containers, run together with podman (no Kubernetes API server here).

helm renders the default profile (auth on, bundled Postgres, the shared data on a
ReadWriteMany claim; no GPU pool) with the image tests' CPU image
(localhost/taskserver-cpu:test, built if missing) plus this tree's src/ laid over it
(podman/Dockerfile.source, seconds) in place of every taskserver and Prefect image, and a local
Postgres image (tests/charts/podman/Dockerfile.postgres) in place of postgres:16-alpine. Each rendered workload becomes a Pod by changing its kind (StatefulSet,
Deployment, Job -> Pod) and is started with `podman kube play` on one network, in the order a
cluster would reach: the Postgres StatefulSet, the server Deployment, the warm worker, the recovery
Deployment, then the bootstrap hook Job. What podman cannot do is done here, and nothing else:

- Secret references are resolved from the rendered Secret objects (env values and files),
  ConfigMap volumes become files, emptyDirs become 0777 directories (as Kubernetes makes them),
  a StatefulSet's claim template becomes a podman volume, the rendered data claim a host
  directory every pod that mounts it shares, `fieldRef: metadata.name` is the
  pod's name, and `$(VAR)` in command and args is expanded from the container's env (as the
  kubelet does).
- The Services' names are given to later pods as hostAliases (and to init containers as
  `--add-host`), pointing at the pod the Service selects.
- Init containers: podman 4.3's `kube play` fails on a pod with an init container that runs for
  a while ("failed to remove once init container ... as it is running"). So each init container
  is run first, in order, with `podman run` on the same network, with exactly its rendered
  command (as the entrypoint), args, env and volume mounts (the same host directories and
  volumes the pod gets), its user and its security context (read-only root, no capabilities, no
  privilege escalation); it must exit 0. The pod is then played without its initContainers.
- Probes are not run by podman: the test runs each rendered probe itself (httpGet against the
  pod's address, exec with `podman exec`) and polls until it passes.

Then it checks what a user would: the server's probes pass; a request without credentials gets
401; the UI's index page and assets are served, and in headless Chromium (driven over the
DevTools protocol) the UI asks for the auth string, takes the generated one and shows the Prefect
dashboard (screenshot kept in $TASKSERVER_TEST_ARTIFACTS/charts or build/test-artifacts/charts);
the warm worker and recovery pass their rendered probes; the bootstrap Job's container exits 0;
`prefect deployment run 'encode/high'` with the generated auth completes on the warm worker.
Every pod, container, volume and the network it started are removed, even on failure.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from test_chart import CHART, HELM, helm

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".tools" / "podman"
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(TOOLS / "containers.conf"), "CONTAINERS_STORAGE_CONF": str(TOOLS / "storage.conf")}
CPU_IMAGE = "localhost/taskserver-cpu:test"
SOURCE_IMAGE = "localhost/taskserver-cpu:chart-test"
"""CPU_IMAGE with this tree's src/ (podman/Dockerfile.source): seconds to build, never stale."""
POSTGRES_IMAGE = "localhost/taskserver-postgres-test:pg15"
NAMESPACE = "taskserver"
ARTIFACTS = Path(os.environ.get("TASKSERVER_TEST_ARTIFACTS", REPO / "build" / "test-artifacts")) / "charts"

pytestmark = pytest.mark.skipif(HELM is None or shutil.which("podman") is None,
                                reason="needs helm (tests/charts/get_helm.sh) and podman (tests/charts/setup_podman.sh)")


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, env=PODMAN_ENV, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.stderr[-3000:]}")
    return result


def wait_for(what: str, condition: Callable[[], Any], timeout: float, logs: Callable[[], str] = lambda: "",
             interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - polled until the deadline
            last = exc
        time.sleep(interval)
    pytest.fail(f"{what} within {timeout:.0f} s (last: {last!r})\n{logs()[-6000:]}")


@pytest.fixture(scope="module")
def images() -> None:
    # The image tests' CPU image: built here only if missing, under build-test.sh's lock, so the
    # two pytest processes never build it twice at once.
    build = subprocess.run(["bash", str(REPO / "images" / "build-test.sh"), "cpu-image"], cwd=REPO,
                           capture_output=True, text=True, timeout=1700)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    if podman("image", "exists", POSTGRES_IMAGE, check=False).returncode != 0:
        podman("build", "--quiet", "--layers", "-f", str(Path(__file__).parent / "podman" / "Dockerfile.postgres"),
               "-t", POSTGRES_IMAGE, str(Path(__file__).parent / "podman"), timeout=900)
    podman("build", "--quiet", "--layers", "--build-arg", f"BASE_IMAGE={CPU_IMAGE}",
           "-f", str(Path(__file__).parent / "podman" / "Dockerfile.source"), "-t", SOURCE_IMAGE, str(REPO / "src"), timeout=600)


def rendered() -> list[dict[str, Any]]:
    sets = [
        "images.registry=localhost", "images.cpu.tag=chart-test", "images.gpu.tag=chart-test",
        "images.server.repository=taskserver-cpu", "images.server.tag=chart-test",
        "postgresql.image.repository=taskserver-postgres-test", "postgresql.image.tag=pg15",
        "images.pullPolicy=Never", "workers.gpu.enabled=false",
    ]
    args = ["template", "ts", str(CHART), "-n", NAMESPACE]
    for value in sets:
        args += ["--set", value]
    return [doc for doc in yaml.safe_load_all(helm(*args).stdout) if doc]


class Cluster:
    """Pods started from rendered objects on one podman network; stops all of them."""

    def __init__(self, objects: list[dict[str, Any]], workdir: Path) -> None:
        self.objects = objects
        self.workdir = workdir
        self.network = f"ts-{uuid.uuid4().hex[:8]}"
        self.pods: list[str] = []
        self.containers: list[str] = []
        self.hosts: list[dict[str, Any]] = []
        self.volumes: list[str] = []
        self.secrets = {(o["metadata"].get("namespace", NAMESPACE), o["metadata"]["name"]): {k: base64.b64decode(v).decode() for k, v in o["data"].items()}
                        for o in objects if o["kind"] == "Secret"}

    def find(self, kind: str, suffix: str) -> dict[str, Any]:
        (obj,) = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
        return obj

    def as_pod(self, obj: dict[str, Any]) -> dict[str, Any]:
        namespace = obj["metadata"].get("namespace", NAMESPACE)
        name = obj["metadata"]["name"]
        template = copy.deepcopy(obj["spec"]["template"])
        spec = template["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    env.pop("valueFrom")
                    env["value"] = self.secrets[(namespace, ref["name"])][ref["key"]]
                field = env.get("valueFrom", {}).get("fieldRef")
                if field:
                    assert field["fieldPath"] == "metadata.name", field
                    env.pop("valueFrom")
                    env["value"] = name
            # The kubelet expands $(VAR) in command and args from the container's env; podman does not.
            values = {env["name"]: env["value"] for env in container.get("env", []) if "value" in env}
            for key in ("command", "args"):
                if key in container:
                    container[key] = [re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), m.group(0)), str(arg))
                                      for arg in container[key]]
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                directory = self.workdir / f"secret-{namespace}-{volume['secret']['secretName']}"
                directory.mkdir(exist_ok=True)
                for key, value in self.secrets[(namespace, volume["secret"]["secretName"])].items():
                    (directory / key).write_text(value)
                    os.chmod(directory / key, 0o444)
                volume.pop("secret")
                volume["hostPath"] = {"path": str(directory), "type": "Directory"}
            if "emptyDir" in volume:
                # Kubernetes makes an emptyDir world-writable (0777); podman's is root's 0755.
                directory = self.workdir / f"emptydir-{name}-{volume['name']}"
                directory.mkdir()
                os.chmod(directory, 0o777)
                volume.pop("emptyDir")
                volume["hostPath"] = {"path": str(directory), "type": "Directory"}
            if "persistentVolumeClaim" in volume:
                # A rendered ReadWriteMany claim (the shared data): one host directory that every
                # pod mounting the claim shares, as an NFS-backed volume would be.
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert any(o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == claim for o in self.objects), claim
                directory = self.workdir / f"claim-{claim}"
                directory.mkdir(exist_ok=True)
                os.chmod(directory, 0o777)
                volume.pop("persistentVolumeClaim")
                volume["hostPath"] = {"path": str(directory), "type": "Directory"}
            if "configMap" in volume:
                (configmap,) = [o for o in self.objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == volume["configMap"]["name"]]
                directory = self.workdir / f"configmap-{configmap['metadata']['name']}"
                directory.mkdir(exist_ok=True)
                for key, value in configmap["data"].items():
                    (directory / key).write_text(value)
                volume.pop("configMap")
                volume["hostPath"] = {"path": str(directory), "type": "Directory"}
        # A StatefulSet's claim template: the claim Kubernetes would create, as a podman volume.
        for claim in obj["spec"].get("volumeClaimTemplates", []):
            volume_name = f"{claim['metadata']['name']}-{name}-0"
            self.volumes.append(volume_name)
            spec.setdefault("volumes", []).append({"name": claim["metadata"]["name"], "persistentVolumeClaim": {"claimName": volume_name}})
        if self.hosts:
            spec["hostAliases"] = list(self.hosts)
        # No API server: no ServiceAccounts, no PriorityClasses to resolve them against.
        spec.pop("serviceAccountName", None)
        spec.pop("priorityClassName", None)
        if obj["kind"] == "Job":
            assert spec["restartPolicy"] == "Never"
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": template["metadata"].get("labels", {})}, "spec": spec}

    def run_init_container(self, pod: dict[str, Any], container: dict[str, Any], timeout: float) -> None:
        """One init container with `podman run`, as the kubelet would run it, before the pod."""
        spec = pod["spec"]
        name = f"{pod['metadata']['name']}-init-{container['name']}"
        pod_context, context = spec.get("securityContext", {}), container.get("securityContext", {})
        args = ["run", "--name", name, "--network", self.network, "--pull", "never"]
        user, group = context.get("runAsUser", pod_context.get("runAsUser")), context.get("runAsGroup", pod_context.get("runAsGroup"))
        if user is not None:
            args += ["--user", f"{user}:{group}" if group is not None else str(user)]
        if context.get("readOnlyRootFilesystem"):
            args += ["--read-only", "--read-only-tmpfs=false"]
        for capability in context.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", capability.lower()]
        if context.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        for host in spec.get("hostAliases", []):
            for hostname in host["hostnames"]:
                args += ["--add-host", f"{hostname}:{host['ip']}"]
        for env in container.get("env", []):
            assert "value" in env, env  # resolved by as_pod
            args += ["--env", f"{env['name']}={env['value']}"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            source = volume["hostPath"]["path"] if "hostPath" in volume else volume["persistentVolumeClaim"]["claimName"]
            args += ["--volume", f"{source}:{mount['mountPath']}" + (":ro" if mount.get("readOnly") else "")]
        if "command" in container:
            args += ["--entrypoint", json.dumps(container["command"])]
        args += [container["image"], *container.get("args", [])]
        self.containers.append(name)
        try:
            result = podman(*args, check=False, timeout=timeout)
        finally:
            podman("rm", "--force", name, check=False)
        assert result.returncode == 0, f"init container {name} exited {result.returncode}:\n{(result.stdout + result.stderr)[-4000:]}"

    def start(self, obj: dict[str, Any], init_timeout: float = 600) -> str:
        pod = self.as_pod(obj)
        for container in pod["spec"].pop("initContainers", []):
            self.run_init_container(pod, container, init_timeout)
        path = self.workdir / f"{pod['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(pod))
        self.pods.append(pod["metadata"]["name"])
        podman("kube", "play", "--network", self.network, str(path))
        return pod["metadata"]["name"]

    def ip(self, pod: str) -> str:
        infra = json.loads(podman("pod", "inspect", pod).stdout)
        infra_id = infra["InfraContainerID"] if isinstance(infra, dict) else infra[0]["InfraContainerID"]
        networks = json.loads(podman("inspect", infra_id).stdout)[0]["NetworkSettings"]["Networks"]
        return networks[self.network]["IPAddress"]

    def serve(self, pod: str, service: str) -> None:
        """Give later pods the Service's names, pointing at this pod (the one it selects)."""
        (svc,) = [o for o in self.objects if o["kind"] == "Service" and o["metadata"]["name"] == service]
        (played,) = [o for o in self.objects if o["kind"] in {"Deployment", "StatefulSet"} and o["metadata"]["name"] == pod]
        labels = played["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items(), f"Service {service} does not select {pod}"
        ip = self.ip(pod)
        self.hosts.append({"ip": ip, "hostnames": [service, f"{service}.{NAMESPACE}", f"{service}.{NAMESPACE}.svc",
                                                   f"{service}.{NAMESPACE}.svc.cluster.local"]})

    def logs(self, pod: str) -> str:
        out = []
        inspected = json.loads(podman("pod", "inspect", pod, check=False).stdout or "{}")
        if isinstance(inspected, list):
            inspected = inspected[0] if inspected else {}
        for container in inspected.get("Containers", []):
            result = podman("logs", container["Id"], check=False)
            out.append(f"--- {container['Name']}\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
        return "\n".join(out)

    def container_state(self, pod: str, container: str) -> dict[str, Any]:
        return json.loads(podman("inspect", f"{pod}-{container}").stdout)[0]["State"]

    def exec_probe(self, pod: str, container: dict[str, Any], probe: str) -> bool:
        command = container[probe]["exec"]["command"]
        return podman("exec", f"{pod}-{container['name']}", *command, check=False, timeout=60).returncode == 0

    def http_probe(self, pod: str, container: dict[str, Any], probe: str) -> bool:
        get = container[probe]["httpGet"]
        port = get["port"]
        if isinstance(port, str):
            (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
        return http_status(f"http://{self.ip(pod)}:{port}{get['path']}") == 200

    def close(self) -> None:
        for name in self.containers:
            podman("rm", "--force", "--time", "5", name, check=False)
        for pod in reversed(self.pods):
            podman("pod", "rm", "--force", "--time", "5", pod, check=False)
        for volume in self.volumes:
            podman("volume", "rm", "--force", volume, check=False)
        podman("network", "rm", "--force", self.network, check=False)


def http_status(url: str, auth: str | None = None, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json"} if data is not None else {})
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def api(base: str, auth: str, path: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(f"{base}/api/{path}", data=json.dumps(body).encode() if body is not None else None,
                                     method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": "Basic " + base64.b64encode(auth.encode()).decode()})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


async def _login_and_screenshot(base: str, auth: str, screenshot: Path, profile: Path) -> tuple[str, str]:
    """What a person does: open the UI, see the login form, paste the auth string, land on the
    dashboard. Headless Chromium driven over the DevTools protocol (websockets comes with Prefect).
    Returns (the login page's text, the dashboard's text) and writes the screenshot."""
    import websockets

    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed (.ci/system-deps.sh installs it)"
    browser = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1600,1200",
                                "--remote-debugging-port=0", f"--user-data-dir={profile}", "--no-first-run", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        (page,) = [t for t in json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
                   if t["type"] == "page"]
        async with websockets.connect(page["webSocketDebuggerUrl"], max_size=64 * 2**20) as socket:
            ids = iter(range(1, 10**6))

            async def call(method: str, **params: Any) -> dict[str, Any]:
                message_id = next(ids)
                await socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
                while True:
                    message = json.loads(await asyncio.wait_for(socket.recv(), 60))
                    if message.get("id") == message_id:
                        assert "error" not in message, (method, message)
                        return message["result"]

            async def evaluate(expression: str) -> Any:
                return (await call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")

            async def until(what: str, expression: str, timeout: float = 90) -> Any:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    value = await evaluate(expression)
                    if value:
                        return value
                    await asyncio.sleep(0.5)
                text = await evaluate("document.body ? document.body.innerText : ''")
                raise AssertionError(f"{what} within {timeout:.0f} s; the page shows: {text[-2000:]!r}")

            await call("Page.enable")
            await call("Page.navigate", url=f"{base}/dashboard")
            await until("the UI asks for credentials", "!!document.querySelector('input[type=password]')")
            login_text = await evaluate("document.body.innerText")
            await evaluate("document.querySelector('input[type=password]').focus()")
            await call("Input.insertText", text=auth)
            await evaluate("document.querySelector('form button[type=submit]').click()")
            await until("the dashboard after logging in",
                        "!document.querySelector('input[type=password]') && location.pathname.startsWith('/dashboard')"
                        " && document.body.innerText.includes('Dashboard')")
            # The dashboard's own widgets have loaded data from the API (not an error page).
            await until("the dashboard's panels", "document.body.innerText.includes('Flow Runs')"
                        " || document.body.innerText.includes('Work Pools')")
            # A fresh load with the stored credentials: no error toasts left from before the login.
            await call("Page.reload")
            await until("the dashboard after a reload", "location.pathname.startsWith('/dashboard')"
                        " && document.body.innerText.includes('Dashboard')")
            await asyncio.sleep(2)  # let charts finish drawing for the screenshot
            dashboard_text = await evaluate("document.body.innerText")
            shot = await call("Page.captureScreenshot", format="png")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            return login_text, dashboard_text
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=20)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_rendered_chart_runs_with_podman(images, tmp_path) -> None:
    started = time.monotonic()
    objects = rendered()
    cluster = Cluster(objects, tmp_path)
    podman("network", "create", cluster.network)
    try:
        # Postgres (StatefulSet -> Pod) and its rendered readiness probe.
        statefulset = cluster.find("StatefulSet", "-postgresql")
        postgres = cluster.start(statefulset)
        (pg_container,) = statefulset["spec"]["template"]["spec"]["containers"]
        wait_for("Postgres passes its rendered readiness probe", lambda: cluster.exec_probe(postgres, pg_container, "readinessProbe"),
                 180, lambda: cluster.logs(postgres))
        assert cluster.exec_probe(postgres, pg_container, "livenessProbe")
        cluster.serve(postgres, "ts-taskserver-postgresql")

        # The server: migrations (init container) first, then the server and its rendered probes.
        deployment = cluster.find("Deployment", "-server")
        server = cluster.start(deployment)
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        for probe_name in ("readinessProbe", "livenessProbe"):
            wait_for(f"the server passes its rendered {probe_name}", lambda: cluster.http_probe(server, container, probe_name),
                     300, lambda: cluster.logs(server))
        cluster.serve(server, "ts-taskserver-server")
        ip = cluster.ip(server)
        port = container["ports"][0]["containerPort"]
        base = f"http://{ip}:{port}"
        auth = cluster.secrets[(NAMESPACE, "ts-taskserver-api-auth")]["auth-string"]
        user, _, password = auth.partition(":")
        assert user and len(password) >= 24, "the generated auth string is not user:long-password"

        # Without credentials (or with wrong ones) the API refuses; with the generated auth it answers.
        assert http_status(f"{base}/api/flows/filter", data=b"{}") == 401
        assert http_status(f"{base}/api/flows/filter", auth=f"{user}:wrong", data=b"{}") == 401
        assert http_status(f"{base}/api/flows/filter", auth=auth, data=b"{}") == 200

        # The UI: Prefect copied it into PREFECT_UI_STATIC_DIRECTORY (an emptyDir) and serves it.
        env = {e["name"]: e.get("value") for e in container["env"]}
        static = Path(tmp_path / f"emptydir-{server}-ui-build")
        # Prefect 3.8 copies each UI bundle into <directory>/v1 and <directory>/v2.
        assert env["PREFECT_UI_STATIC_DIRECTORY"] == "/ui-build" and (static / "v1" / "index.html").exists(), \
            sorted(str(p.relative_to(static)) for p in static.rglob("*"))[:20]
        index = urllib.request.urlopen(f"{base}/", timeout=10).read().decode()
        assert "<title>Prefect Server</title>" in index, index[:2000]
        assets = re.findall(r'(?:src|href)="(/assets/[^"]+\.js)"', index)
        assert assets and all(http_status(f"{base}{asset}") == 200 for asset in assets), assets
        screenshot = ARTIFACTS / "podman-ui-dashboard.png"
        screenshot.unlink(missing_ok=True)
        login_text, dashboard_text = asyncio.run(_login_and_screenshot(base, auth, screenshot, tmp_path / "chromium"))
        assert "Login" in login_text, login_text
        assert "Dashboard" in dashboard_text and "Login" not in dashboard_text.split("Dashboard")[0][-200:], dashboard_text[:2000]
        assert screenshot.stat().st_size > 20_000
        for error in ("Authentication failed", "Something went wrong"):
            assert error not in dashboard_text, dashboard_text[-2000:]

        # The warm worker and the recovery service, each with its rendered probes.
        warm_deployment = cluster.find("Deployment", "-warm")
        warm = cluster.start(warm_deployment)
        (warm_container,) = warm_deployment["spec"]["template"]["spec"]["containers"]
        recovery_deployment = cluster.find("Deployment", "-recovery")
        recovery = cluster.start(recovery_deployment)
        (recovery_container,) = recovery_deployment["spec"]["template"]["spec"]["containers"]

        # The bootstrap hook Job: its wait-for-api init container, then its container to exit 0.
        job = cluster.find("Job", "-bootstrap")
        bootstrap = cluster.start(job, init_timeout=300)
        (job_container,) = job["spec"]["template"]["spec"]["containers"]

        def bootstrap_exited() -> dict[str, Any] | None:
            state = cluster.container_state(bootstrap, job_container["name"])
            return state if state["Status"] in {"exited", "stopped"} else None

        state = wait_for("the bootstrap Job's container exits", bootstrap_exited, 600, lambda: cluster.logs(bootstrap), interval=2)
        assert state["ExitCode"] == 0, f"the bootstrap exited {state['ExitCode']}\n{cluster.logs(bootstrap)[-6000:]}"
        pools = {p["name"]: p for p in api(base, auth, "work_pools/filter", {})}
        assert {"warm", "cpu"} <= set(pools), sorted(pools)

        wait_for("recovery passes its rendered startupProbe", lambda: cluster.exec_probe(recovery, recovery_container, "startupProbe"),
                 300, lambda: cluster.logs(recovery), interval=2)
        assert cluster.exec_probe(recovery, recovery_container, "livenessProbe")
        for probe_name in ("startupProbe", "livenessProbe"):
            wait_for(f"the warm worker passes its rendered {probe_name}", lambda: cluster.http_probe(warm, warm_container, probe_name),
                     600, lambda: cluster.logs(warm), interval=2)

        # A user's run, with the generated auth, on the warm lane.
        home = tmp_path / "prefect-home"
        home.mkdir()
        user_env = {**os.environ, "PREFECT_API_URL": f"{base}/api", "PREFECT_API_AUTH_STRING": auth, "PREFECT_HOME": str(home),
                    "DO_NOT_TRACK": "true"}
        user_env.pop("PREFECT_PROFILES_PATH", None)
        prefect_cli = str(Path(sys.executable).parent / "prefect")
        run = subprocess.run([prefect_cli, "deployment", "run", "encode/high", "--param", 'texts=["run by the podman chart test"]',
                              "--watch", "--watch-timeout", "600"],
                             capture_output=True, text=True, env=user_env, timeout=700)
        output = run.stdout + run.stderr
        (run_id,) = set(re.findall(r"UUID:\s*([0-9a-f-]{36})", output)) or {None}
        assert run_id, output[-4000:]
        flow_run = api(base, auth, f"flow_runs/{run_id}")
        assert flow_run["state"]["type"] == "COMPLETED", f"{flow_run['state']}\n{output[-3000:]}\n{cluster.logs(warm)[-6000:]}"
        assert run.returncode == 0, output[-4000:]
        assert flow_run["work_pool_name"] == "warm"
        assert (flow_run.get("labels") or {}).get("prefect.worker.name") == warm, flow_run.get("labels")
        print(f"podman chart run: {time.monotonic() - started:.0f} s")
    finally:
        cluster.close()
    assert podman("pod", "exists", cluster.pods[0], check=False).returncode != 0 if cluster.pods else True
