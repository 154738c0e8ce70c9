"""deploy/kubernetes.yaml, checked without a cluster: the same sidecar as docker-compose.yml, as a Pod."""

from urllib.parse import urlsplit

import yaml

from otel_ebpf.config import load_settings
from tests.unit.test_compose import HOST_MOUNTS, LEAST_PRIVILEGE, ROOT, SERVICES, SIDECAR as COMPOSE_SIDECAR
from tests.unit.test_compose import environment as compose_environment

DOCUMENTS = {doc["kind"]: doc for doc in yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text())}
POD = DOCUMENTS["Pod"]["spec"]
CONTAINERS = {container["name"]: container for container in POD["containers"]}
SIDECAR = CONTAINERS["otel-ebpf"]


def environment(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def test_one_service_one_deployment_one_pod_of_two_containers():
    assert sorted(DOCUMENTS) == ["Deployment", "Pod", "Service"]
    assert set(CONTAINERS) == {"example", "otel-ebpf"}


def test_sidecar_shares_the_apps_process_namespace_and_image():
    """Uprobes attach to inodes: the sidecar runs the app's image to see the very files the app runs."""
    assert POD["shareProcessNamespace"] is True
    assert SIDECAR["image"] == CONTAINERS["example"]["image"] == COMPOSE_SIDECAR["image"]
    assert "command" not in SIDECAR and SIDECAR["args"] == ["run"]  # the image's entrypoint is otel-ebpf
    app, example = CONTAINERS["example"], SERVICES["example"]
    assert (app["command"], app["args"]) == (example["entrypoint"], example["command"])


def test_sidecar_has_the_compose_capabilities_and_nothing_else():
    context = SIDECAR["securityContext"]
    assert not context.get("privileged")
    assert context["capabilities"] == {"drop": ["ALL"], "add": LEAST_PRIVILEGE}
    assert sorted(COMPOSE_SIDECAR["cap_add"]) == LEAST_PRIVILEGE
    assert context["readOnlyRootFilesystem"] is True
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    # The API server refuses allowPrivilegeEscalation: false next to CAP_SYS_ADMIN, which makes it moot anyway.
    assert "allowPrivilegeEscalation" not in context
    assert "runAsNonRoot" not in context and "runAsUser" not in context, "tracefs belongs to root"


def test_sidecar_mounts_the_hosts_tracefs_and_headers_read_only():
    volumes = {volume["name"]: volume["hostPath"]["path"] for volume in POD["volumes"]}
    mounts = {mount["mountPath"]: (volumes[mount["name"]], mount["readOnly"]) for mount in SIDECAR["volumeMounts"]}
    assert mounts == {path: (path, True) for path in HOST_MOUNTS}
    assert all(volume["hostPath"]["type"] == "Directory" for volume in POD["volumes"])


def test_sidecar_is_configured_by_environment_only_as_in_compose():
    assert "envFrom" not in SIDECAR
    assert environment(SIDECAR) == compose_environment(COMPOSE_SIDECAR)
    assert load_settings(environment(SIDECAR)).probes


def test_sidecar_and_app_export_to_the_jaeger_service():
    service, deployment = DOCUMENTS["Service"], DOCUMENTS["Deployment"]
    assert deployment["spec"]["selector"]["matchLabels"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    ports = {port["port"] for port in service["spec"]["ports"]}
    jaeger = deployment["spec"]["template"]["spec"]["containers"][0]
    assert jaeger["image"] == SERVICES["jaeger"]["image"]
    assert environment(jaeger)["COLLECTOR_OTLP_ENABLED"] == "true"
    assert ports == {port["containerPort"] for port in jaeger["ports"]} == {16686, 4317, 4318}
    settings = load_settings(environment(SIDECAR))
    endpoint = urlsplit(settings.otlp.endpoint)
    assert (endpoint.hostname, endpoint.port) == (service["metadata"]["name"], 4318)
    app_endpoint = urlsplit(environment(CONTAINERS["example"])["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert app_endpoint.hostname == service["metadata"]["name"] and app_endpoint.port in ports


def test_the_grace_period_outlasts_the_sidecars_shutdown():
    """SIGKILL comes terminationGracePeriodSeconds (compose: stop_grace_period) after SIGTERM; the sidecar's whole
    shutdown, OTEL_EBPF_SHUTDOWN_TIMEOUT, must fit, with a few seconds for the interpreter to exit."""
    settings = load_settings(environment(SIDECAR))
    assert settings.shutdown_timeout_s + 3 <= POD["terminationGracePeriodSeconds"]
    assert COMPOSE_SIDECAR["stop_grace_period"] == f"{POD['terminationGracePeriodSeconds']}s"
