"""Settings: defaults, precedence, OTLP endpoint rules, value parsing and the errors users see."""

import random

import pytest
from opentelemetry.environment_variables import OTEL_METRICS_EXPORTER, OTEL_TRACES_EXPORTER
from opentelemetry.sdk import environment_variables as sdk_env
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

from otel_ebpf import config
from otel_ebpf.config import ProbeSpec, Settings, load_settings, parse_probes
from otel_ebpf.errors import UserError

ENDPOINT = sdk_env.OTEL_EXPORTER_OTLP_ENDPOINT
TRACES_ENDPOINT = sdk_env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
METRICS_ENDPOINT = sdk_env.OTEL_EXPORTER_OTLP_METRICS_ENDPOINT
SAMPLER, SAMPLER_ARG = sdk_env.OTEL_TRACES_SAMPLER, sdk_env.OTEL_TRACES_SAMPLER_ARG
PROTOCOL = sdk_env.OTEL_EXPORTER_OTLP_PROTOCOL
INSECURE = sdk_env.OTEL_EXPORTER_OTLP_INSECURE


def test_defaults_ignore_unrelated_variables():
    settings = load_settings({"PATH": "/usr/bin", "OTEL_SOMETHING_ELSE": "x"})
    assert settings == Settings()
    assert settings.probes == [] and settings.pids == () and settings.service_name is None
    assert (settings.traces_exporters, settings.metrics_exporters) == (("console",), ())
    for otlp, signal in ((settings.otlp, "traces"), (settings.otlp_metrics, "metrics")):
        assert (otlp.signal, otlp.protocol, otlp.endpoint) == (signal, "http/protobuf", f"http://localhost:4318/v1/{signal}")
        assert (otlp.timeout_s, otlp.compression, otlp.headers) == (10.0, "none", {})
    assert (settings.sampler.name, settings.sampler.ratio) == ("parentbased_always_on", 1.0)
    assert (settings.bsp_schedule_delay_s, settings.bsp_export_timeout_s) == (5.0, 30.0)
    assert (settings.bsp_max_export_batch_size, settings.bsp_max_queue_size) == (4096, 16384)
    assert (settings.metric_export_interval_s, settings.metric_export_timeout_s) == (60.0, 30.0)
    assert (settings.max_depth, settings.max_threads, settings.ring_buffer_size) == (32, 16384, 8 << 20)
    assert settings.min_duration_ns == 0


def test_arguments_beat_environment():
    env = {config.OTEL_EBPF_PID: "abc", sdk_env.OTEL_SERVICE_NAME: "from-env", config.OTEL_EBPF_PROBES: "no-colon"}
    settings = load_settings(env, pids=(42,), service_name="from-cli", probes=[ProbeSpec("x", ("y",))])
    assert (settings.pids, settings.service_name) == ((42,), "from-cli")
    assert settings.probes == [ProbeSpec("x", ("y",))]


def test_none_argument_means_not_given():
    assert load_settings({config.OTEL_EBPF_PID: "7"}, pids=None).pids == (7,)
    assert load_settings({config.OTEL_EBPF_PID: "7, 9,7"}).pids == (7, 9)


def test_unknown_argument_is_a_programming_error():
    with pytest.raises(TypeError, match="colour"):
        load_settings({}, colour="red")


@pytest.mark.parametrize("signal, group, other_group", [("traces", "otlp", "otlp_metrics"),
                                                      ("metrics", "otlp_metrics", "otlp")])
@pytest.mark.parametrize(
    "suffix, field, specific_value, generic_value, expected",
    [
        ("PROTOCOL", "protocol", "grpc", "http/protobuf", "grpc"),
        ("HEADERS", "headers", "a=1", "b=2", {"a": "1"}),
        ("TIMEOUT", "timeout_s", "2500", "100", 2.5),
        ("COMPRESSION", "compression", "gzip", "none", "gzip"),
    ],
)
def test_signal_variable_beats_generic_one(signal, group, other_group, suffix, field, specific_value,
                                           generic_value, expected):
    specific, generic = f"OTEL_EXPORTER_OTLP_{signal.upper()}_{suffix}", f"OTEL_EXPORTER_OTLP_{suffix}"
    both = load_settings({specific: specific_value, generic: generic_value})
    generic_only = load_settings({specific: "", generic: specific_value})
    assert getattr(getattr(both, group), field) == expected
    assert getattr(getattr(both, other_group), field) != expected, "the other signal takes the generic value"
    assert getattr(getattr(generic_only, group), field) == expected, "an empty variable counts as unset"
    assert getattr(getattr(generic_only, other_group), field) == expected


@pytest.mark.parametrize(
    "env, endpoint, insecure",
    [
        ({}, "http://localhost:4318/v1/traces", True),
        ({PROTOCOL: "grpc"}, "http://localhost:4317", True),
        ({ENDPOINT: "http://collector:4318"}, "http://collector:4318/v1/traces", True),
        ({ENDPOINT: "https://collector/base/"}, "https://collector/base/v1/traces", False),
        ({TRACES_ENDPOINT: "http://c:4318/custom/", ENDPOINT: "http://ignored"}, "http://c:4318/custom/", True),
        ({PROTOCOL: "GRPC", ENDPOINT: "https://collector:4317/"}, "https://collector:4317/", False),
        ({PROTOCOL: "grpc", TRACES_ENDPOINT: "collector:4317"}, "collector:4317", False),
        ({PROTOCOL: "grpc", ENDPOINT: "collector:4317", INSECURE: "TRUE"}, "collector:4317", True),
        ({PROTOCOL: "grpc", ENDPOINT: "https://collector:4317", INSECURE: "true"}, "https://collector:4317", False),
    ],
)
def test_endpoint_and_insecure(env, endpoint, insecure):
    otlp = load_settings(env).otlp
    assert (otlp.endpoint, otlp.insecure) == (endpoint, insecure)


@pytest.mark.parametrize(
    "env, endpoint",
    [
        ({}, "http://localhost:4318/v1/metrics"),
        ({PROTOCOL: "grpc"}, "http://localhost:4317"),
        ({ENDPOINT: "http://collector:4318/"}, "http://collector:4318/v1/metrics"),
        ({PROTOCOL: "grpc", ENDPOINT: "http://collector:4317"}, "http://collector:4317"),
        ({METRICS_ENDPOINT: "http://c:9090/custom", ENDPOINT: "http://ignored"}, "http://c:9090/custom"),
        ({TRACES_ENDPOINT: "http://traces-only:4318/v1/traces"}, "http://localhost:4318/v1/metrics"),
        ({sdk_env.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: "grpc"}, "http://localhost:4318/v1/metrics"),
    ],
)
def test_metrics_endpoint(env, endpoint):
    assert load_settings(env).otlp_metrics.endpoint == endpoint


def test_headers_are_percent_decoded_with_lower_case_names():
    env = {sdk_env.OTEL_EXPORTER_OTLP_HEADERS: "Authorization=Basic%20dXNlcg%3D%3D , X-Tenant = a%2Cb+c,,"}
    assert load_settings(env).otlp.headers == {"authorization": "Basic dXNlcg==", "x-tenant": "a,b+c"}


def test_resource_attributes_are_percent_decoded_keeping_key_case():
    env = {sdk_env.OTEL_RESOURCE_ATTRIBUTES: "service.namespace=shop, Team%3DX=a%20b,empty="}
    assert load_settings(env).resource_attributes == {"service.namespace": "shop", "Team=X": "a b", "empty": ""}


@pytest.mark.parametrize(
    "env, exporters",
    [
        ({}, ("console",)),
        ({ENDPOINT: ""}, ("console",)),
        ({ENDPOINT: "http://collector:4318"}, ("otlp",)),
        ({TRACES_ENDPOINT: "http://collector:4318/v1/traces"}, ("otlp",)),
        ({OTEL_TRACES_EXPORTER: "none", ENDPOINT: "http://collector:4318"}, ()),
        ({OTEL_TRACES_EXPORTER: "Console, otlp,otlp"}, ("console", "otlp")),
    ],
)
def test_exporter_default_rule(env, exporters):
    assert load_settings(env).traces_exporters == exporters


@pytest.mark.parametrize(
    "env, exporters",
    [
        ({}, ()),
        ({ENDPOINT: "http://collector:4318"}, ("otlp",)),
        ({METRICS_ENDPOINT: "http://collector:4318/v1/metrics"}, ("otlp",)),
        ({TRACES_ENDPOINT: "http://collector:4318/v1/traces"}, ()),
        ({OTEL_METRICS_EXPORTER: "none", ENDPOINT: "http://collector:4318"}, ()),
        ({OTEL_METRICS_EXPORTER: "console"}, ("console",)),
    ],
)
def test_metrics_exporter_default_rule_never_picks_the_console(env, exporters):
    assert load_settings(env).metrics_exporters == exporters


@pytest.mark.parametrize(
    "env, parent_based, sample_all, bound",
    [
        ({}, True, True, 2**64 - 1),
        ({SAMPLER: "always_on", SAMPLER_ARG: "0.5"}, False, True, 2**64 - 1),
        ({SAMPLER: "Always_Off"}, False, False, 0),
        ({SAMPLER: "parentbased_always_off"}, True, False, 0),
        ({SAMPLER: "traceidratio"}, False, True, 2**64 - 1),
        ({SAMPLER: "traceidratio", SAMPLER_ARG: "0.25"}, False, False, 2**62),
        ({SAMPLER: "parentbased_traceidratio", SAMPLER_ARG: "0"}, True, False, 0),
        ({SAMPLER: "parentbased_traceidratio", SAMPLER_ARG: "1e-3"}, True, False, round(1e-3 * 2**64)),
    ],
)
def test_sampler(env, parent_based, sample_all, bound):
    sampler = load_settings(env).sampler
    assert (sampler.parent_based, sampler.sample_all, sampler.bound) == (parent_based, sample_all, bound)
    assert 0 <= sampler.bound < 2**64, "the kernel compares 64-bit numbers"


@pytest.mark.parametrize("ratio", [0.0, 1e-6, 0.1, 0.5, 0.999, 1.0])
def test_sampler_decides_like_the_sdk_trace_id_ratio_sampler(ratio):
    sampler = load_settings({SAMPLER: "traceidratio", SAMPLER_ARG: str(ratio)}).sampler
    sdk = TraceIdRatioBased(ratio)
    rng = random.Random(ratio)
    edges = [0, 2**64 - 1, 2**128 - 1, sdk.bound - 1, sdk.bound]
    trace_ids = [rng.getrandbits(128) for _ in range(2000)] + [edge for edge in edges if 0 <= edge < 2**64]
    for trace_id in trace_ids:
        lower_64 = int.from_bytes(trace_id.to_bytes(16, "big")[8:], "big")  # what the kernel reads
        ours = sampler.sample_all or lower_64 < sampler.bound
        assert ours == sdk.should_sample(None, trace_id, "f").decision.is_sampled(), hex(trace_id)


@pytest.mark.parametrize("text, expected", [("true", True), ("FALSE", False), ("", True)])
@pytest.mark.parametrize("variable, field", [(config.OTEL_EBPF_HTTP, "http"), (config.OTEL_EBPF_TLS, "tls")])
def test_http_and_tls_switches(variable, field, text, expected):
    assert getattr(load_settings({variable: text}), field) is expected


@pytest.mark.parametrize(
    "text, nanoseconds",
    [("0", 0), ("2ms", 2_000_000), ("500us", 500_000), ("500 µs", 500_000), ("1.5s", 1_500_000_000),
     ("250ns", 250), ("3", 3_000_000), (".5MS", 500_000), ("0.0001", 100)],
)
def test_min_duration(text, nanoseconds):
    assert load_settings({config.OTEL_EBPF_MIN_DURATION: text}).min_duration_ns == nanoseconds


@pytest.mark.parametrize(
    "variable, value, field, expected",
    [
        (sdk_env.OTEL_BSP_SCHEDULE_DELAY, "250", "bsp_schedule_delay_s", 0.25),
        (sdk_env.OTEL_BSP_EXPORT_TIMEOUT, "1500.5", "bsp_export_timeout_s", 1.5005),
        (sdk_env.OTEL_BSP_MAX_QUEUE_SIZE, " 4096 ", "bsp_max_queue_size", 4096),
        (sdk_env.OTEL_METRIC_EXPORT_INTERVAL, "15000", "metric_export_interval_s", 15.0),
        (sdk_env.OTEL_METRIC_EXPORT_TIMEOUT, "500", "metric_export_timeout_s", 0.5),
        (config.OTEL_EBPF_MAX_DEPTH, "128", "max_depth", 128),
        (config.OTEL_EBPF_MAX_THREADS, "64", "max_threads", 64),
        (config.OTEL_EBPF_RING_BUFFER_SIZE, "64k", "ring_buffer_size", 65536),
        (config.OTEL_EBPF_RING_BUFFER_SIZE, "16M", "ring_buffer_size", 16 << 20),
        (config.OTEL_EBPF_RING_BUFFER_SIZE, "4096", "ring_buffer_size", 4096),
        (config.OTEL_EBPF_PROBES, "app:main", "probes", [ProbeSpec("app", ("main",))]),
    ],
)
def test_values_are_converted(variable, value, field, expected):
    assert getattr(load_settings({variable: value}), field) == expected


def test_certificate_files_that_exist_are_accepted(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert load_settings({sdk_env.OTEL_EXPORTER_OTLP_CERTIFICATE: str(ca)}).otlp.certificate == str(ca)


@pytest.mark.parametrize(
    "variable, value, reason",
    [
        (config.OTEL_EBPF_PID, "abc", "not a process id"),
        (config.OTEL_EBPF_PID, "0", "not a process id"),
        (config.OTEL_EBPF_MAX_DEPTH, "129", "less than or equal to 128"),
        (config.OTEL_EBPF_MAX_THREADS, "63", "greater than or equal to 64"),
        (config.OTEL_EBPF_RING_BUFFER_SIZE, "5000", "nearest valid value is 4K"),
        (config.OTEL_EBPF_RING_BUFFER_SIZE, "7M", "nearest valid value is 8M"),
        (config.OTEL_EBPF_RING_BUFFER_SIZE, "8G", "suffix K or M"),
        (config.OTEL_EBPF_PROBES, "app", "no ':'"),
        (sdk_env.OTEL_EXPORTER_OTLP_PROTOCOL, "http/json", "use http/protobuf"),
        (sdk_env.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, "udp", "'grpc' or 'http/protobuf'"),
        (sdk_env.OTEL_EXPORTER_OTLP_COMPRESSION, "zstd", "'gzip' or 'none'"),
        (sdk_env.OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, "soon", "milliseconds"),
        (sdk_env.OTEL_EXPORTER_OTLP_TIMEOUT, "-5", "greater than 0"),
        (sdk_env.OTEL_BSP_SCHEDULE_DELAY, "nan", "finite"),
        (sdk_env.OTEL_BSP_MAX_QUEUE_SIZE, "0", "greater than 0"),
        (OTEL_TRACES_EXPORTER, "otlp,jaeger", "otlp, console, none"),
        (sdk_env.OTEL_EXPORTER_OTLP_HEADERS, "a=1,novalue", "'novalue' is not key=value"),
        (sdk_env.OTEL_RESOURCE_ATTRIBUTES, "=v", "not key=value"),
        (INSECURE, "yes", "true or false"),
        (sdk_env.OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE, "/nonexistent/ca.pem", "no such file"),
        (sdk_env.OTEL_EXPORTER_OTLP_CLIENT_KEY, "/nonexistent/key.pem", "no such file"),
        (ENDPOINT, "collector:4318", "http:// or https://"),
        (TRACES_ENDPOINT, "ftp://collector/v1/traces", "http:// or https://"),
        (METRICS_ENDPOINT, "collector:4318", "http:// or https://"),
        (sdk_env.OTEL_EXPORTER_OTLP_METRICS_PROTOCOL, "http/json", "use http/protobuf"),
        (sdk_env.OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE, "/nonexistent/ca.pem", "no such file"),
        (OTEL_METRICS_EXPORTER, "prometheus", "otlp, console, none"),
        (sdk_env.OTEL_METRIC_EXPORT_INTERVAL, "0", "greater than 0"),
        (sdk_env.OTEL_METRIC_EXPORT_TIMEOUT, "later", "milliseconds"),
        (SAMPLER, "sometimes", "'parentbased_traceidratio'"),
        (SAMPLER, "jaeger_remote", "'always_on'"),
        (SAMPLER_ARG, "half", "a number from 0 to 1"),
        (SAMPLER_ARG, "1.5", "less than or equal to 1"),
        (SAMPLER_ARG, "-0.1", "greater than or equal to 0"),
        (SAMPLER_ARG, "nan", "finite"),
        (config.OTEL_EBPF_MIN_DURATION, "2 hours", "such as 2ms, 500us"),
        (config.OTEL_EBPF_MIN_DURATION, "-1ms", "a bare number is milliseconds"),
        (config.OTEL_EBPF_HTTP, "maybe", "true or false"),
        (config.OTEL_EBPF_TLS, "yes please", "true or false"),
    ],
)
def test_invalid_values_name_variable_and_value(variable, value, reason):
    with pytest.raises(UserError) as caught:
        load_settings({variable: value})
    assert variable in str(caught.value) and repr(value) in str(caught.value)
    assert reason in str(caught.value)
    assert caught.value.hint


def test_grpc_endpoint_with_other_scheme_is_rejected():
    with pytest.raises(UserError, match=f"{ENDPOINT}='unix://sock'.*scheme must be http or https"):
        load_settings({PROTOCOL: "grpc", ENDPOINT: "unix://sock"})


def test_batch_larger_than_queue_is_rejected():
    env = {sdk_env.OTEL_BSP_MAX_EXPORT_BATCH_SIZE: "1000", sdk_env.OTEL_BSP_MAX_QUEUE_SIZE: "100"}
    with pytest.raises(UserError, match="OTEL_BSP_MAX_EXPORT_BATCH_SIZE=1000 is larger than OTEL_BSP_MAX_QUEUE_SIZE=100"):
        load_settings(env)


def test_invalid_argument_names_the_argument():
    with pytest.raises(UserError, match="pids.0=-3 is invalid"):
        load_settings({}, pids=(-3,))


def test_settings_doc_lists_every_variable_once():
    names = [name for name, _, _ in config.SETTINGS_DOC]
    assert len(names) == len(set(names)) == 57
    assert (config.OTEL_EBPF_RING_BUFFER_SIZE, "8M") in [row[:2] for row in config.SETTINGS_DOC]
    assert (SAMPLER, "parentbased_always_on") in [row[:2] for row in config.SETTINGS_DOC]
    assert all(meaning for _, _, meaning in config.SETTINGS_DOC)


def test_otel_variable_names_are_the_specifications():
    """OTLP variable names are built per signal; the SDK lists the names the specification defines."""
    ours = {name for name, _, _ in config.SETTINGS_DOC if name.startswith("OTEL_") and "EBPF" not in name}
    known = {value for name, value in vars(sdk_env).items() if name.startswith("OTEL_")}
    known |= {OTEL_TRACES_EXPORTER, OTEL_METRICS_EXPORTER}
    assert ours - known == set()
    otlp = {name for name in ours if name.startswith("OTEL_EXPORTER_OTLP_")}
    assert {name for name in otlp if "_METRICS_" in name} == {name.replace("_TRACES_", "_METRICS_")
                                                             for name in otlp if "_TRACES_" in name}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", []),
        (" ; ;", []),
        ("/usr/bin/app:main", [ProbeSpec("/usr/bin/app", ("main",))]),
        (" app : a , b ;; libc.so.6:malloc;", [ProbeSpec("app", ("a", "b")), ProbeSpec("libc.so.6", ("malloc",))]),
        ("app:ns::Cls::method,_ZN2ns3Cls6methodEv", [ProbeSpec("app", ("ns::Cls::method", "_ZN2ns3Cls6methodEv"))]),
        ("app:f(int, char),g", [ProbeSpec("app", ("f(int, char)", "g"))]),
        (
            "app:std::map<int, int>::find(int const&),v<std::pair<int, int>>::at,f[abi:cxx11](int, int)",
            [ProbeSpec("app", ("std::map<int, int>::find(int const&)", "v<std::pair<int, int>>::at",
                               "f[abi:cxx11](int, int)"))],
        ),
        (
            "app:A::operator<(A const&, A const&),operator<<(std::ostream&, A),A::operator()(int, int),A::operator->",
            [ProbeSpec("app", ("A::operator<(A const&, A const&)", "operator<<(std::ostream&, A)",
                               "A::operator()(int, int)", "A::operator->"))],
        ),
    ],
)
def test_parse_probes(text, expected):
    assert parse_probes(text) == expected


@pytest.mark.parametrize(
    "text, reason",
    [
        ("app", "has no ':'"),
        ("app:main;lib.so", "'lib.so' has no ':'"),
        (":main", "names no binary"),
        ("std::map<int, int>::find", "names no binary"),
        ("app:", "names no symbols"),
        ("app: , ,", "names no symbols"),
        ("app:f(int", "unbalanced brackets"),
        ("app:f)(", "unbalanced brackets"),
        ("app:v<int]>", "unbalanced brackets"),
        ("app:my_operator<int", "unbalanced brackets"),
    ],
)
def test_parse_probes_errors_name_the_source(text, reason):
    with pytest.raises(UserError) as caught:
        parse_probes(text, source="--probe")
    assert str(caught.value).startswith("--probe: ") and reason in str(caught.value)
    assert caught.value.hint
