"""The deployment files under deploy/ checked against the code they deploy.

Static checks (no container engine or cluster here): every YAML and the Grafana JSON parse; every
``advdetect_*`` metric and label used by the alert rules, the dashboard and deploy/README.md is one the
service's :class:`~service.metrics.ServiceMetrics` exposes; every ``ADVDETECT_*`` variable is a setting
whose value :func:`~service.settings.load_settings` accepts; ports, paths, selectors and probes agree
across the Dockerfile, compose, Prometheus and Kubernetes. promtool (Debian's ``prometheus`` package)
checks the Prometheus config and rules, runs the rules' unit tests and parses every PromQL expression
of the dashboard and the README; without promtool those tests are skipped, or fail where
``ADVDETECT_REQUIRE_PROMETHEUS=1`` (``.ci/run`` sets it).
``deploy/healthcheck.py`` runs against real gRPC health servers, plaintext and TLS.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent import futures
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from service.metrics import STAGES, ServiceMetrics
from service.protocol import DETECTOR_METHODS, DETECTOR_SERVICE, OIP_METHODS
from service.settings import ENV_PREFIX, ServiceSettings, load_settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"

#: Labels Prometheus attaches to every scraped series (target labels), beside the metrics' own.
TARGET_LABELS = frozenset({"job", "instance"})
GRPC_CODES = frozenset(code.name for code in grpc.StatusCode)
#: Allowed values of the labels whose values PromQL selects on.
LABEL_VALUES = {
    "method": frozenset(DETECTOR_METHODS + OIP_METHODS),
    "stage": frozenset(STAGES),
    "code": GRPC_CODES,
}
MODEL_PATH = "/models/model.onnx"
BASELINE_PATH = "/models/baseline"

_METRIC = re.compile(r"(?<![A-Za-z0-9_:])advdetect_[A-Za-z0-9_]+")
_SELECTOR = re.compile(r"(?<![A-Za-z0-9_:])(advdetect_[A-Za-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_PROMQL_BLOCK = re.compile(r"```promql\n(.*?)```", re.S)


# -- what the service exposes ------------------------------------------------------------------------

@lru_cache(maxsize=1)
def exposed() -> tuple[dict[str, frozenset[str]], frozenset[str]]:
    """Sample names exposed by ServiceMetrics with the label names of each, and the histogram family names.

    Every series is created first (all methods, codes, stages, two flags, ten classes, a baseline), so
    histograms show ``_bucket`` (with ``le``), ``_sum`` and ``_count`` and counters ``_total``.
    """
    metrics = ServiceMetrics(CollectorRegistry())
    metrics.touch(methods=DETECTOR_METHODS + OIP_METHODS, flags=("adversarial", "likely_misclassified"),
                  predicted_classes=range(10))
    metrics.set_baseline("test-version", "0" * 64)
    samples: dict[str, set[str]] = {}
    histograms = set()
    for family in metrics.registry.collect():
        if family.type == "histogram":
            histograms.add(family.name)
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in samples.items()}, frozenset(histograms)


def all_metric_labels() -> frozenset[str]:
    samples, _ = exposed()
    return frozenset().union(*samples.values()) | TARGET_LABELS


# -- file loading -----------------------------------------------------------------------------------

def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


@lru_cache(maxsize=1)
def k8s_objects() -> tuple[tuple[str, dict], ...]:
    """(file name, object) for every document of every YAML file in deploy/k8s/ except kustomization."""
    objects = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        with path.open(encoding="utf-8") as handle:
            for doc in yaml.safe_load_all(handle):
                if doc is not None:
                    objects.append((path.name, doc))
    return tuple(objects)


def k8s(kind: str, name: str | None = None) -> dict:
    found = [o for _, o in k8s_objects() if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def rule_groups() -> list[dict]:
    return load_yaml(PROMETHEUS / "rules.yml")["groups"]


def rules() -> list[dict]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads((GRAFANA / "advdetect.json").read_text(encoding="utf-8"))


def dashboard_targets() -> list[tuple[str, dict]]:
    return [(panel["title"], target) for panel in dashboard()["panels"] for target in panel.get("targets", [])]


def readme_promql() -> list[str]:
    return [block.strip() for block in _PROMQL_BLOCK.findall((DEPLOY / "README.md").read_text(encoding="utf-8"))]


def grafana_to_promql(expr: str) -> str:
    """Replace the dashboard's variables by values Prometheus can parse."""
    replaced = (expr.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$instance", ".*")
                .replace("$method", "Detect|DetectStream|ModelInfer"))
    assert "$" not in replaced, f"unknown Grafana variable left in {replaced!r}"
    return replaced


def all_promql() -> list[tuple[str, str]]:
    """(where, expression) for every PromQL expression shipped: rules, dashboard, README."""
    exprs = [(f"rules.yml {r.get('record') or r.get('alert')}", r["expr"]) for r in rules()]
    exprs += [(f"dashboard panel {title!r}", grafana_to_promql(t["expr"])) for title, t in dashboard_targets()]
    exprs += [(f"README block {i}", e) for i, e in enumerate(readme_promql())]
    return exprs


def parse_dockerfile(path: Path) -> list[tuple[int, str, str]]:
    """(stage index, INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[int, str, str]] = []
    stage = -1
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append((stage, keyword, args.strip()))
    assert not pending, "Dockerfile ends in a line continuation"
    return instructions


def dockerfile_env(instructions: list[tuple[int, str, str]], stage: int) -> dict[str, str]:
    env: dict[str, str] = {}
    for s, keyword, args in instructions:
        if s == stage and keyword == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def interpolate_compose(value: str) -> str:
    """Resolve compose's ``${VAR:-default}`` to the default (the value with no variable set)."""
    resolved = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", value)
    assert "$" not in resolved, f"compose value {value!r} has a variable without a default"
    return resolved


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity ('512Mi', '1Gi', '64M', '1000') in bytes."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(quantity))
    assert match, f"unsupported quantity {quantity!r}"
    factor = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9,
              "T": 10**12}[match.group(2)]
    return int(match.group(1)) * factor


def validated_settings(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ServiceSettings:
    """Load ServiceSettings from ``env`` (ADVDETECT_* variables) through the real environment source.

    The model and baseline are stand-in files under ``tmp_path``; a path-valued setting (the audit log)
    is checked to be absolute and then moved under ``tmp_path`` with the same file name, since its
    container folder does not exist here.
    """
    model = tmp_path / "model.onnx"
    model.write_bytes(b"stand-in")
    (tmp_path / "baseline").mkdir(exist_ok=True)
    fields = ServiceSettings.model_fields
    for key, value in env.items():
        assert key.startswith(ENV_PREFIX), key
        field = key[len(ENV_PREFIX):].lower()
        assert field in fields, f"{key} is not a setting of ServiceSettings (fields: {sorted(fields)})"
        if field.endswith("_path") and value:
            assert PurePosixPath(value).is_absolute(), f"{key}={value!r} should be an absolute container path"
            local = tmp_path / "paths" / field / PurePosixPath(value).name
            local.parent.mkdir(parents=True, exist_ok=True)
            value = str(local)
        monkeypatch.setenv(key, value)
    return load_settings(model_path=model, baseline_path=tmp_path / "baseline")


# -- promtool ---------------------------------------------------------------------------------------

def run_promtool(promtool: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_promtool_checks_the_prometheus_config_and_its_rule_file(promtool: str) -> None:
    result = run_promtool(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    # The config's rule_files were found and checked too (relative to the config file).
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_checks_the_rules_and_the_operator_copy(promtool: str, tmp_path: Path) -> None:
    result = run_promtool(promtool, "check", "rules", str(PROMETHEUS / "rules.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    copy = tmp_path / "prometheusrule_groups.yml"
    copy.write_text(yaml.safe_dump({"groups": k8s("PrometheusRule")["spec"]["groups"]}))
    result = run_promtool(promtool, "check", "rules", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_every_alert_pass(promtool: str) -> None:
    result = run_promtool(promtool, "test", "rules", "rules_test.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    tested = {case["alertname"] for test in load_yaml(PROMETHEUS / "rules_test.yml")["tests"]
              for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert alerts == tested, f"alerts without a firing test case: {sorted(alerts - tested)}"


def test_every_dashboard_and_readme_expression_parses_with_promtool(promtool: str, tmp_path: Path) -> None:
    exprs = [(where, e) for where, e in all_promql() if not where.startswith("rules.yml")]
    assert len(readme_promql()) >= 8 and len(exprs) > len(readme_promql())
    checked = {"groups": [{"name": "shipped_expressions", "rules": [
        {"record": f"check:expression_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)]}]}
    path = tmp_path / "expressions.yml"
    path.write_text(yaml.safe_dump(checked))
    result = run_promtool(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr + "\n" + "\n".join(f"{i}: {w}" for i, (w, _) in enumerate(exprs))
    # The same check rejects a broken expression, so passing means the expressions parsed.
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump({"groups": [{"name": "b", "rules": [
        {"record": "check:broken", "expr": "sum by (flag (rate(advdetect_flags_total[5m]))"}]}]}))
    assert run_promtool(promtool, "check", "rules", str(broken)).returncode != 0


# -- metric names and labels ------------------------------------------------------------------------

def test_exposed_metric_names_have_the_expected_suffixes() -> None:
    samples, histograms = exposed()
    assert {"advdetect_requests_total", "advdetect_inputs_total", "advdetect_flags_total"} <= set(samples)
    for name in histograms:
        assert {f"{name}_bucket", f"{name}_sum", f"{name}_count"} <= set(samples)
        assert "le" in samples[f"{name}_bucket"]
    assert samples["advdetect_flags_total"] >= {"flag", "predicted_class"}
    assert samples["advdetect_baseline_info"] >= {"version", "model_sha256"}


@pytest.mark.parametrize("path", [
    PROMETHEUS / "rules.yml", PROMETHEUS / "rules_test.yml", GRAFANA / "advdetect.json", DEPLOY / "README.md",
    K8S / "prometheusrule.yaml",
], ids=lambda p: p.name)
def test_every_advdetect_metric_named_in_a_file_exists(path: Path) -> None:
    samples, histograms = exposed()
    text = path.read_text(encoding="utf-8")
    names = set(_METRIC.findall(text))
    assert names, f"{path.name} names no advdetect_* metric"
    # Prose may name a histogram by its family name; everything else must be a sample name.
    unknown = names - set(samples) - set(histograms)
    assert not unknown, f"{path.name} uses metrics the service does not expose: {sorted(unknown)}"


def test_promql_uses_only_exposed_samples_labels_and_label_values() -> None:
    samples, _ = exposed()
    known_labels = all_metric_labels() | {"le"}
    checked = 0
    for where, expr in all_promql():
        unknown = set(_METRIC.findall(expr)) - set(samples)
        assert not unknown, f"{where}: not exposed (a histogram is queried by _bucket/_sum/_count): {sorted(unknown)}"
        for metric, matchers in _SELECTOR.findall(expr):
            for label, op, value in _MATCHER.findall(matchers):
                assert label in samples[metric] | TARGET_LABELS, f"{where}: {metric} has no label {label!r}"
                if label in LABEL_VALUES and op in ("=", "=~") and not value.startswith("$"):
                    values = set(value.split("|")) if op == "=~" else {value}
                    assert values <= LABEL_VALUES[label], (
                        f"{where}: {label} values {sorted(values - LABEL_VALUES[label])} never occur"
                    )
                checked += 1
        for group in _GROUPING.findall(expr):
            for label in filter(None, (part.strip() for part in group.split(","))):
                assert label in known_labels, f"{where}: groups by {label!r}, which no advdetect metric carries"
    assert checked >= 20


def test_templates_refer_to_labels_the_series_carry() -> None:
    known = all_metric_labels()
    for rule in rules():
        for text in rule.get("annotations", {}).values():
            for label in re.findall(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)", text):
                assert label in known, f"{rule['alert']}: annotation uses $labels.{label}"
    for title, target in dashboard_targets():
        for label in re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", target.get("legendFormat", "")):
            assert label in known, f"panel {title!r}: legend uses {{{{{label}}}}}"


# -- alert rules ------------------------------------------------------------------------------------

def test_rules_cover_the_four_required_alerts() -> None:
    by_name = {rule["alert"]: rule for rule in rules() if "alert" in rule}
    recorded = {rule["record"]: rule["expr"] for rule in rules() if "record" in rule}
    for rule in by_name.values():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert {"summary", "description"} <= set(rule["annotations"])
        assert "for" in rule
    # Flag-rate spike: the flagged fraction against its own earlier level (offset window).
    spike = by_name["AdvDetectFlagRateSpike"]["expr"]
    assert "advdetect:flag_ratio:rate5m" in spike and "avg_over_time(advdetect:flag_ratio:rate5m[" in spike
    assert "offset" in spike
    assert "advdetect_flags_total" in recorded["advdetect:flags:rate5m"]
    assert "advdetect_inputs_total" in recorded["advdetect:inputs:rate5m"]
    # Population anomaly, error ratio, p99 latency from the histogram buckets.
    assert "advdetect_population_anomaly_score" in by_name["AdvDetectPopulationAnomaly"]["expr"]
    assert "advdetect:server_error_ratio:rate5m" in by_name["AdvDetectErrorRatioHigh"]["expr"]
    assert "advdetect_requests_total" in recorded["advdetect:server_error_ratio:rate5m"]
    assert "advdetect:request_duration_seconds:p99_5m" in by_name["AdvDetectLatencyP99High"]["expr"]
    p99 = recorded["advdetect:request_duration_seconds:p99_5m"]
    assert "histogram_quantile(0.99" in p99 and "advdetect_request_duration_seconds_bucket" in p99
    assert re.search(r"sum by \([^)]*\ble\b", p99), "buckets must be summed by le before the quantile"


def test_every_alert_is_explained_in_the_readme() -> None:
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Alerts", 1)[1]
    for rule in rules():
        if "alert" in rule:
            assert f"`{rule['alert']}`" in section, f"{rule['alert']} is not in README's Alerts table"


def test_operator_rules_are_the_same_groups_as_rules_yml() -> None:
    assert k8s("PrometheusRule")["spec"]["groups"] == rule_groups()


# -- Dockerfile -------------------------------------------------------------------------------------

def test_dockerfile_is_multistage_slim_non_root_without_torch() -> None:
    instructions = parse_dockerfile(DEPLOY / "Dockerfile")
    froms = [(s, args) for s, keyword, args in instructions if keyword == "FROM"]
    assert len(froms) >= 2
    args = {}
    for s, keyword, value in instructions:
        if keyword == "ARG" and s == -1 and "=" in value:
            key, _, default = value.partition("=")
            args[key] = default
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], a.split()[0]) for _, a in froms]
    assert all(re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", b) for b in bases), bases
    assert len(set(bases)) == 1, "the builder's virtualenv is copied: both stages need the same Python"
    assert re.search(r"\bAS builder\b", froms[0][1], re.I)
    final = froms[-1][0]

    users = [a for s, k, a in instructions if s == final and k == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    if user.isdigit():
        assert int(user) > 0

    pip_installs = [a for _, k, a in instructions if k == "RUN" and "pip install" in a]
    assert pip_installs, "the builder installs nothing"
    for command in pip_installs:
        assert "torch" not in command.split("&&")[0]
        install = command.split("pip install", 1)[1].split("&&")[0].split()
        targets = [t for t in install if not t.startswith("-")]
        assert targets == ["."], f"install the project without extras (torch is in [offline]): {targets}"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    runtime = [re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower() for dep in pyproject["project"]["dependencies"]]
    assert "torch" not in runtime
    assert any(dep.startswith("torch") for dep in pyproject["project"]["optional-dependencies"]["offline"])
    assert "advdetect" in pyproject["project"]["scripts"]

    copies_from_builder = [a for s, k, a in instructions if s == final and k == "COPY" and "--from=builder" in a]
    assert any("/opt/venv" in a for a in copies_from_builder)
    assert not [a for s, k, a in instructions if s == final and k == "RUN" and "pip install" in a]


def test_dockerfile_healthcheck_ports_command_and_settings(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    instructions = parse_dockerfile(DEPLOY / "Dockerfile")
    final = max(s for s, _, _ in instructions)
    final_stage = [(k, a) for s, k, a in instructions if s == final]

    healthchecks = [a for k, a in final_stage if k == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    command = json.loads(healthchecks[0].split("CMD", 1)[1].strip())
    script = next(part for part in command if part.endswith("healthcheck.py"))
    copies = [a.split() for k, a in final_stage if k == "COPY" and "--from" not in a]
    assert ["deploy/healthcheck.py", script] in copies
    assert (REPO / "deploy" / "healthcheck.py").is_file()

    env = dockerfile_env(instructions, final)
    assert "/opt/venv/bin" in env["PATH"].split(":")
    settings_env = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    settings = validated_settings(settings_env, tmp_path, clean_env)
    exposed_ports = {int(p.split("/")[0]) for k, a in final_stage if k == "EXPOSE" for p in a.split()}
    assert exposed_ports == {settings.grpc_port, settings.metrics_port, settings.health_port} == {50051, 9100, 50052}
    assert healthcheck_module()._DEFAULT_HEALTH_PORT == settings.health_port  # the port HEALTHCHECK asks

    entrypoint = json.loads(next(a for k, a in final_stage if k == "ENTRYPOINT"))
    cmd = json.loads(next(a for k, a in final_stage if k == "CMD"))
    argv = entrypoint + cmd
    assert argv[:2] == ["advdetect", "serve"]
    assert argv[argv.index("--model") + 1] == MODEL_PATH
    assert argv[argv.index("--baseline") + 1] == BASELINE_PATH
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert MODEL_PATH in readme and f"{BASELINE_PATH}/" in readme


def test_dockerignore_lets_every_copied_source_in() -> None:
    instructions = parse_dockerfile(DEPLOY / "Dockerfile")
    sources = []
    for _, keyword, args in instructions:
        if keyword == "COPY" and "--from" not in args:
            sources += args.split()[:-1]
    ignore = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "**", "the ignore file should start from nothing and let sources in"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for source in sources:
        assert (REPO / source).exists(), f"COPY source {source} does not exist"
        assert source.rstrip("/") in allowed, f"COPY source {source} is excluded by Dockerfile.dockerignore"


# -- compose, Prometheus, Grafana -------------------------------------------------------------------

def test_compose_services_ports_mounts_and_settings(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"advdetect", "prometheus", "grafana"}

    app = services["advdetect"]
    assert (DEPLOY / app["build"]["context"] / app["build"]["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()
    env = {k: interpolate_compose(str(v)) for k, v in app["environment"].items()}
    settings = validated_settings(env, tmp_path, clean_env)
    published = {int(p.rsplit(":", 1)[1]) for p in app["ports"]}
    assert published == {settings.grpc_port, settings.metrics_port}
    for port in app["ports"] + services["prometheus"]["ports"] + services["grafana"]["ports"]:
        assert port.startswith("127.0.0.1:"), f"{port} is published on every interface"
    mounts = {m["target"]: m for m in app["volumes"]}
    for target in (MODEL_PATH, BASELINE_PATH):
        assert mounts[target]["type"] == "bind" and mounts[target]["read_only"] is True
    audit_dir = str(PurePosixPath(env["ADVDETECT_AUDIT_LOG_PATH"]).parent)
    assert mounts[audit_dir]["type"] == "volume" and mounts[audit_dir]["source"] in compose["volumes"]
    assert app["read_only"] is True and "/tmp" in app["tmpfs"]
    grace = int(re.fullmatch(r"(\d+)s", app["stop_grace_period"]).group(1))
    assert grace > settings.grace_period_s

    # Prometheus: config and rules mounted side by side, scraping the service's metrics port.
    prom = services["prometheus"]
    prom_mounts = {}
    for volume in prom["volumes"]:
        source, target, *_ = volume.split(":")
        prom_mounts[target] = source
    config_target = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    assert (DEPLOY / prom_mounts[config_target]).resolve() == (PROMETHEUS / "prometheus.yml").resolve()
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    for rule_file in config["rule_files"]:
        target = str(PurePosixPath(config_target).parent / rule_file)
        assert (DEPLOY / prom_mounts[target]).resolve() == (PROMETHEUS / rule_file).resolve()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs["advdetect"]["static_configs"] for t in sc["targets"]]
    assert targets == [f"advdetect:{settings.metrics_port}"]
    assert jobs["advdetect"].get("metrics_path", "/metrics") == "/metrics"
    assert any('up{job="advdetect"}' in rule["expr"] for rule in rules() if "alert" in rule)

    # Grafana: provisioning folders, dashboard folder of the provider, data source of the dashboard.
    graf = services["grafana"]
    graf_mounts = {}
    for volume in graf["volumes"]:
        source, target, *_ = volume.split(":")
        graf_mounts[target] = source
    for kind in ("datasources", "dashboards"):
        source = graf_mounts[f"/etc/grafana/provisioning/{kind}"]
        assert (DEPLOY / source).resolve() == (GRAFANA / "provisioning" / kind).resolve()
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "advdetect.yml")["providers"][0]
    dashboard_target = next(t for t, s in graf_mounts.items() if s.endswith("advdetect.json"))
    assert (DEPLOY / graf_mounts[dashboard_target]).resolve() == (GRAFANA / "advdetect.json").resolve()
    assert str(PurePosixPath(dashboard_target).parent) == provider["options"]["path"]
    assert graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == dashboard_target
    datasource = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    prom_port = int(prom["ports"][0].rsplit(":", 1)[1])
    assert datasource["url"] == f"http://prometheus:{prom_port}" and datasource["type"] == "prometheus"
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == datasource["uid"]


def test_dashboard_panels_cover_the_required_views() -> None:
    board = dashboard()
    assert board["uid"] == "advdetect" and board["panels"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"].strip()
    exprs = [target["expr"] for _, target in dashboard_targets()]

    def some(pattern: str) -> bool:
        return any(re.search(pattern, e, re.S) for e in exprs)

    assert some(r"sum by \(flag\) \(rate\(advdetect_flags_total"), "flag rate by kind"
    assert some(r"sum by \(flag, predicted_class\) \(rate\(advdetect_flags_total"), "flag rate by kind and class"
    assert some(r"rate\(advdetect_requests_total"), "request rate"
    for q in ("0.5", "0.9", "0.99"):
        assert some(rf"histogram_quantile\({q}, sum by \(le\) \(rate\(advdetect_request_duration_seconds_bucket"), q
    assert some(r"histogram_quantile\(.*advdetect_stage_duration_seconds_bucket"), "stage latency"
    assert some(r"advdetect_population_anomaly_score"), "population anomaly score"
    assert some(r"advdetect_inflight_requests"), "in-flight"


# -- Kubernetes -------------------------------------------------------------------------------------

def test_k8s_objects_have_the_expected_kinds_and_api_versions() -> None:
    api = {
        "ConfigMap": "v1", "Service": "v1", "PersistentVolumeClaim": "v1", "Deployment": "apps/v1",
        "HorizontalPodAutoscaler": "autoscaling/v2", "PodDisruptionBudget": "policy/v1",
        "ServiceMonitor": "monitoring.coreos.com/v1", "PrometheusRule": "monitoring.coreos.com/v1",
        "ServingRuntime": "serving.kserve.io/v1alpha1", "InferenceService": "serving.kserve.io/v1beta1",
    }
    objects = [o for _, o in k8s_objects()]
    assert {o["kind"] for o in objects} == set(api)
    for obj in objects:
        assert obj["apiVersion"] == api[obj["kind"]], obj["kind"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
    kustomization = load_yaml(K8S / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file()
    kinds_applied = {o["kind"] for f, o in k8s_objects() if f in kustomization["resources"]}
    assert {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds_applied


def _check_container_security(container: dict, where: str) -> None:
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True, where
    assert sc["allowPrivilegeEscalation"] is False, where
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0, where
    assert sc["capabilities"]["drop"] == ["ALL"], where
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{where}: resources.{kind}"


def _check_grpc_probes(container: dict, port: int, where: str, probes: tuple[str, ...]) -> None:
    for probe_name in probes:
        probe = container[probe_name]
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, f"{where}: {probe_name}"
        assert probe["grpc"]["port"] == port, f"{where}: {probe_name} probes port {probe['grpc']['port']}, not {port}"
        assert probe["grpc"].get("service", "") in {"", DETECTOR_SERVICE}, f"{where}: {probe_name}"
    assert container["readinessProbe"]["grpc"]["service"] == DETECTOR_SERVICE


def test_deployment_probes_security_volumes_and_settings(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    deployment = k8s("Deployment", "advdetect")
    config = k8s("ConfigMap")
    settings = validated_settings(config["data"], tmp_path, clean_env)
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
    assert spec["terminationGracePeriodSeconds"] > settings.grace_period_s

    (container,) = spec["containers"]
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.grpc_port, "metrics": settings.metrics_port, "health": settings.health_port}
    _check_grpc_probes(container, settings.health_port, "Deployment", ("startupProbe", "readinessProbe", "livenessProbe"))
    _check_container_security(container, "Deployment")
    args = container["args"]
    assert args[0] == "serve"
    assert args[args.index("--model") + 1] == MODEL_PATH and args[args.index("--baseline") + 1] == BASELINE_PATH

    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    models = mounts[str(PurePosixPath(MODEL_PATH).parent)]
    assert models["readOnly"] is True and "persistentVolumeClaim" in volumes[models["name"]]
    claim = volumes[models["name"]]["persistentVolumeClaim"]["claimName"]
    # Every replica, on any node, mounts the same claim.
    assert set(k8s("PersistentVolumeClaim", claim)["spec"]["accessModes"]) <= {"ReadOnlyMany", "ReadWriteMany"}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert settings.audit_log_path is not None
    audit_dir = str(PurePosixPath(config["data"]["ADVDETECT_AUDIT_LOG_PATH"]).parent)
    audit_volume = volumes[mounts[audit_dir]["name"]]
    # The rotated audit files (current + backups) fit in the emptyDir.
    budget = settings.audit_max_bytes * (settings.audit_backups + 1)
    assert budget <= quantity_bytes(audit_volume["emptyDir"]["sizeLimit"])


def test_services_hpa_pdb_and_servicemonitor_select_the_pods() -> None:
    deployment = k8s("Deployment", "advdetect")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    services = [o for _, o in k8s_objects() if o["kind"] == "Service"]
    for service in services:
        assert service["spec"]["selector"].items() <= pod_labels.items(), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports
            assert port["port"] == container_ports[port["targetPort"]]
    assert any(s["spec"].get("clusterIP") == "None" for s in services), "headless Service for client-side balancing"

    hpa = k8s("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    if any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"]):
        assert "cpu" in container["resources"]["requests"], "CPU utilization targets need a CPU request"
    pdb = k8s("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain must be able to evict one pod"

    monitor = k8s("ServiceMonitor")
    selected = [s for s in services if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert len(selected) == 1, "the ServiceMonitor should select exactly one Service (no double scrape)"
    service_ports = {p["name"] for p in selected[0]["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"
    assert container_ports[next(p["targetPort"] for p in selected[0]["spec"]["ports"]
                                if p["name"] == monitor["spec"]["endpoints"][0]["port"])] == container_ports["metrics"]
    # The rules' job label is the Service's name under the Operator.
    assert selected[0]["metadata"]["name"] == "advdetect"


def test_kserve_example_speaks_the_open_inference_protocol_over_grpc() -> None:
    isvc = k8s("InferenceService")
    runtime = k8s("ServingRuntime")
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "grpc-v2"
    assert "grpc-v2" in runtime["spec"]["protocolVersions"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert re.match(r"[a-z0-9]+://", model["storageUri"])
    (container,) = runtime["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = container["args"]
    assert args[0] == "serve"
    assert int(args[args.index("--grpc-port") + 1]) == ports["h2c"], "KServe routes gRPC to the port named h2c"
    assert int(args[args.index("--metrics-port") + 1]) == int(runtime["metadata"]["annotations"]["prometheus.kserve.io/port"])
    assert args[args.index("--model") + 1].startswith("/mnt/models/")
    assert args[args.index("--baseline") + 1].startswith("/mnt/models/")
    assert int(args[args.index("--health-port") + 1]) == ports["health"]
    _check_grpc_probes(container, ports["health"], "ServingRuntime", ("readinessProbe", "livenessProbe"))
    _check_container_security(container, "ServingRuntime")


# -- healthcheck.py against real gRPC health servers -------------------------------------------------

@lru_cache(maxsize=1)
def healthcheck_module() -> Any:
    spec = importlib.util.spec_from_file_location("advdetect_deploy_healthcheck", DEPLOY / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def health_server() -> Iterator[Any]:
    """Factory ``(servicer, port) = health_server(credentials=None)``: a real server on 127.0.0.1."""
    servers: list[grpc.Server] = []

    def start(credentials: grpc.ServerCredentials | None = None) -> tuple[health.HealthServicer, int]:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        servers.append(server)
        return servicer, port

    yield start
    for server in servers:
        server.stop(grace=None).wait(5)


def test_healthcheck_defaults_check_the_server_and_the_detector() -> None:
    assert healthcheck_module().DEFAULT_SERVICES == ("", DETECTOR_SERVICE)


def test_healthcheck_reports_each_status(health_server, capsys: pytest.CaptureFixture[str]) -> None:
    main = healthcheck_module().main
    servicer, port = health_server()
    address = ["--address", f"127.0.0.1:{port}", "--timeout-s", "2"]
    # The Detector service is unknown until the server registers it: NOT_FOUND, unhealthy.
    assert main(address) == 1
    assert "advdetect.v1.Detector: RPC_NOT_FOUND" in capsys.readouterr().out
    servicer.set(DETECTOR_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main(address) == 1
    out = capsys.readouterr().out
    assert "(server): SERVING" in out and "advdetect.v1.Detector: NOT_SERVING" in out
    servicer.set(DETECTOR_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    assert main(address) == 0
    # Draining: grpc's graceful shutdown marks every service NOT_SERVING.
    servicer.enter_graceful_shutdown()
    assert main(address) == 1
    assert "(server): NOT_SERVING" in capsys.readouterr().out


def test_healthcheck_fails_when_nothing_listens(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert healthcheck_module().main(["--address", f"127.0.0.1:{port}", "--timeout-s", "1", "--service", ""]) == 1
    assert "RPC_UNAVAILABLE" in capsys.readouterr().out


def test_healthcheck_script_reads_the_port_from_the_environment(health_server) -> None:
    servicer, port = health_server()
    servicer.set(DETECTOR_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    env = {"ADVDETECT_HEALTH_PORT": str(port), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"127.0.0.1:{port} advdetect.v1.Detector: SERVING" in result.stdout
    servicer.set(DETECTOR_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    result = subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1


def test_healthcheck_over_tls_and_mutual_tls(health_server, tls_files, capsys: pytest.CaptureFixture[str]) -> None:
    main = healthcheck_module().main
    key_cert = [(tls_files.server_key.read_bytes(), tls_files.server_cert.read_bytes())]
    servicer, port = health_server(grpc.ssl_server_credentials(key_cert))
    servicer.set(DETECTOR_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    base = ["--address", f"127.0.0.1:{port}", "--timeout-s", "2"]
    assert main(base + ["--tls-ca", str(tls_files.ca_cert)]) == 0
    assert main(base + ["--tls-ca", str(tls_files.ca_cert), "--server-name", "localhost"]) == 0
    assert main(base + ["--tls-ca", str(tls_files.other_ca_cert)]) == 1  # untrusted server certificate
    assert main(base) == 1  # plaintext against a TLS port
    capsys.readouterr()

    mservicer, mport = health_server(grpc.ssl_server_credentials(
        key_cert, root_certificates=tls_files.ca_cert.read_bytes(), require_client_auth=True))
    mservicer.set(DETECTOR_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    mbase = ["--address", f"127.0.0.1:{mport}", "--timeout-s", "2", "--tls-ca", str(tls_files.ca_cert)]
    assert main(mbase) == 1  # no client certificate
    assert main(mbase + ["--tls-cert", str(tls_files.client_cert), "--tls-key", str(tls_files.client_key)]) == 0
    with pytest.raises(SystemExit, match="both --tls-cert and --tls-key"):
        main(mbase + ["--tls-cert", str(tls_files.client_cert)])
