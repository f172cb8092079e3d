"""deploy/k8s: both overlays render, are valid Kubernetes and keep the issue's promises.

Each overlay is rendered with ``kubectl kustomize`` (``make system-deps`` provides kubectl)
and every document is validated with kubernetes-validate against the Kubernetes
KUBERNETES_VERSION schemas in strict mode (an unknown or misspelt field fails). The
properties are then read from the rendered objects, not from the text: native gRPC
probes on the gRPC port, termination grace above the server's stop grace, requests and
limits, a non-root read-only security context, headless Services, autoscalers, disruption
budgets, at least two replicas of every service in production, settings each service
really reads (and accepts), targets and URLs that reach a Service of the overlay, which
backends each overlay runs, and the versions of the root .env. Each check is a function
returning its problems; ``test_checks_catch_*`` break a rendered overlay on purpose and
expect the matching check to say so.
"""

from __future__ import annotations

import base64
import copy
import functools
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from trellis.runtime.settings import env_names
from trellis_cli.config_table import SERVICES as SETTINGS

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy/k8s"
OVERLAYS = ("dev", "production")
NAMESPACES = {"dev": "trellis-dev", "production": "trellis"}
#: Schemas bundled by kubernetes-validate; native gRPC probes are GA since 1.27.
KUBERNETES_VERSION = "1.30"

#: The five gRPC services: Deployment and Service name = settings name, command trellis-<name>.
GRPC_SERVICES = ("executor", "planner", "toolgateway", "cache", "costs")
AUTOSCALED = {"executor", "toolgateway", "costs"}
#: Keys of the Secret that production creates outside git (deploy/k8s/README.md).
EXTERNAL_SECRET = "trellis-secrets"
EXTERNAL_SECRET_EXAMPLE = {
    "TRELLIS_DATABASE_URL": "postgresql://trellis:secret@postgresql.databases:5432/trellis",
    "TRELLIS_REDIS_URL": "redis://:secret@redis-master.databases:6379/0",
    "OPENAI_API_KEY": "sk-example",
    "TRELLIS_API_KEYS": '{"%s": "acme"}' % ("0" * 64),
}
#: Backends that production takes from existing installs and dev runs itself, by image.
BACKENDS = {
    "redis": "REDIS_IMAGE",
    "postgres": "POSTGRES_IMAGE",
    "jaegertracing/jaeger": "JAEGER_IMAGE",
    "prom/prometheus": "PROMETHEUS_IMAGE",
}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Pod", "Job", "CronJob"}

Doc = dict[str, Any]
Check = Callable[[list[Doc]], list[str]]


# -- rendering ------------------------------------------------------------------------


@functools.cache
def _render(overlay: str) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed (`make system-deps`)")
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{done.stderr}"
    return done.stdout


def render(overlay: str) -> list[Doc]:
    """A fresh copy of the overlay's objects (tests may change it)."""
    return [doc for doc in yaml.safe_load_all(_render(overlay)) if doc]


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def docs(overlay: str) -> list[Doc]:
    return render(overlay)


# -- reading rendered objects ---------------------------------------------------------


def of_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def generated(docs: list[Doc], kind: str, name: str) -> Doc | None:
    """The ConfigMap/Secret ``name``, with or without kustomize's hash suffix."""
    for candidate, doc in of_kind(docs, kind).items():
        if candidate == name or re.fullmatch(re.escape(name) + r"-[a-z0-9]{10}", candidate):
            return doc
    return None


def pod_spec(workload: Doc) -> Doc:
    return workload["spec"]["template"]["spec"]


def trellis_containers(docs: list[Doc]) -> list[tuple[str, Doc, Doc]]:
    """(settings name, Deployment, container) of every container running a Trellis command."""
    out = []
    for deployment in of_kind(docs, "Deployment").values():
        for container in pod_spec(deployment)["containers"]:
            command = (container.get("command") or [""])[0]
            if command.startswith("trellis-") and command[len("trellis-") :] in SETTINGS:
                out.append((command[len("trellis-") :], deployment, container))
    return out


def service_container(docs: list[Doc], name: str) -> tuple[Doc, Doc]:
    for service, deployment, container in trellis_containers(docs):
        if service == name and deployment["metadata"]["name"] == name:
            return deployment, container
    raise AssertionError(f"no Deployment {name} running trellis-{name}")


def secret_value(docs: list[Doc], name: str, key: str) -> str | None:
    secret = generated(docs, "Secret", name)
    if secret is None:
        return None
    if key in secret.get("stringData", {}):
        return str(secret["stringData"][key])
    if key in secret.get("data", {}):
        return base64.b64decode(secret["data"][key]).decode()
    return None


class Ref(str):
    """An env value the API server fills in (fieldRef, secretKeyRef): kept with its source."""

    source: tuple[str, ...]

    def __new__(cls, value: str, *source: str) -> Ref:
        ref = super().__new__(cls, value)
        ref.source = source
        return ref


def container_env(docs: list[Doc], container: Doc) -> dict[str, str]:
    """The environment the container gets: envFrom first, env on top (as the kubelet does).

    Field references become ``pod-0``; Secret references the Secret's value in the overlay
    or, for the Secret production creates itself, an example of the documented format.
    """
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            config = generated(docs, "ConfigMap", source["configMapRef"]["name"])
            assert config is not None, f"ConfigMap {source['configMapRef']['name']} not rendered"
            env.update({k: str(v) for k, v in config.get("data", {}).items()})
        else:
            raise AssertionError(f"{container['name']}: unexpected envFrom {source}")
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item.get("valueFrom", {})
        if "fieldRef" in ref:
            env[item["name"]] = Ref("pod-0", "field", ref["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in ref:
            name, key = ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
            value = secret_value(docs, name, key)
            if value is None and name == EXTERNAL_SECRET:
                value = EXTERNAL_SECRET_EXAMPLE.get(key)
            assert value is not None, f"{container['name']}: no Secret {name} key {key}"
            env[item["name"]] = Ref(value, "secret", name, key)
        else:
            raise AssertionError(f"{container['name']}: unexpected env source {item}")
    return env


def port_named(container: Doc, name: str) -> int | None:
    for port in container.get("ports", []):
        if port.get("name") == name:
            return int(port["containerPort"])
    return None


def prestop_seconds(container: Doc) -> float:
    pre = container.get("lifecycle", {}).get("preStop")
    if not pre:
        return 0.0
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    command = pre.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] in ("sleep", "/bin/sleep"):
        return float(command[1])
    raise AssertionError(f"{container['name']}: preStop {pre} is not a plain sleep")


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def image_of(reference: str) -> tuple[str, str]:
    """(name, tag) of an image reference such as ``prom/prometheus:v2.55.1``."""
    if ":" in reference.rsplit("/", 1)[-1]:
        name, tag = reference.rsplit(":", 1)
        return name, tag
    return reference, ""


def dot_env() -> dict[str, str]:
    path = REPO / ".env"
    assert path.is_file(), "the root .env pins the images deploy/k8s uses too"
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return {k.strip(): v.strip() for k, v in pairs}


# -- checks: each returns its problems -------------------------------------------------


def schema_problems(docs: list[Doc]) -> list[str]:
    problems = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = "/".join(str(p) for p in error.absolute_path)
            problems.append(f"{doc['kind']}/{doc['metadata']['name']} {where}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{doc['kind']} {doc['apiVersion']}: no schema in {KUBERNETES_VERSION}")
    return problems


def probe_problems(docs: list[Doc]) -> list[str]:
    problems = []
    for name in GRPC_SERVICES:
        _, container = service_container(docs, name)
        grpc_port = port_named(container, "grpc")
        env = container_env(docs, container)
        if grpc_port is None or str(grpc_port) != env.get("TRELLIS_PORT"):
            problems.append(f"{name}: port 'grpc' {grpc_port} != TRELLIS_PORT")
        for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
            probe = container.get(kind) or {}
            port = probe.get("grpc", {}).get("port")
            if port != grpc_port:
                problems.append(f"{name}: {kind} is not a native gRPC probe of port {grpc_port}")
    return problems


def grace_problems(docs: list[Doc]) -> list[str]:
    problems = []
    for name in GRPC_SERVICES:
        deployment, container = service_container(docs, name)
        grace = float(container_env(docs, container).get("TRELLIS_GRACE_SECONDS", 5.0))
        budget = grace + prestop_seconds(container)
        period = pod_spec(deployment).get("terminationGracePeriodSeconds", 30)
        if not period > budget:
            problems.append(
                f"{name}: terminationGracePeriodSeconds {period} <= preStop sleep + "
                f"TRELLIS_GRACE_SECONDS ({budget})"
            )
        if prestop_seconds(container) <= 0:
            problems.append(f"{name}: no preStop sleep to let endpoints drain")
    return problems


def resource_problems(docs: list[Doc]) -> list[str]:
    problems = []
    for deployment in of_kind(docs, "Deployment").values():
        for container in pod_spec(deployment)["containers"]:
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(resources.get(part, {}))
                if missing:
                    problems.append(
                        f"{deployment['metadata']['name']}: no {part} {', '.join(sorted(missing))}"
                    )
    return problems


def security_problems(docs: list[Doc]) -> list[str]:
    """Every pod: non-root, read-only root, no escalation, no capabilities, RuntimeDefault."""
    problems = []
    for deployment in of_kind(docs, "Deployment").values():
        spec = pod_spec(deployment)
        pod = spec.get("securityContext", {})
        for container in spec["containers"]:
            where = f"{deployment['metadata']['name']}/{container['name']}"
            own = container.get("securityContext", {})

            def get(key: str, own: Doc = own, pod: Doc = pod) -> Any:
                return own.get(key, pod.get(key))

            if get("runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            if get("runAsUser") in (None, 0):
                problems.append(f"{where}: no non-zero runAsUser")
            if (get("seccompProfile") or {}).get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile is not RuntimeDefault")
            if own.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if own.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            if own.get("capabilities", {}).get("drop") != ["ALL"] or own.get(
                "capabilities", {}
            ).get("add"):
                problems.append(f"{where}: capabilities are not drop [ALL]")
            if own.get("privileged"):
                problems.append(f"{where}: privileged")
    for service, deployment, container in trellis_containers(docs):
        spec = pod_spec(deployment)
        uid = container.get("securityContext", {}).get(
            "runAsUser", spec.get("securityContext", {}).get("runAsUser")
        )
        if uid != 10001:
            problems.append(f"{service}: runAsUser {uid}, not the image's user 10001")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        wanted = ("/tmp",) if service == "offline-model" else ("/var/lib/trellis", "/tmp")
        for path in wanted:
            mount = mounts.get(path)
            if mount is None or mount.get("readOnly") or mount["name"] not in volumes:
                problems.append(f"{service}: no writable volume at {path}")
    return problems


def service_problems(docs: list[Doc]) -> list[str]:
    problems = []
    services = of_kind(docs, "Service")
    for name in GRPC_SERVICES:
        deployment, container = service_container(docs, name)
        service = services.get(name)
        if service is None:
            problems.append(f"{name}: no Service")
            continue
        spec = service["spec"]
        if spec.get("clusterIP") != "None":
            problems.append(f"{name}: Service is not headless (clusterIP: None)")
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        if not selects(spec.get("selector", {}), pod_labels):
            problems.append(f"{name}: Service selector does not select the Deployment's pods")
        if not selects(deployment["spec"]["selector"]["matchLabels"], pod_labels):
            problems.append(f"{name}: Deployment selector does not select its own pods")
        ports = {p.get("name"): p for p in spec.get("ports", [])}
        grpc = ports.get("grpc", {})
        if grpc.get("appProtocol") != "grpc" or grpc.get("port") != port_named(container, "grpc"):
            problems.append(f"{name}: Service port 'grpc' (appProtocol grpc) != container's")
        if grpc.get("targetPort") not in ("grpc", port_named(container, "grpc")):
            problems.append(f"{name}: Service port 'grpc' targets {grpc.get('targetPort')}")
        metrics_port = port_named(container, "metrics")
        env = container_env(docs, container)
        if metrics_port is None or str(metrics_port) != env.get("TRELLIS_METRICS_PORT"):
            problems.append(f"{name}: port 'metrics' != TRELLIS_METRICS_PORT")
        if ports.get("metrics", {}).get("port") != metrics_port:
            problems.append(f"{name}: Service has no 'metrics' port {metrics_port}")
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        expected = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(metrics_port),
            "prometheus.io/path": "/metrics",
        }
        if {k: annotations.get(k) for k in expected} != expected:
            problems.append(f"{name}: pod annotations are not {expected}")
    return problems


def autoscaling_problems(docs: list[Doc]) -> list[str]:
    problems = []
    deployments = of_kind(docs, "Deployment")
    targets = set()
    for name, hpa in of_kind(docs, "HorizontalPodAutoscaler").items():
        ref = hpa["spec"]["scaleTargetRef"]
        if hpa["apiVersion"] != "autoscaling/v2":
            problems.append(f"HPA {name}: not autoscaling/v2")
        if ref.get("kind") != "Deployment" or ref.get("name") not in deployments:
            problems.append(f"HPA {name}: scales {ref}, not a Deployment of the overlay")
        targets.add(ref.get("name"))
        metrics = {m.get("resource", {}).get("name") for m in hpa["spec"].get("metrics", [])}
        if "cpu" not in metrics:
            problems.append(f"HPA {name}: does not scale on CPU")
        if not 1 <= hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"]:
            problems.append(f"HPA {name}: bad replica bounds")
    if targets != AUTOSCALED:
        problems.append(f"HPAs target {sorted(targets)}, want {sorted(AUTOSCALED)}")
    return problems


def disruption_problems(docs: list[Doc]) -> list[str]:
    """Every Trellis Deployment that may run several pods has a PodDisruptionBudget."""
    problems = []
    hpas = {
        h["spec"]["scaleTargetRef"]["name"]: h
        for h in of_kind(docs, "HorizontalPodAutoscaler").values()
    }
    pdbs = of_kind(docs, "PodDisruptionBudget")
    for name in GRPC_SERVICES:
        deployment, _ = service_container(docs, name)
        most = max(
            deployment["spec"].get("replicas", 1),
            hpas.get(name, {}).get("spec", {}).get("maxReplicas", 1),
        )
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        covering = [
            p
            for p in pdbs.values()
            if selects(p["spec"]["selector"].get("matchLabels", {}), labels)
        ]
        if most > 1 and not covering:
            problems.append(f"{name}: up to {most} replicas but no PodDisruptionBudget")
        for pdb in covering:
            if pdb["spec"].get("minAvailable") not in (None, 0) and most <= 1:
                problems.append(f"{name}: PDB minAvailable on a single replica blocks drains")
    if not pdbs:
        problems.append("no PodDisruptionBudget at all")
    return problems


def redundancy_problems(docs: list[Doc]) -> list[str]:
    """No single point of failure: every gRPC service runs at least two pods (its HPA's
    floor when it has one, else its replica count)."""
    hpas = {
        h["spec"]["scaleTargetRef"]["name"]: h
        for h in of_kind(docs, "HorizontalPodAutoscaler").values()
    }
    problems = []
    for name in GRPC_SERVICES:
        deployment, _ = service_container(docs, name)
        hpa = hpas.get(name)
        floor = hpa["spec"].get("minReplicas", 1) if hpa else deployment["spec"].get("replicas", 1)
        if floor < 2:
            problems.append(f"{name}: runs as few as {floor} replica(s)")
    return problems


def settings_problems(docs: list[Doc], tmp: Path) -> list[str]:
    """Every TRELLIS_*/OPENAI_* variable is one the service reads, and it accepts the value."""
    problems = []
    for service, deployment, container in trellis_containers(docs):
        cls = SETTINGS[service]
        names = env_names(cls)
        env = container_env(docs, container)
        ours = {k: v for k, v in env.items() if k.startswith(("TRELLIS_", "OPENAI_"))}
        for unknown in sorted(set(ours) - names):
            problems.append(
                f"{deployment['metadata']['name']}: {unknown} is not a {service} setting"
            )
        # Build the settings from exactly this environment. Paths are checked on this
        # machine: outboxes move under tmp and mounted files (TRELLIS_TOOLS_FILE, ...) are
        # left out; where they point in the pod is checked below.
        saved = {k: v for k, v in os.environ.items() if k.startswith(("TRELLIS_", "OPENAI_"))}
        try:
            for key in saved:
                del os.environ[key]
            for key, value in ours.items():
                if key in names and key.endswith("_FILE"):
                    continue
                if key in names and key.endswith("_PATH"):
                    value = str(tmp / Path(value).name)
                os.environ[key] = value
            try:
                cls()
            except ValidationError as error:
                problems.append(f"{service}: settings refuse the manifest's values: {error}")
        finally:
            for key in ours:
                os.environ.pop(key, None)
            os.environ.update(saved)
        mounts = [
            m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly")
        ]
        mounted = [m["mountPath"] for m in container.get("volumeMounts", [])]
        for key, value in ours.items():
            if key.endswith("_FILE") and not any(
                value.startswith(m.rstrip("/") + "/") for m in mounted
            ):
                problems.append(f"{service}: {key}={value} is not on a mounted volume")
            if key.endswith("_PATH") and not any(
                value.startswith(m.rstrip("/") + "/") for m in mounts
            ):
                problems.append(f"{service}: {key}={value} is not on a writable volume")
    return problems


def executor_problems(docs: list[Doc]) -> list[str]:
    """Replicas resume each other's runs: distinct instance ids, one shared PostgreSQL."""
    _, container = service_container(docs, "executor")
    env = container_env(docs, container)
    problems = []
    instance = env.get("TRELLIS_INSTANCE_ID")
    if getattr(instance, "source", None) != ("field", "metadata.name"):
        problems.append("executor: TRELLIS_INSTANCE_ID is not the pod name (fieldRef)")
    for service in ("executor", "costs"):
        _, container = service_container(docs, service)
        url = container_env(docs, container).get("TRELLIS_DATABASE_URL", "")
        if getattr(url, "source", ("",))[0] != "secret":
            problems.append(f"{service}: TRELLIS_DATABASE_URL does not come from a Secret")
        if not url.startswith(("postgresql://", "postgres://")):
            problems.append(f"{service}: TRELLIS_DATABASE_URL is not PostgreSQL")
    return problems


def _service_port(docs: list[Doc], host: str, port: int) -> str | None:
    """Why host:port does not reach a Service of the overlay (None when it does)."""
    name = host.split(".")[0]
    service = of_kind(docs, "Service").get(name)
    if service is None:
        return f"no Service {name}"
    if port not in {p["port"] for p in service["spec"]["ports"]}:
        return f"Service {name} has no port {port}"
    return None


def wiring_problems(docs: list[Doc]) -> list[str]:
    """Targets reach the headless Services; in dev every URL reaches a Service of the overlay."""
    problems = []
    deployments = of_kind(docs, "Deployment")
    dev = bool(deployments.keys() & {"postgres", "redis", "jaeger", "offline-model"})
    for service, _, container in trellis_containers(docs):
        env = container_env(docs, container)
        for key, value in env.items():
            if key.endswith("_TARGET") and key.startswith("TRELLIS_"):
                match = re.fullmatch(r"dns:///([a-z0-9.-]+):(\d+)", value)
                if match is None:
                    problems.append(f"{service}: {key}={value} is not dns:///host:port")
                    continue
                host, port = match[1], int(match[2])
                why = _service_port(docs, host, port)
                headless = of_kind(docs, "Service").get(host.split(".")[0], {})
                if why or headless.get("spec", {}).get("clusterIP") != "None":
                    problems.append(f"{service}: {key} does not reach a headless Service ({why})")
            is_url = key in ("OPENAI_BASE_URL", "OTEL_EXPORTER_OTLP_ENDPOINT") or key.endswith(
                ("_DATABASE_URL", "_REDIS_URL")
            )
            if dev and is_url and value:
                parts = urlsplit(value)
                why = _service_port(docs, parts.hostname or "", parts.port or 0)
                if why:
                    problems.append(f"{service}: {key}={value}: {why}")
    if "postgres" in deployments:
        postgres = pod_spec(deployments["postgres"])["containers"][0]
        pg = container_env(docs, postgres)
        _, executor = service_container(docs, "executor")
        url = urlsplit(container_env(docs, executor)["TRELLIS_DATABASE_URL"])
        given = (url.username, url.password, url.path.lstrip("/"))
        if given != (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"]):
            problems.append("dev: TRELLIS_DATABASE_URL credentials differ from PostgreSQL's")
    return problems


def backend_problems(docs: list[Doc], overlay: str) -> list[str]:
    """Production runs no Redis/PostgreSQL/Jaeger/Prometheus; dev runs each, .env's version."""
    problems = []
    pins = dot_env()
    running: dict[str, str] = {}
    for doc in docs:
        if doc["kind"] not in WORKLOADS:
            continue
        spec = doc["spec"]
        while "template" in spec or "jobTemplate" in spec:
            spec = (spec.get("template") or spec["jobTemplate"])["spec"]
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            name, _ = image_of(container["image"])
            running[name.split("docker.io/")[-1].removeprefix("library/")] = container["image"]
            if name == "trellis" and container["image"] != pins["TRELLIS_IMAGE"]:
                problems.append(
                    f"{container['image']} is not TRELLIS_IMAGE {pins['TRELLIS_IMAGE']}"
                )
    for image, pin in BACKENDS.items():
        if overlay == "production" and image in running:
            problems.append(f"production runs {running[image]}: it must use an existing install")
        if overlay == "dev":
            if image not in running:
                problems.append(f"dev does not run {image}")
            elif running[image] != pins[pin]:
                problems.append(f"dev runs {running[image]}, .env pins {pin}={pins[pin]}")
    if overlay == "dev" and "trellis-offline-model" not in {
        (c.get("command") or [""])[0] for _, _, c in trellis_containers(docs)
    }:
        problems.append("dev does not run the offline model")
    return problems


def namespace_problems(docs: list[Doc], overlay: str) -> list[str]:
    want = NAMESPACES[overlay]
    problems = []
    if want not in of_kind(docs, "Namespace"):
        problems.append(f"no Namespace {want}")
    for doc in docs:
        if doc["kind"] != "Namespace" and doc["metadata"].get("namespace") != want:
            problems.append(f"{doc['kind']}/{doc['metadata']['name']} is not in {want}")
    return problems


# -- the tests ------------------------------------------------------------------------


def test_every_document_is_valid_kubernetes(docs: list[Doc]) -> None:
    assert docs
    assert schema_problems(docs) == []


def test_grpc_services_have_native_grpc_probes_on_their_grpc_port(docs: list[Doc]) -> None:
    assert probe_problems(docs) == []


def test_termination_grace_outlasts_prestop_and_server_grace(docs: list[Doc]) -> None:
    assert grace_problems(docs) == []


def test_every_container_has_requests_and_limits(docs: list[Doc]) -> None:
    assert resource_problems(docs) == []


def test_every_pod_is_non_root_read_only_and_unprivileged(docs: list[Doc]) -> None:
    assert security_problems(docs) == []


def test_grpc_services_are_headless_and_scraped(docs: list[Doc]) -> None:
    assert service_problems(docs) == []


def test_executor_toolgateway_and_costs_autoscale(docs: list[Doc]) -> None:
    assert autoscaling_problems(docs) == []


def test_production_runs_every_service_on_two_pods_or_more() -> None:
    assert redundancy_problems(render("production")) == []
    # dev is a laptop cluster: one pod each is fine there.
    assert redundancy_problems(render("dev"))


def test_multi_replica_services_have_disruption_budgets(docs: list[Doc]) -> None:
    assert disruption_problems(docs) == []


def test_every_setting_is_read_and_accepted_by_its_service(docs: list[Doc], tmp_path: Path) -> None:
    assert settings_problems(docs, tmp_path) == []


def test_executor_replicas_share_postgres_under_distinct_ids(docs: list[Doc]) -> None:
    assert executor_problems(docs) == []


def test_targets_and_urls_reach_services(docs: list[Doc]) -> None:
    assert wiring_problems(docs) == []


def test_backends_are_existing_installs_in_production_and_bundled_in_dev(
    docs: list[Doc], overlay: str
) -> None:
    assert backend_problems(docs, overlay) == []


def test_everything_is_in_the_overlay_namespace(docs: list[Doc], overlay: str) -> None:
    assert namespace_problems(docs, overlay) == []


def test_production_ships_no_secret_values() -> None:
    docs = render("production")
    assert of_kind(docs, "Secret") == {}
    keys = {
        ref["key"]
        for _, _, c in trellis_containers(docs)
        for item in c.get("env", [])
        if (ref := item.get("valueFrom", {}).get("secretKeyRef")) and ref["name"] == EXTERNAL_SECRET
    }
    assert keys == set(EXTERNAL_SECRET_EXAMPLE), "deploy/k8s/README.md lists these keys"
    assert set(EXTERNAL_SECRET_EXAMPLE) <= set(
        re.findall(r"--from-literal=(\w+)=", (K8S / "README.md").read_text())
    )


def test_dev_prometheus_scrapes_the_compose_jobs_with_the_shared_rules() -> None:
    docs = render("dev")
    config_map = generated(docs, "ConfigMap", "prometheus-config")
    assert config_map is not None
    rules = (REPO / "deploy/prometheus/rules/trellis-alerts.yml").read_text()
    assert config_map["data"]["trellis-alerts.yml"] == rules, (
        "deploy/k8s/overlays/dev/prometheus/rules/trellis-alerts.yml must be a copy of "
        "deploy/prometheus/rules/trellis-alerts.yml"
    )
    dev = yaml.safe_load(config_map["data"]["prometheus.yml"])
    compose = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in dev["scrape_configs"]}
    assert set(jobs) == {j["job_name"] for j in compose["scrape_configs"]}
    assert dev["rule_files"] == compose["rule_files"]
    for name in GRPC_SERVICES:
        (sd,) = jobs[name]["dns_sd_configs"]
        _, container = service_container(docs, name)
        assert (sd["names"], sd["type"], sd["port"]) == (
            [name],
            "A",
            port_named(container, "metrics"),
        )
    mounted = pod_spec(of_kind(docs, "Deployment")["prometheus"])["volumes"]
    items = {
        i["key"]: i["path"] for v in mounted if "configMap" in v for i in v["configMap"]["items"]
    }
    assert items == {
        "prometheus.yml": "prometheus.yml",
        "trellis-alerts.yml": "rules/trellis-alerts.yml",
    }


def test_promtool_accepts_the_dev_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (`make system-deps`, or apt-get install prometheus)")
    config = K8S / "overlays/dev/prometheus/prometheus.yml"
    done = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- the checks catch what they should ------------------------------------------------


def _deployment(docs: list[Doc], name: str) -> Doc:
    return of_kind(docs, "Deployment")[name]


def _container(docs: list[Doc], name: str) -> Doc:
    return pod_spec(_deployment(docs, name))["containers"][0]


def _env(docs: list[Doc], name: str, key: str, value: str) -> None:
    _container(docs, name)["env"].append({"name": key, "value": value})


def _drop(docs: list[Doc], kind: str, name: str) -> None:
    docs[:] = [d for d in docs if not (d["kind"] == kind and d["metadata"]["name"] == name)]


def _config(docs: list[Doc], key: str, value: str) -> None:
    generated(docs, "ConfigMap", "trellis-config")["data"][key] = value  # type: ignore[index]


BREAKAGES: dict[str, tuple[Callable[[list[Doc]], None], Check]] = {
    "misspelt field": (
        lambda d: _container(d, "planner").update(readinessprobe={}),
        schema_problems,
    ),
    "string where an integer goes": (
        lambda d: _deployment(d, "cache")["spec"].update(replicas="two"),
        schema_problems,
    ),
    "no liveness probe": (
        lambda d: _container(d, "costs").pop("livenessProbe"),
        probe_problems,
    ),
    "exec readiness probe": (
        lambda d: _container(d, "executor").update(
            readinessProbe={"exec": {"command": ["trellis-probe"]}}
        ),
        probe_problems,
    ),
    "probe on the metrics port": (
        lambda d: _container(d, "planner")["livenessProbe"].update(grpc={"port": 9102}),
        probe_problems,
    ),
    "grace as long as the server's": (
        lambda d: pod_spec(_deployment(d, "executor")).update(terminationGracePeriodSeconds=25),
        grace_problems,
    ),
    "server grace raised": (
        lambda d: _config(d, "TRELLIS_GRACE_SECONDS", "40"),
        grace_problems,
    ),
    "no limits": (
        lambda d: _container(d, "toolgateway")["resources"].pop("limits"),
        resource_problems,
    ),
    "writable root": (
        lambda d: _container(d, "cache")["securityContext"].update(readOnlyRootFilesystem=False),
        security_problems,
    ),
    "runs as root": (
        lambda d: _container(d, "costs")["securityContext"].update(runAsUser=0),
        security_problems,
    ),
    "capability added": (
        lambda d: _container(d, "executor")["securityContext"]["capabilities"].update(
            add=["NET_ADMIN"]
        ),
        security_problems,
    ),
    "ClusterIP Service": (
        lambda d: of_kind(d, "Service")["planner"]["spec"].pop("clusterIP"),
        service_problems,
    ),
    "gRPC port without appProtocol": (
        lambda d: of_kind(d, "Service")["executor"]["spec"]["ports"][0].pop("appProtocol"),
        service_problems,
    ),
    "no toolgateway HPA": (
        lambda d: _drop(d, "HorizontalPodAutoscaler", "toolgateway"),
        autoscaling_problems,
    ),
    "no executor PDB": (
        lambda d: _drop(d, "PodDisruptionBudget", "executor"),
        disruption_problems,
    ),
    "no costs HPA": (
        lambda d: _drop(d, "HorizontalPodAutoscaler", "costs"),
        autoscaling_problems,
    ),
    "no costs PDB": (
        lambda d: _drop(d, "PodDisruptionBudget", "costs"),
        disruption_problems,
    ),
    "costs back to one replica": (
        lambda d: (
            _drop(d, "HorizontalPodAutoscaler", "costs"),
            _deployment(d, "costs")["spec"].update(replicas=1),
        ),
        redundancy_problems,
    ),
    "setting of another service": (
        lambda d: _env(d, "cache", "TRELLIS_MODEL", "gpt-4o"),
        lambda d: settings_problems(d, Path("/tmp")),
    ),
    "misspelt setting": (
        lambda d: _env(d, "executor", "TRELLIS_LEASE_SECONDZ", "10"),
        lambda d: settings_problems(d, Path("/tmp")),
    ),
    "value the settings refuse": (
        lambda d: _config(d, "TRELLIS_LOG_LEVEL", "loud"),
        lambda d: settings_problems(d, Path("/tmp")),
    ),
    "outbox on the read-only root": (
        lambda d: _env(d, "planner", "TRELLIS_OUTBOX_PATH", "/opt/outbox.db"),
        lambda d: settings_problems(d, Path("/tmp")),
    ),
    "fixed instance id": (
        lambda d: _env(d, "executor", "TRELLIS_INSTANCE_ID", "executor"),
        executor_problems,
    ),
    "target without dns:///": (
        lambda d: _config(d, "TRELLIS_PLANNER_TARGET", "planner:50052"),
        wiring_problems,
    ),
    "target on a wrong port": (
        lambda d: _config(d, "TRELLIS_COSTS_TARGET", "dns:///costs:50051"),
        wiring_problems,
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_checks_catch_a_broken_overlay(breakage: str) -> None:
    mutate, check = BREAKAGES[breakage]
    docs = render("production")
    assert check(copy.deepcopy(docs)) == []
    mutate(docs)
    assert check(docs), f"{breakage}: not caught"


def test_checks_catch_backends_in_production_and_missing_ones_in_dev() -> None:
    production, dev = render("production"), render("dev")
    assert backend_problems([*production, _deployment(dev, "redis")], "production")
    _drop(dev, "Deployment", "jaeger")
    assert backend_problems(dev, "dev")
    dev = render("dev")
    _container(dev, "postgres")["image"] = "postgres:15-alpine"
    assert backend_problems(dev, "dev")
    dev = render("dev")
    _drop(dev, "Service", "offline-model")
    assert wiring_problems(dev)
