"""The demo's wiring (docker-compose.yml + Dockerfile), checked without a Docker
daemon: a broken demo is usually a typo in a path, a port or a service name."""

from pathlib import Path
from urllib.parse import urlsplit

import yaml
from elftools.elf.elffile import ELFFile

from otel_ebpf.config import load_settings
from tests.ground_truth import EXAMPLES_DIR, build_examples

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SIDECAR = SERVICES["otel-ebpf"]
OTLP_PORTS = {"http/protobuf": 4318, "grpc": 4317}
LEAST_PRIVILEGE = ["BPF", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"]
HOST_MOUNTS = ("/sys/kernel/tracing", "/lib/modules", "/usr/src")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each Dockerfile instruction, continuations joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            instructions.append((keyword.upper(), " ".join(args.split())))
    return instructions


def environment(service: dict) -> dict[str, str]:
    """A service's environment, whichever of compose's two syntaxes it uses."""
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def container_ports(service: dict) -> set[int]:
    return {int(str(port).split(":")[-1].split("/")[0]) for port in service.get("ports", [])}


def sidecar_settings():
    """What `otel-ebpf run` makes of the sidecar's environment, and nothing else."""
    return load_settings(environment(SIDECAR))


def probes() -> dict[str, tuple[str, ...]]:
    return {spec.binary: spec.symbols for spec in sidecar_settings().probes}


def image_workdir() -> str:
    workdirs = [args for keyword, args in dockerfile_instructions() if keyword == "WORKDIR"]
    assert workdirs, "Dockerfile sets no WORKDIR"
    return workdirs[-1]


def function_symbols(path: Path) -> set[str]:
    with path.open("rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        return {
            sym.name
            for sym in symtab.iter_symbols()
            if sym["st_info"]["type"] == "STT_FUNC" and sym["st_shndx"] != "SHN_UNDEF"
        }


def test_three_services():
    assert set(SERVICES) == {"jaeger", "example", "otel-ebpf"}


def test_jaeger_accepts_otlp_and_shows_ui():
    jaeger = SERVICES["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert environment(jaeger)["COLLECTOR_OTLP_ENABLED"] == "true"
    assert {16686, 4317, 4318} <= container_ports(jaeger)


def test_sidecar_is_unprivileged_in_the_example_pid_namespace():
    """Exactly the capabilities README's "Least-privilege deployment" names; test_cli.py traces with them."""
    assert "privileged" not in SIDECAR and "security_opt" not in SIDECAR  # seccomp and AppArmor stay on
    assert SIDECAR["cap_drop"] == ["ALL"]
    assert sorted(SIDECAR["cap_add"]) == LEAST_PRIVILEGE
    assert SIDECAR["read_only"] is True
    assert SIDECAR["pid"] == "service:example"
    assert set(SIDECAR["depends_on"]) == {"jaeger", "example"}


def test_sidecar_is_configured_by_environment_only():
    assert SIDECAR["command"] in ("run", ["run"])
    assert "entrypoint" not in SIDECAR
    assert "env_file" not in SIDECAR
    env = environment(SIDECAR)
    assert {"OTEL_EBPF_PROBES", "OTEL_SERVICE_NAME", "OTEL_EXPORTER_OTLP_ENDPOINT"} <= set(env)


def test_sidecar_settings_load_and_name_the_demo_probes():
    settings = sidecar_settings()
    assert settings.service_name == "nested"
    assert settings.pids == (), "each run of the example is a new process"
    assert {binary.rsplit("/", 1)[1]: set(symbols) for binary, symbols in probes().items()} == {
        "nested": {"handle_request", "parse_request", "compute", "fib"},
        "libgreet.so": {"greet"},
        "httpserver": {"handle_request", "parse_query", "compute", "render"},
    }


def test_sidecar_exports_to_the_jaeger_service():
    settings = sidecar_settings()
    assert settings.traces_exporters == ("otlp",)
    endpoint = urlsplit(settings.otlp.endpoint)
    assert endpoint.scheme == "http"
    assert endpoint.hostname == "jaeger"
    assert endpoint.port == OTLP_PORTS[settings.otlp.protocol]
    assert endpoint.port in container_ports(SERVICES["jaeger"])


def test_sidecar_runs_the_example_image():
    """Probes attach to inodes: the sidecar must see the example's own files."""
    example = SERVICES["example"]
    assert SIDECAR["image"] == example["image"]
    assert SIDECAR.get("build") == example.get("build") == "."
    assert ("ENTRYPOINT", '["otel-ebpf"]') in dockerfile_instructions()
    # The image's entrypoint is the tracer, so the example must replace it.
    assert example["entrypoint"] == ["sh", "-c"]


def test_sidecar_mounts_what_bcc_needs_read_only():
    """tracefs for the tracepoints (debugfs is not needed), the host's kernel headers for the compiler."""
    volumes = {}
    for volume in SIDECAR["volumes"]:
        source, target, mode = volume.split(":")
        volumes[target] = (source, mode)
    assert volumes == {path: (path, "ro") for path in HOST_MOUNTS}


def test_image_builds_the_examples_where_the_probes_look():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "debian:12-slim")
    assert ("COPY", "examples/ examples/") in instructions
    assert ("RUN", "make -C examples") in instructions
    workdir = image_workdir()
    example_command = " ".join(SERVICES["example"]["command"])
    assert example_command.startswith(workdir + "/examples/")
    script = (ROOT / Path(example_command).relative_to(workdir)).read_text()
    for binary in probes():
        assert binary.startswith(workdir + "/examples/build/"), binary
        if not binary.endswith(".so"):
            assert Path(binary).name in script, f"the example container never runs {binary}"


def test_client_exports_to_jaeger_and_server_has_its_own_service_name():
    """One trace in Jaeger: the SDK client's spans and otel-ebpf's, under two services."""
    env = environment(SERVICES["example"])
    assert urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"]).hostname == "jaeger"
    script = (ROOT / "examples" / "demo.sh").read_text()
    assert "OTEL_SERVICE_NAME=web-server" in script and "OTEL_SERVICE_NAME=http-client" in script
    assert "/opt/otel-ebpf/bin/python" in script


def test_probed_functions_exist_in_the_built_examples():
    build_examples()
    workdir = image_workdir()
    for binary, symbols in probes().items():
        built = EXAMPLES_DIR.parent / Path(binary).relative_to(workdir)
        assert built.is_file(), f"{binary}: make -C examples does not build {built}"
        assert set(symbols) <= function_symbols(built), binary


def test_the_readme_walk_through_matches_the_compose_file_and_make_demo_points_to_it():
    """What the README says the demo runs is what docker-compose.yml and demo.sh run; make demo's last line
    gives the same command."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Jaeger with docker compose"):readme.index("## Privileges")]
    for service in COMPOSE["services"]:
        assert f"`{service}`" in section, service
    script = (ROOT / "examples" / "demo.sh").read_text()
    for program in ("httpserver\" 8080", "http_client.py", "nested\" 2 3", "OTEL_SERVICE_NAME=web-server",
                    "OTEL_SERVICE_NAME=http-client"):
        assert program in script, program
    for shown in ("examples/build/httpserver", "examples/http_client.py", "examples/build/nested 2 3", "web-server",
                  "http-client", "OTEL_SERVICE_NAME=nested", "http://jaeger:4318", "16686"):
        assert shown in section, shown
    assert environment(COMPOSE["services"]["otel-ebpf"])["OTEL_SERVICE_NAME"] == "nested"
    assert environment(COMPOSE["services"]["otel-ebpf"])["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    makefile = (ROOT / "Makefile").read_text()
    demo = makefile[makefile.index("\ndemo:"):makefile.index("\ntest:")]
    assert "docker compose up --build" in demo and "docker compose up --build" in section
