"""deploy/: the Kubernetes manifests and the Grafana dashboard say only true things.

Fast and without a vLLM engine: the manifests validate against the Kubernetes
schemas (kubernetes-validate, offline), the Deployment names only real settings
and real ``vllm serve`` flags, and every PromQL expression of the dashboard names
only series the plugin's metrics produce.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from prometheus_client import CollectorRegistry

from vllm_lora_hotswap.metrics import HotSwapMetrics
from vllm_lora_hotswap.settings import ENV_PREFIX, HotSwapSettings
from vllm_lora_hotswap.store.names import check_instance_id
from vllm_lora_hotswap.store.records import PHASES, SwapRecord

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
DASHBOARD = DEPLOY / "grafana" / "vllm-lora-hotswap.json"
# The oldest Kubernetes release the recipe is checked against, and the newest the validator knows.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def _one(kind: str) -> dict:
    found = [doc for _, doc in _documents() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/kubernetes, found {len(found)}"
    return found[0]


def _engine_container() -> dict:
    (container,) = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


# --- Kubernetes -------------------------------------------------------------------------------


def test_the_recipe_has_a_deployment_a_service_and_a_shared_volume_claim():
    kinds = sorted(doc["kind"] for _, doc in _documents())
    assert kinds == ["Deployment", "PersistentVolumeClaim", "Service"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schema(path: Path, version: str):
    # strict: a misspelt or misplaced field is an error, not an ignored extra
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)


def test_hotswap_env_vars_are_real_settings():
    fields = {ENV_PREFIX + name.upper() for name in HotSwapSettings.model_fields}
    names = [env["name"] for env in _engine_container()["env"]]
    hotswap = [name for name in names if name.startswith(ENV_PREFIX)]
    assert {f"{ENV_PREFIX}ROOT", f"{ENV_PREFIX}INSTANCE_ID"} <= set(hotswap)
    unknown = sorted(set(hotswap) - fields)
    assert not unknown, f"not settings fields (see settings.py): {unknown}"
    assert len(names) == len(set(names)), "an env var is set twice"


def test_hotswap_env_values_parse_as_settings():
    plain = {
        env["name"].removeprefix(ENV_PREFIX).lower(): env["value"]
        for env in _engine_container()["env"]
        if env["name"].startswith(ENV_PREFIX) and "value" in env
    }
    settings = HotSwapSettings.model_validate(plain)
    assert settings.active


def test_instance_id_is_the_pod_name_and_the_store_is_the_shared_volume():
    deployment = _one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _engine_container()
    env = {e["name"]: e for e in container["env"]}
    assert env["VLLM_HOTSWAP_INSTANCE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # a Deployment's pods are named <deployment>-<replicaset hash>-<5 chars>: a valid instance id
    check_instance_id(f"{deployment['metadata']['name']}-7d9f8b6c5d-x2x4k")

    root = env["VLLM_HOTSWAP_ROOT"]["value"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == root]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = _one("PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert not mount.get("readOnly", False)  # engines write their instance records there


def test_the_api_key_comes_from_a_secret_and_probes_hit_health_on_the_served_port():
    container = _engine_container()
    args = container["args"]
    env = {e["name"]: e for e in container["env"]}
    (key_arg,) = [a for a in args if a.startswith("--api-key")]
    variable = re.fullmatch(r"--api-key=\$\((\w+)\)", key_arg).group(1)
    assert "secretKeyRef" in env[variable]["valueFrom"]

    port = int(next(a for a in args if a.startswith("--port=")).split("=", 1)[1])
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] == "/health"
        assert named.get(http["port"], http["port"]) == port
    assert "nvidia.com/gpu" in container["resources"]["limits"]

    service = _one("Service")
    assert service["spec"]["selector"] == _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_the_deployment_runs_vllm_serve_with_flags_vllm_accepts():
    container = _engine_container()
    assert container["command"] == ["vllm", "serve"]
    args = container["args"]
    assert "--enable-lora" in args
    assert "--api-server-count=1" in args  # the swap pipeline runs in the one API server process
    pytest.importorskip("vllm")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    expanded = [re.sub(r"\$\(\w+\)", "secret", a) for a in args]  # the kubelet's $(VAR) expansion
    parsed, unknown = parser.parse_known_args(expanded)
    assert not unknown, f"vllm serve does not know {unknown}"
    flags = [a.split("=", 1)[0] for a in args if a.startswith("-")]
    inexact = [f for f in flags if f not in parser._option_string_actions]  # argparse takes prefixes
    assert not inexact, f"not vllm serve flags as spelt: {inexact}"
    assert parsed.enable_lora and parsed.api_key == ["secret"] and parsed.port == 8000


# --- Grafana ----------------------------------------------------------------------------------

# PromQL words that look like metric names: functions are caught by the "(" that follows them.
_PROMQL_WORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
    "atan2",
}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLES = re.compile(r"\$\{[^}]*\}|\$\w+")
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (label names, functions, keywords and
    Grafana variables left out)."""
    text = _VARIABLES.sub(" ", _STRINGS.sub('""', expr))
    text = _LABEL_LISTS.sub(" ", _RANGES.sub(" ", _MATCHERS.sub(" ", text)))
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _PROMQL_WORDS}


def exported_sample_names() -> set[str]:
    """Every sample name the plugin's metrics produce, driven through their public methods."""
    registry = CollectorRegistry()
    metrics = HotSwapMetrics(registry)
    timings = {phase: 0.01 for phase in PHASES}
    for result in ("served", "failed", "waiting"):
        metrics.swap("lora1", SwapRecord(version="v1", result=result, timings=timings))
    metrics.served("lora1", "v1")
    metrics.installed(2, 1024)
    metrics.weights("w1")
    return {sample.name for family in registry.collect() for sample in family.samples}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def _expressions(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)  # Grafana's, not PromQL
            exprs.append(match.group(1) if match else query)
    return exprs


def test_metric_name_extraction():
    assert metric_names(
        "histogram_quantile(0.95, sum by (phase, le) (rate(vllm_hotswap_phase_seconds_bucket"
        '{adapter=~"$adapter", instance="a:1"}[$__rate_interval])))'
    ) == {"vllm_hotswap_phase_seconds_bucket"}
    assert metric_names("a_total / on (instance) group_left (version) b == bool 1e3") == {"a_total", "b"}
    assert metric_names('count by (adapter) (count by (adapter, version) (x{y="z"} == 1))') == {"x"}
    assert metric_names("sum without (le) (rate(foo:bar[5m] offset 1h))") == {"foo:bar"}


def test_exported_sample_names_include_the_suffixes():
    names = exported_sample_names()
    assert {
        "vllm_hotswap_swaps_total",
        "vllm_hotswap_phase_seconds_bucket",
        "vllm_hotswap_phase_seconds_count",
        "vllm_hotswap_phase_seconds_sum",
        "vllm_hotswap_served_version",
        "vllm_hotswap_installed_versions",
        "vllm_hotswap_staged_bytes",
        "vllm_hotswap_weight_version",
    } <= names


def test_dashboard_queries_name_only_metrics_the_plugin_exports():
    exported = exported_sample_names()
    used: set[str] = set()
    for expr in _expressions(_dashboard()):
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{expr!r} names {sorted(unknown)}, which the plugin does not export"
        used |= names
    # every metric family the plugin exports is on the dashboard
    families = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in exported}
    shown = {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in used}
    assert families <= shown, f"not on the dashboard: {sorted(families - shown)}"


def test_dashboard_uses_a_prometheus_datasource_variable():
    dashboard = _dashboard()
    (datasource,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert datasource["query"] == "prometheus"
    reference = "${" + datasource["name"] + "}"
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == reference, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == reference, panel["title"]
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))
