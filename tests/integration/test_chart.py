"""The Helm chart, Dockerfiles and alert rules, checked by the real tools: helm lint/template (v3.17 from npm),
kubernetes-validate, promtool and hadolint."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from genrun.operator.settings import Settings

from tests.helpers import copy_sources

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "genrun"
VALUES = [None, *sorted((CHART / "ci").glob("*-values.yaml"))]
# Kinds of the Prometheus Operator: not in the Kubernetes schemas; their content is checked by promtool below.
MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule"}


def tool(name: str) -> str:
    local = ROOT / ".tools" / "bin" / name
    found = (
        str(local)
        if local.exists()
        else shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    )
    if not found:
        pytest.fail(f"{name} is not installed: run scripts/setup.sh")
    return found


def render(values: Path | None, *extra: str) -> list[dict[str, Any]]:
    args = [tool("helm"), "template", "genrun", str(CHART), "--namespace", "ops", *extra]
    if values:
        args += ["-f", str(values)]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_one_version_everywhere() -> None:
    """genrun.contract.__version__ is the version: the installed package's (pyproject reads it), the chart's and its
    appVersion, the operator's default worker image tag."""
    from importlib.metadata import version

    from genrun.contract import __version__

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert version("genrun") == chart["version"] == chart["appVersion"] == __version__
    assert Settings().worker_image.endswith(f":{__version__}")


def test_chart_crd_is_the_crd() -> None:
    assert (CHART / "crds" / "generationrun.yaml").read_bytes() == (ROOT / "crds" / "generationrun.yaml").read_bytes()


@pytest.mark.parametrize("values", VALUES, ids=lambda v: v.name if v else "defaults")
def test_lint_template_and_validate(values: Path | None, tmp_path: Path) -> None:
    lint = subprocess.run([tool("helm"), "lint", "--strict", str(CHART), *(["-f", str(values)] if values else [])],
                          capture_output=True, text=True)  # fmt: skip
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = render(values, "--include-crds")
    for i, doc in enumerate(docs):
        if doc["kind"] in MONITORING_KINDS:
            continue
        path = tmp_path / f"{i}-{doc['kind']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        res = subprocess.run(
            [tool("kubernetes-validate"), "--strict", "-k", "1.31.0", str(path)], capture_output=True, text=True
        )
        assert res.returncode == 0, f"{doc['kind']}: {res.stdout}{res.stderr}"


def test_values_schema_rejects_bad_values(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("operator:\n  logLevel: LOUD\n")
    res = subprocess.run([tool("helm"), "template", "g", str(CHART), "-f", str(bad)], capture_output=True, text=True)
    assert res.returncode != 0 and "logLevel" in res.stderr


def test_deployment_is_hardened_and_maps_every_setting() -> None:
    docs = render(None)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    c = pod["containers"][0]
    sc = c["securityContext"]
    assert (
        sc["readOnlyRootFilesystem"] is True
        and sc["allowPrivilegeEscalation"] is False
        and sc["capabilities"]["drop"] == ["ALL"]
    )
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"] for e in c["env"]}
    settings = set(Settings.documented())
    assert env == settings, f"not mapped: {settings - env}; unknown: {env - settings}"
    values_text = (CHART / "values.yaml").read_text()
    for var in settings:
        assert f"({var})" in values_text, f"values.yaml does not name {var} beside its value"
    # Every value is commented: a top-level value or a value of a section has a `# --` comment right above it
    # (sections such as `operator:` are headers; the contents of a documented block such as `resources` are free).
    lines = values_text.splitlines()
    parent_documented = False
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z]\w*):(.*)$", line)
        if not m or len(m.group(1)) > 2:
            continue
        documented = lines[i - 1].strip().startswith("#") if i else False
        if len(m.group(1)) == 0:
            parent_documented = documented
            is_section = not m.group(3).strip()
            assert documented or is_section, f"uncommented value: {line.strip()}"
        elif not parent_documented:
            assert documented, f"uncommented value: {line.strip()}"


@pytest.mark.parametrize(("cluster_wide", "kind"), [(False, "Role"), (True, "ClusterRole")])
def test_rbac_is_least_privilege(cluster_wide: bool, kind: str) -> None:
    docs = render(None, "--set", f"rbac.clusterWide={str(cluster_wide).lower()}")
    roles = [
        d for d in docs if d["kind"] in ("Role", "ClusterRole") and not d["metadata"]["name"].endswith("-discovery")
    ]
    assert [r["kind"] for r in roles] == [kind]
    for role in [d for d in docs if d["kind"] in ("Role", "ClusterRole")]:
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule.get("apiGroups", [])
    secrets = [r for r in roles[0]["rules"] if "secrets" in r["resources"]]
    assert secrets and secrets[0]["verbs"] == ["get"]
    if not cluster_wide:
        assert roles[0]["metadata"]["namespace"] == "ops"
        dep = next(d for d in docs if d["kind"] == "Deployment")
        env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["GENRUN_NAMESPACE"] == "ops"


def rule_file(tmp_path: Path) -> Path:
    docs = render(CHART / "ci" / "cluster-wide-monitoring-values.yaml")
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    return path


def test_promtool_checks_the_rendered_alert_rules(tmp_path: Path) -> None:
    path = rule_file(tmp_path)
    res = subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 4 rules found" in res.stdout
    names = [r["alert"] for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]
    assert names == ["GenrunRunFailed", "GenrunHighDuplication", "GenrunRunStalled", "GenrunBudgetNearlySpent"]
    assert "0.5" in path.read_text()  # the threshold value reached the rule


def test_dashboard_uses_variables_and_describes_panels() -> None:
    dash = json.loads((CHART / "files" / "dashboard.json").read_text())
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names == ["datasource", "namespace", "run"]
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["description"]
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            if "genrun_reconcile" not in t["expr"]:
                assert 'namespace=~"$namespace"' in t["expr"] and 'name=~"$run"' in t["expr"]
    cm = next(d for d in render(CHART / "ci" / "cluster-wide-monitoring-values.yaml") if d["kind"] == "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["genrun.json"]) == dash
    assert cm["metadata"]["namespace"] == "ops"  # the release namespace unless dashboard.namespace names another
    moved = render(None, "--set", "dashboard.enabled=true", "--set", "dashboard.namespace=monitoring")
    assert next(d for d in moved if d["kind"] == "ConfigMap")["metadata"]["namespace"] == "monitoring"


def _metrics(expr: str) -> set[str]:
    return set(re.findall(r"genrun_\w+", expr))


def test_dashboard_has_one_unit_per_axis_and_per_round_bars() -> None:
    """One unit per panel (no overrides that put a second unit on a second axis); ratios (0-1) never share a panel
    with counts; examples/s and tokens/s apart; per-round bars from instant table queries (one bar per round, not per
    scrape)."""
    dash = json.loads((CHART / "files" / "dashboard.json").read_text())
    for panel in dash["panels"]:
        unit = panel["fieldConfig"]["defaults"]["unit"]
        assert not any(p["id"] == "unit" for o in panel["fieldConfig"]["overrides"] for p in o.get("properties", [])), (
            panel["title"]
        )
        metrics = set().union(*(_metrics(t["expr"]) for t in panel["targets"]))
        ratios = {m for m in metrics if m.endswith("_ratio")}
        assert not ratios or ratios == metrics, f"{panel['title']}: ratios and counts on one axis: {metrics}"
        assert (unit == "percentunit") == bool(ratios), (panel["title"], unit)
        assert len(metrics & {"genrun_generated_examples_total", "genrun_generated_tokens_total"}) <= 1
        assert len(metrics & {"genrun_round", "genrun_budget_used_ratio"}) <= 1
        if any("round" in m and m != "genrun_round" for m in metrics):  # per-round series
            assert panel["type"] == "barchart" and panel["options"]["xField"] == "round"
            for t in panel["targets"]:
                assert t["instant"] is True and t["range"] is False and t["format"] == "table", panel["title"]
    rates = [p["fieldConfig"]["defaults"]["unit"] for p in dash["panels"] if "per second" in p["title"]]
    assert sorted(rates) == ["suffix: examples/s", "suffix: tokens/s"]


def test_service_monitor_keeps_the_runs_namespace_label() -> None:
    """What it means is tested in test_prometheus.py, through a real Prometheus; here, that it is rendered."""
    sm = next(d for d in render(CHART / "ci" / "cluster-wide-monitoring-values.yaml") if d["kind"] == "ServiceMonitor")
    ep = sm["spec"]["endpoints"][0]
    assert ep["honorLabels"] is True
    assert [r.get("targetLabel", r.get("regex")) for r in ep["metricRelabelings"]] == [
        "namespace",
        "exported_namespace",
    ]


def test_dockerfiles_lint() -> None:
    res = subprocess.run(
        [tool("hadolint"), str(ROOT / "Dockerfile.operator"), str(ROOT / "Dockerfile.worker")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_operator_image_install_step_runs_here_without_the_engine(tmp_path: Path) -> None:
    """No Docker engine here: run Dockerfile.operator's own RUN step in a fresh venv and use the result."""
    text = (ROOT / "Dockerfile.operator").read_text()
    run = next(line for line in text.splitlines() if line.startswith("RUN python -m venv"))
    cmd = run.removeprefix("RUN ").replace("/opt/genrun", str(tmp_path / "genrun"))
    src = tmp_path / "src"
    copy_sources(ROOT, src)
    for dockerfile in ("Dockerfile.operator", "Dockerfile.worker"):  # the images copy every package folder too
        copied = {
            line.split()[1].rstrip("/")
            for line in (ROOT / dockerfile).read_text().splitlines()
            if line.startswith("COPY ")
        }
        assert {p.name for p in src.iterdir() if p.is_dir()} <= copied, dockerfile
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    res = subprocess.run(cmd, shell=True, cwd=src, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    py = tmp_path / "genrun" / "bin" / "python"
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print([m for m in ('vllm','torch','kopf','prometheus_client') if u.find_spec(m)])"],
                           capture_output=True, text=True, check=True, cwd=tmp_path)  # fmt: skip
    assert probe.stdout.strip() == "['kopf', 'prometheus_client']"
    val = subprocess.run([str(tmp_path / "genrun" / "bin" / "genrun"), "validate", str(ROOT / "examples" / "stage1-qwen32b.yaml")],
                         capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert val.returncode == 0, val.stderr
    settings = subprocess.run([str(py), "-c", "from genrun.operator.handlers import build; from genrun.operator.settings import Settings; "
                               "build(Settings(server='http://127.0.0.1:1')); print('ok')"], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert settings.stdout.strip() == "ok", settings.stderr


def test_chart_renders_as_a_dependency_of_an_umbrella_chart(tmp_path: Path) -> None:
    """Helm hands every subchart a `global` value; the values schema must allow it."""
    umbrella = tmp_path / "platform"
    umbrella.mkdir()
    (umbrella / "Chart.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v2", "name": "platform", "version": "1.0.0",
        "dependencies": [{"name": "genrun", "version": yaml.safe_load((CHART / "Chart.yaml").read_text())["version"],
                          "repository": f"file://{CHART}"}],
    }))  # fmt: skip
    (umbrella / "values.yaml").write_text(yaml.safe_dump({
        "global": {"imageRegistry": "registry.example.com"},
        "genrun": {"operator": {"workerImage": "registry.example.com/genrun-worker:0.1.0"}, "dashboard": {"enabled": True}},
    }))  # fmt: skip
    dep = subprocess.run(
        [tool("helm"), "dependency", "update", "--skip-refresh", str(umbrella)], capture_output=True, text=True
    )
    assert dep.returncode == 0, dep.stdout + dep.stderr
    res = subprocess.run(
        [tool("helm"), "template", "platform", str(umbrella), "-n", "ops"], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    dep_doc = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in dep_doc["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["GENRUN_WORKER_IMAGE"] == "registry.example.com/genrun-worker:0.1.0"
    assert any(d["kind"] == "ConfigMap" for d in docs)


def test_extra_env_volumes_and_mounts_reach_the_operator(tmp_path: Path) -> None:
    """docs/install.md: local-path outputs need the runs' PVC mounted into the operator at the same path."""
    values = tmp_path / "pvc.yaml"
    values.write_text(yaml.safe_dump({
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
        "extraVolumes": [{"name": "outputs", "persistentVolumeClaim": {"claimName": "genrun-outputs"}}],
        "extraVolumeMounts": [{"name": "outputs", "mountPath": "/data/genrun"}],
    }))  # fmt: skip
    docs = render(values)
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert {"name": "HTTPS_PROXY", "value": "http://proxy:3128"} in c["env"]
    assert {"name": "outputs", "mountPath": "/data/genrun"} in c["volumeMounts"]
    assert {"name": "outputs", "persistentVolumeClaim": {"claimName": "genrun-outputs"}} in pod["volumes"]
    path = tmp_path / "dep.yaml"
    path.write_text(yaml.safe_dump(next(d for d in docs if d["kind"] == "Deployment")))
    res = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", "1.31.0", str(path)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"extraVolumeMounts": [{"name": "outputs"}]}))
    res = subprocess.run([tool("helm"), "template", "g", str(CHART), "-f", str(bad)], capture_output=True, text=True)
    assert res.returncode != 0 and "mountPath" in res.stderr


def operator_settings(*extra: str) -> Settings:
    """The Settings the operator starts with under the rendered Deployment's environment."""
    dep = next(d for d in render(None, *extra) if d["kind"] == "Deployment")
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    return Settings.from_env(env)


def test_the_allow_lists_reach_the_operator_with_safe_defaults() -> None:
    """The chart's defaults are the operator's: in-cluster endpoint hosts, and images from workerImage's repository
    only (a custom workerImage moves the default with it); listed values arrive as the lists they are."""
    default = operator_settings()
    assert default.allowed_endpoint_hosts == Settings().allowed_endpoint_hosts == ("*.svc", "*.svc.cluster.local")
    assert default.image_prefixes() == ("ghcr.io/genrun/genrun-worker",)
    custom = operator_settings("-f", str(CHART / "ci" / "namespaced-values.yaml"))
    assert custom.image_allowed("registry.example.com/genrun-worker:cuda12-0.2.0")
    assert not custom.image_allowed("ghcr.io/genrun/genrun-worker:0.1.0")
    listed = operator_settings("--set-json", 'operator.allowedImagePrefixes=["ghcr.io/genrun/","python"]',
                               "--set-json", 'operator.allowedEndpointHosts=["minio.storage.svc","*.example.com"]')  # fmt: skip
    assert listed.allowed_image_prefixes == ("ghcr.io/genrun/", "python")
    assert listed.allowed_endpoint_hosts == ("minio.storage.svc", "*.example.com")
    res = subprocess.run([tool("helm"), "template", "g", str(CHART), "--set-json",
                          'operator.allowedEndpointHosts=["http://minio:9000"]'], capture_output=True, text=True)  # fmt: skip
    assert res.returncode != 0 and "allowedEndpointHosts" in res.stderr


def rendered_notes(tmp_path: Path, *extra: str) -> str:
    """`helm template` does not print NOTES.txt; a copy of the chart renders it into a ConfigMap through its template
    name, with the real values and helpers."""
    chart = tmp_path / "genrun"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "zz-notes.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: {{ include "genrun/templates/NOTES.txt" . | toJson }}\n'
    )
    out = subprocess.run([tool("helm"), "template", "genrun", str(chart), "-n", "ops", *extra],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return str(next(d for d in yaml.safe_load_all(out) if d and d["metadata"]["name"] == "notes")["data"]["notes"])


@pytest.mark.parametrize("extra", [[], ["--set", "rbac.clusterWide=true"]], ids=["namespaced", "cluster-wide"])
def test_notes_work_as_printed(tmp_path: Path, extra: list[str]) -> None:
    notes = rendered_notes(tmp_path, *extra)
    assert "examples/" not in notes and "charts/" not in notes  # no repository path the chart does not ship
    for line in notes.splitlines():
        if "port-forward" in line:
            assert "&&" not in line and ";" not in line and "|" not in line  # port-forward blocks: nothing after it
    # The inline manifest is a valid run, by the same checks as the API server's (genrun validate).
    manifest = notes.split("<<'YAML'\n", 1)[1].split("\nYAML\n", 1)[0]
    path = tmp_path / "first-run.yaml"
    path.write_text(manifest)
    from genrun.operator.validate import validate_file

    assert validate_file(path) == []
    assert "kubectl -n ops apply -f - <<'YAML'" in notes
    assert "helm show crds CHART --version 0.1.0 | kubectl apply --server-side --force-conflicts -f -" in notes


def test_crd_upgrade_path_is_the_charts_crd() -> None:
    """Helm installs crds/ once and never upgrades it; the documented upgrade step applies `helm show crds`, which
    must be exactly the CRD."""
    shown = subprocess.run(
        [tool("helm"), "show", "crds", str(CHART)], capture_output=True, text=True, check=True
    ).stdout
    assert list(yaml.safe_load_all(shown)) == [yaml.safe_load((ROOT / "crds" / "generationrun.yaml").read_text())]
    install = (ROOT / "docs" / "install.md").read_text()
    assert "helm show crds charts/genrun | kubectl apply --server-side --force-conflicts -f -" in install
