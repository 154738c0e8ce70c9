"""deploy/daemonset.yaml and deploy/gateway-collector.yaml, checked without a cluster: one least-privileged agent
per node discovering processes by path pattern, a gateway that names their pods by what the agents send
(tests/e2e/test_backends.py validates the gateway configuration with the built Collector)."""

from urllib.parse import urlsplit

import yaml

from otel_ebpf.config import load_settings
from otel_ebpf.processes import ProcessInfo, ProcessRegistry
from tests.unit.test_compose import HOST_MOUNTS, LEAST_PRIVILEGE, ROOT

DOCUMENTS = list(yaml.safe_load_all((ROOT / "deploy" / "daemonset.yaml").read_text()))
BY_KIND_NAME = {(doc["kind"], doc["metadata"]["name"]): doc for doc in DOCUMENTS}
AGENT = BY_KIND_NAME[("DaemonSet", "otel-ebpf")]["spec"]["template"]["spec"]
[AGENT_CONTAINER] = AGENT["containers"]
GATEWAY = BY_KIND_NAME[("Deployment", "otel-gateway")]["spec"]["template"]["spec"]
GATEWAY_CONFIG = yaml.safe_load((ROOT / "deploy" / "gateway-collector.yaml").read_text())


def environment(container: dict) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container["env"]}


def test_the_documents_of_an_agent_per_node_and_a_gateway():
    assert sorted(BY_KIND_NAME) == [
        ("ClusterRole", "otel-gateway"), ("ClusterRoleBinding", "otel-gateway"), ("DaemonSet", "otel-ebpf"),
        ("Deployment", "otel-gateway"), ("Service", "otel-gateway"), ("ServiceAccount", "otel-ebpf"),
        ("ServiceAccount", "otel-gateway")]
    assert {doc["metadata"].get("namespace", "observability") for doc in DOCUMENTS} == {"observability"}


def test_agent_sees_every_process_with_least_privilege_and_no_api_access():
    assert AGENT["hostPID"] is True
    assert AGENT["tolerations"] == [{"operator": "Exists"}]
    assert AGENT["automountServiceAccountToken"] is False and "ClusterRole" not in {
        kind for (kind, name) in BY_KIND_NAME if name == "otel-ebpf"}
    context = AGENT_CONTAINER["securityContext"]
    assert context["privileged"] is False and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"], "add": LEAST_PRIVILEGE}
    assert context["readOnlyRootFilesystem"] is True
    assert AGENT_CONTAINER["args"] == ["run"]
    resources = AGENT_CONTAINER["resources"]
    assert set(resources) == {"requests", "limits"} and all(set(r) == {"cpu", "memory"} for r in resources.values())


def test_agent_mounts_the_host_read_only_except_its_spool():
    mounts = {m["mountPath"]: m for m in AGENT_CONTAINER["volumeMounts"]}
    volumes = {v["name"]: v["hostPath"] for v in AGENT["volumes"]}
    for path in HOST_MOUNTS:
        assert mounts[path]["readOnly"] is True and volumes[mounts[path]["name"]]["path"] == path
    spool = environment(AGENT_CONTAINER)["OTEL_EBPF_SPOOL_DIR"]
    assert not mounts[spool].get("readOnly") and volumes[mounts[spool]["name"]]["type"] == "DirectoryOrCreate"
    assert set(mounts) == {*HOST_MOUNTS, spool}


def test_agent_settings_discover_by_pattern_and_export_to_the_gateway(monkeypatch):
    env = environment(AGENT_CONTAINER)
    for name, value in env.items():
        if value is not None and name.startswith("OTEL_"):
            monkeypatch.setenv(name, value.replace("$(K8S_NODE_NAME)", "node-1"))
    settings = load_settings()
    assert settings.probes and all(spec.is_pattern for spec in settings.probes)
    assert settings.resource_attributes == {"k8s.node.name": "node-1"}
    node = next(item for item in AGENT_CONTAINER["env"] if item["name"] == "K8S_NODE_NAME")
    assert node["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    endpoint = urlsplit(settings.otlp.endpoint)
    service = BY_KIND_NAME[("Service", "otel-gateway")]
    assert endpoint.hostname == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert settings.otlp.protocol == "grpc"
    assert endpoint.port in {port["port"] for port in service["spec"]["ports"]}
    receiver = GATEWAY_CONFIG["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert receiver == f"0.0.0.0:{endpoint.port}"


def test_gateway_associates_pods_by_what_the_agent_sends():
    """By k8s.pod.uid or container.id, as processes.py reads them from the cgroup: not by the connection."""
    processor = GATEWAY_CONFIG["processors"]["k8s_attributes"]
    sources = [source for rule in processor["pod_association"] for source in rule["sources"]]
    assert all(source["from"] == "resource_attribute" for source in sources)
    names = [source["name"] for source in sources]
    assert names == ["k8s.pod.uid", "container.id"]
    info = ProcessInfo(1, "/bin/server", ("server",), container_id="ab" * 32,
                       pod_uid="0f3b4c1e-9a2d-4e6f-8b7a-1c2d3e4f5a6b")
    assert set(names) <= set(ProcessRegistry(None, {}).resource_attributes(info))
    assert GATEWAY_CONFIG["service"]["pipelines"]["traces"]["processors"] == ["memory_limiter", "k8s_attributes"]


def test_gateway_reads_its_configuration_and_the_pods_it_names():
    [container] = GATEWAY["containers"]
    [mount] = container["volumeMounts"]
    [volume] = GATEWAY["volumes"]
    assert container["args"] == [f"--config={mount['mountPath']}/config.yaml"]
    assert volume == {"name": mount["name"], "configMap": {"name": "otel-gateway"}}
    assert "create configmap otel-gateway --from-file=config.yaml=deploy/gateway-collector.yaml" in (
        ROOT / "deploy" / "daemonset.yaml").read_text()
    rules = BY_KIND_NAME[("ClusterRole", "otel-gateway")]["rules"]
    readable = {resource for rule in rules for resource in rule["resources"]}
    assert {"pods", "namespaces", "replicasets"} <= readable
    assert all(set(rule["verbs"]) == {"get", "watch", "list"} for rule in rules)
    binding = BY_KIND_NAME[("ClusterRoleBinding", "otel-gateway")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "otel-gateway", "namespace": "observability"}]
    assert GATEWAY["serviceAccountName"] == "otel-gateway"
