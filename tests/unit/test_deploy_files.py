"""The deployment files (deploy/compose, deploy/k8s) hold together without a Docker
engine or a cluster: each matches its published schema (Kubernetes' from
kubernetes-validate, the compose-spec's as vendored by check-jsonschema), and every
name one file gives another (services, secrets, configs, volumes, ports, labels,
TALLY_* variables, files) exists there. Tally's own CLI parser and settings read the
commands and environments the containers would run with."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tally import config
from tests.deploy_support import (
    ROOT,
    image_entrypoint,
    image_environment,
    instructions,
    is_known_variable,
    runtime_stage,
    settings_of,
)

COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
K8S_DIR = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "tally-dashboard.json"
# The oldest Kubernetes with native gRPC probes on by default (GA in 1.27), and the
# newest whose schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
# Compose's substitution forms: ${VAR}, ${VAR:?message}, ${VAR:-default} (and without :).
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?([?-])([^}]*))?\}")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    document: dict[str, Any] = load_yaml(COMPOSE_FILE)
    return document


def example_environment() -> dict[str, str]:
    """.env.example's keys, each with a distinct made-up value (hex, as documented)."""
    keys = [
        line.partition("=")[0]
        for line in (COMPOSE_DIR / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    return {key: f"{index:08x}feed" for index, key in enumerate(keys)}


def interpolate(text: str, values: dict[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        name, kind, default = match.groups()
        if values.get(name):
            return values[name]
        if kind == "-":
            return default
        raise AssertionError(f"{text!r}: ${{{name}}} has no value in .env.example")
    return _VARIABLE.sub(substitute, text).replace("$$", "$")


def variables_in(text: str) -> set[str]:
    return {match.group(1) for match in _VARIABLE.finditer(text)}


def tally_services(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from the repository's Dockerfile."""
    return {name: service for name, service in document["services"].items() if "build" in service}


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    declared = service.get("environment", {})
    assert isinstance(declared, dict), "environment: use the mapping form"
    values = example_environment()
    return {key: interpolate(str(value), values) for key, value in declared.items()}


def service_argv(service: dict[str, Any]) -> list[str]:
    """What a Tally container runs: its entrypoint (the image's unless overridden),
    then its command."""
    entrypoint = service.get("entrypoint", image_entrypoint())
    argv = [*entrypoint, *service.get("command", [])]
    assert argv[0] == "tally", argv
    return argv[1:]


def service_settings(service: dict[str, Any]) -> config.Settings:
    return settings_of(service_argv(service), image_environment() | service_environment(service))


def mounted_config(service: dict[str, Any], name: str) -> str:
    """Where a service mounts one of its configs."""
    for entry in service.get("configs", []):
        if entry["source"] == name:
            target: str = entry["target"]
            return target
    raise AssertionError(f"the service does not mount config {name!r}")


def config_file(document: dict[str, Any], name: str) -> Path:
    return (COMPOSE_DIR / document["configs"][name]["file"]).resolve()


def kubernetes_documents() -> list[dict[str, Any]]:
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    documents = []
    for name in kustomization["resources"]:
        documents.extend(doc for doc in yaml.safe_load_all((K8S_DIR / name).read_text()) if doc)
    return documents


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in kubernetes_documents() if doc["kind"] == kind]


def containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(deployment, container) pairs."""
    for deployment in of_kind("Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            yield deployment, container


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- every file parses ---------------------------------------------------------------


def test_every_deployment_file_parses() -> None:
    """Each YAML file under deploy/ (and the dashboard's JSON) parses to something."""
    paths = sorted([*ROOT.glob("deploy/**/*.yaml"), *ROOT.glob("deploy/**/*.yml")])
    assert COMPOSE_FILE in paths and K8S_DIR / "kustomization.yaml" in paths
    for path in paths:
        assert [doc for doc in yaml.safe_load_all(path.read_text()) if doc], path
    assert json.loads(DASHBOARD.read_text())["uid"]


# --- Kubernetes ------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    """kubectl apply -k applies every manifest in deploy/k8s, and nothing else is named."""
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "labels"}
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(on_disk)
    for entry in kustomization.get("labels", []):
        # Labels on objects only: selectors stay as written (and as tested below).
        assert not entry.get("includeSelectors", False)


def test_the_schema_check_rejects_a_misspelled_field() -> None:
    """The strict Kubernetes schemas catch an unknown field (so the next test can fail)."""
    deployment = of_kind("Deployment")[0]
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    """Every built-in resource validates strictly (unknown fields refused) against the
    schemas kubernetes-validate ships for that version, offline."""
    checked = 0
    for document in kubernetes_documents():
        if document["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: not in those schemas (test_service_monitor_...)
        kubernetes_validate.validate(document, version, strict=True)
        checked += 1
    assert checked == len(kubernetes_documents()) - 1


def test_the_server_deployment_runs_a_fleet_of_serve_without_a_flusher() -> None:
    """Two `tally serve --flusher off` replicas, one `tally flusher`: the argv each
    container runs, read by Tally's CLI parser with its environment (Secret values made
    up), is accepted by Tally's settings."""
    by_name = {deployment["metadata"]["name"]: deployment for deployment in of_kind("Deployment")}
    assert by_name["tally"]["spec"]["replicas"] == 2
    assert by_name["tally-flusher"]["spec"]["replicas"] == 1
    secret_values = {"redis-url": "redis://:pw@redis:6379/0",
                     "ledger-url": "postgresql://tally:pw@postgres:5432/tally"}
    runs = {}
    for deployment, container in containers():
        argv = [*container.get("command", image_entrypoint()), *container.get("args", [])]
        assert argv[0] == "tally"
        environment = dict(image_environment())
        for variable in container.get("env", []):
            value = variable.get("value")
            if value is None:
                value = secret_values[variable["valueFrom"]["secretKeyRef"]["key"]]
            environment[variable["name"]] = value
        settings = settings_of(argv[1:], environment)
        assert settings.redis_url and settings.ledger_url.startswith("postgresql://")
        runs[deployment["metadata"]["name"]] = (argv[1], settings)
    assert runs["tally"][0] == "serve" and runs["tally"][1].flusher is False
    assert runs["tally"][1].auth == "required"
    assert runs["tally-flusher"][0] == "flusher"


def test_variables_secrets_and_volumes_are_defined() -> None:
    """Every TALLY_* variable is a setting; every Secret key used is one the README's
    `kubectl create secret` makes; every volume mounted is declared; the bootstrap token
    file is where the Secret's item is mounted."""
    readme = (K8S_DIR / "README.md").read_text()
    secret_keys = set(re.findall(r"--from-(?:literal|file)=([a-z-]+)=", readme))
    assert {"redis-url", "ledger-url", "bootstrap-token"} <= secret_keys
    for deployment, container in containers():
        spec = deployment["spec"]["template"]["spec"]
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        for variable in container.get("env", []):
            assert is_known_variable(variable["name"]), variable["name"]
            reference = variable.get("valueFrom", {}).get("secretKeyRef")
            if reference:
                assert reference["name"] == "tally" and reference["key"] in secret_keys
        mounts = {mount["name"]: mount for mount in container.get("volumeMounts", [])}
        assert set(mounts) <= set(volumes)
        for volume in volumes.values():
            if "secret" in volume:
                assert volume["secret"]["secretName"] == "tally"
                assert {item["key"] for item in volume["secret"]["items"]} <= secret_keys
        token_file = next((v["value"] for v in container.get("env", [])
                           if v["name"] == "TALLY_BOOTSTRAP_TOKEN_FILE"), None)
        if token_file:
            folder, _, file_name = token_file.rpartition("/")
            mount = next(m for m in mounts.values() if m["mountPath"] == folder)
            assert mount["readOnly"] is True
            items = volumes[mount["name"]]["secret"]["items"]
            assert file_name in {item["path"] for item in items}


def test_pods_run_as_the_image_user_without_privileges() -> None:
    """Non-root as the image's uid 10001, no privilege escalation, resources set."""
    assert "--uid 10001" in runtime_stage() and "--gid 10001" in runtime_stage()
    for deployment, container in containers():
        pod = deployment["spec"]["template"]["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001
        assert pod["runAsGroup"] == 10001 and pod["fsGroup"] == 10001
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["resources"]["requests"] and container["resources"]["limits"]


def test_probes_and_services_use_the_ports_tally_binds() -> None:
    """gRPC probes hit the containerPort named grpc, which is the port TALLY_LISTEN
    binds; the port named metrics is the one TALLY_METRICS_LISTEN binds; every probe
    names a declared port; every Service selects the pods of exactly one Deployment and
    targets ports those pods declare; each Deployment selects its own template."""
    environment = image_environment()
    listen_port = int(environment["TALLY_LISTEN"].rpartition(":")[2])
    metrics_port = int(environment["TALLY_METRICS_LISTEN"].rpartition(":")[2])
    deployments = of_kind("Deployment")
    for deployment, container in containers():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports["metrics"] == metrics_port
        if "grpc" in ports:
            assert ports["grpc"] == listen_port
        probes = [container[key] for key in ("startupProbe", "readinessProbe", "livenessProbe")
                  if key in container]
        assert probes
        for probe in probes:
            if "grpc" in probe:
                assert probe["grpc"]["port"] == ports["grpc"]
            else:
                assert probe["httpGet"]["port"] in ports
    server = next(d for d in deployments if d["metadata"]["name"] == "tally")
    grpc_probes = [server["spec"]["template"]["spec"]["containers"][0][key]
                   for key in ("readinessProbe", "livenessProbe")]
    assert all("grpc" in probe for probe in grpc_probes)
    for service in of_kind("Service"):
        selector = service["spec"]["selector"]
        chosen = [d for d in deployments
                  if selects(selector, d["spec"]["template"]["metadata"]["labels"])]
        assert len(chosen) == 1, service["metadata"]["name"]
        container_ports = {port["name"]: port["containerPort"]
                           for container in chosen[0]["spec"]["template"]["spec"]["containers"]
                           for port in container["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in container_ports
            assert port["port"] == container_ports[port["targetPort"]]
    for budget in of_kind("PodDisruptionBudget"):
        assert selects(budget["spec"]["selector"]["matchLabels"],
                       server["spec"]["template"]["metadata"]["labels"])


def test_service_monitor_scrapes_the_metrics_port_of_every_tally_service() -> None:
    """The ServiceMonitor (a CRD, checked by hand against the Prometheus Operator's API:
    spec.selector, spec.endpoints[].port/path/interval) selects every Service, through
    their labels, and names the port they call metrics."""
    (monitor,) = of_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel",
                         "targetLabels", "podTargetLabels", "sampleLimit"}
    assert set(spec["selector"]) == {"matchLabels"}
    services = of_kind("Service")
    assert services
    for service in services:
        assert selects(spec["selector"]["matchLabels"], service["metadata"]["labels"])
    assert spec["endpoints"]
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert re.fullmatch(r"\d+(ms|s|m)", endpoint.get("interval", "30s"))
        for service in services:
            assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
        assert endpoint.get("path", "/metrics") == "/metrics"


# --- Compose -------------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema: dict[str, Any] = json.loads(vendored.read_text())
    return schema


def schema_errors(document: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{list(error.absolute_path)}: {error.message}"
            for error in validator.iter_errors(document)]


def test_compose_matches_the_compose_spec_schema() -> None:
    """compose.yaml is valid against the compose-spec JSON schema; the same check refuses
    a misspelled service key."""
    assert schema_errors(compose()) == []
    broken = compose()
    broken["services"]["redis"]["imagee"] = broken["services"]["redis"].pop("image")
    assert schema_errors(broken)


def test_compose_names_only_what_it_defines() -> None:
    """Every depends_on names a service; every config, secret and named volume a service
    uses is defined at the top level; every config file exists; each service it waits on
    as healthy has a health check (its own, or the image's HEALTHCHECK)."""
    document = compose()
    services = document["services"]
    for name, service in services.items():
        for other, condition in service.get("depends_on", {}).items():
            assert other in services, (name, other)
            if condition["condition"] == "service_healthy":
                waited = services[other]
                own_image = "build" in waited and any(
                    word == "HEALTHCHECK" for word, _ in instructions(runtime_stage()))
                assert "healthcheck" in waited or own_image, (name, other)
        for entry in service.get("configs", []):
            assert entry["source"] in document["configs"], (name, entry)
        for entry in service.get("secrets", []):
            assert (entry if isinstance(entry, str) else entry["source"]) in document["secrets"]
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in document["volumes"], (name, volume)
    for name, entry in document["configs"].items():
        if "file" in entry:
            assert config_file(document, name).is_file(), name
    assert all("healthcheck" in service or "build" in service for service in services.values())


def test_compose_secrets_and_passwords_stay_out_of_git() -> None:
    """Passwords come from .env (gitignored, its keys listed in .env.example with no
    value) and secret files under a gitignored path; Grafana's admin password has no
    default to fall back on."""
    document = compose()
    text = COMPOSE_FILE.read_text()
    example = (COMPOSE_DIR / ".env.example").read_text()
    assert variables_in(text) == set(example_environment())
    assert all(line.endswith("=") for line in example.splitlines()
               if line and not line.startswith("#"))
    ignored = [COMPOSE_DIR / ".env",
               *(COMPOSE_DIR / s["file"] for s in document["secrets"].values())]
    for path in ignored:
        check = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT, check=False)
        assert check.returncode == 0, f"{path} is not gitignored"
    grafana_password = document["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", grafana_password)


def test_images_are_pinned() -> None:
    """Every image pulled names a version, not latest or a bare name."""
    for name, service in compose()["services"].items():
        if "build" in service:
            continue
        image, _, tag = service["image"].rpartition(":")
        assert image and re.fullmatch(r"v?\d+(\.\d+)+", tag), (name, service["image"])


def test_tally_services_run_as_a_fleet_against_the_compose_redis_and_postgres() -> None:
    """The replicated `tally` service runs `tally serve --flusher off` with auth required
    and the bootstrap token from its secret; `flusher` runs `tally flusher`; both, read by
    Tally's own CLI parser and settings, point at the redis and postgres services with
    the passwords those services are given."""
    document = compose()
    services = document["services"]
    built = tally_services(document)
    assert set(built) == {"tally", "flusher"}
    for service in built.values():
        assert (COMPOSE_DIR / service["build"]["context"]).resolve() == ROOT
        for name in service_environment(service):
            assert is_known_variable(name), name
    values = example_environment()
    server = built["tally"]
    assert server["deploy"]["replicas"] == 2
    assert service_argv(server)[0] == "serve"
    settings = service_settings(server)
    assert settings.flusher is False and settings.auth == "required"
    (secret,) = server["secrets"]
    assert settings.bootstrap_token_file == f"/run/secrets/{secret}"
    assert service_argv(built["flusher"]) == ["flusher"]
    postgres = services["postgres"]["environment"]
    for service in built.values():
        settings = service_settings(service)
        redis = urlsplit(settings.redis_url)
        assert redis.hostname == "redis" and redis.port == 6379
        requirepass = interpolate(document["configs"]["redis-conf"]["content"], values)
        assert f"requirepass {redis.password}\n" in requirepass
        ledger = urlsplit(settings.ledger_url)
        assert ledger.hostname == "postgres" and ledger.scheme == "postgresql"
        assert ledger.username == postgres["POSTGRES_USER"]
        assert ledger.password == interpolate(postgres["POSTGRES_PASSWORD"], values)
        assert ledger.path == "/" + postgres["POSTGRES_DB"]


def test_compose_redis_keeps_what_tally_needs() -> None:
    """AOF on with fsync always and noeviction (Tally refuses other policies at start),
    data on a volume, the password from its config file rather than argv."""
    redis = compose()["services"]["redis"]
    command = redis["command"]
    pairs = dict(zip(command[2::2], command[3::2], strict=True))
    assert command[0] == "redis-server"
    assert pairs["--appendonly"] == "yes" and pairs["--appendfsync"] == "always"
    assert pairs["--maxmemory-policy"] == "noeviction"
    assert command[1] == mounted_config(redis, "redis-conf")
    assert not any("requirepass" in word for word in command)
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def test_prometheus_scrapes_every_tally_process_on_its_metrics_port() -> None:
    """The Prometheus config compose mounts scrapes each Tally service (a replicated one
    through DNS service discovery, so every replica), on the port its settings bind."""
    document = compose()
    prometheus = document["services"]["prometheus"]
    assert f"--config.file={mounted_config(prometheus, 'prometheus-config')}" in (
        prometheus["command"])
    scrape = load_yaml(config_file(document, "prometheus-config"))
    targets: dict[str, set[int]] = {}
    discovered: set[str] = set()
    for job in scrape["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            assert sd["type"] == "A"
            for name in sd["names"]:
                targets.setdefault(name, set()).add(sd["port"])
                discovered.add(name)
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                targets.setdefault(host, set()).add(int(port))
    built = tally_services(document)
    assert set(targets) == set(built)
    for name, service in built.items():
        metrics_port = int(service_settings(service).metrics_listen.rpartition(":")[2])
        assert targets[name] == {metrics_port}, name
        if service.get("deploy", {}).get("replicas", 1) > 1:
            assert name in discovered, f"{name}: a static target reaches one replica"


def test_grafana_provisions_the_datasource_and_dashboard_the_panels_use() -> None:
    """Grafana mounts the datasource and dashboard providers where it reads them, the
    provider's folder holds deploy/grafana/tally-dashboard.json, the datasource points
    at the prometheus service, and every datasource reference of the dashboard resolves
    to it (its uid, or a datasource variable of its type, which starts on the default)."""
    document = compose()
    grafana = document["services"]["grafana"]
    datasources_at = mounted_config(grafana, "grafana-datasources")
    providers_at = mounted_config(grafana, "grafana-dashboards")
    assert datasources_at.startswith("/etc/grafana/provisioning/datasources/")
    assert providers_at.startswith("/etc/grafana/provisioning/dashboards/")
    assert config_file(document, "tally-dashboard") == DASHBOARD
    (provider,) = load_yaml(config_file(document, "grafana-dashboards"))["providers"]
    assert mounted_config(grafana, "tally-dashboard").rpartition("/")[0] == (
        provider["options"]["path"])
    (datasource,) = load_yaml(config_file(document, "grafana-datasources"))["datasources"]
    assert datasource["isDefault"] is True
    url = urlsplit(datasource["url"])
    assert url.hostname in document["services"] and url.hostname == "prometheus"
    assert url.port == 9090
    assert any(port.endswith(":9090") for port in document["services"]["prometheus"]["ports"])
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    references = list(datasource_references(dashboard))
    assert references
    for reference in references:
        uid = reference["uid"]
        assert reference["type"] == datasource["type"]
        variable = re.fullmatch(r"\$\{(\w+)\}", uid)
        if variable:
            declared = variables[variable.group(1)]
            assert declared["type"] == "datasource" and declared["query"] == datasource["type"]
        else:
            assert uid == datasource["uid"]


def datasource_references(node: Any) -> Iterator[dict[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and isinstance(value, dict):
                yield value
            else:
                yield from datasource_references(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_references(item)


def test_the_documented_env_command_makes_what_compose_needs(tmp_path: Path) -> None:
    """README Docker's one-liner for deploy/compose/.env (the same as .env.example's),
    run here, writes every variable compose.yaml uses, each a fresh hex value (they go
    inside URLs)."""
    readme = (ROOT / "README.md").read_text()
    (command,) = re.findall(r'^python3 -c "(import secrets as s;.*)" > \.env$', readme, re.M)
    assert command in (COMPOSE_DIR / ".env.example").read_text()
    written = subprocess.run([sys.executable, "-c", command], check=True, cwd=tmp_path,
                             capture_output=True, text=True).stdout
    values = dict(line.split("=", 1) for line in written.splitlines())
    assert set(values) == variables_in(COMPOSE_FILE.read_text())
    assert all(re.fullmatch(r"[0-9a-f]{32,}", value) for value in values.values())
