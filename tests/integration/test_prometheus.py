"""A real Prometheus (Debian's) scrapes a running operator; every PromQL expression of the Grafana dashboard and of
the chart's alert rules is evaluated against it, without error and with data for a run.

The scrape goes through service discovery the way the Prometheus Operator sets it up for the chart's ServiceMonitor:
a file-SD target carrying Kubernetes SD meta labels, relabelled to `namespace`/`service`/`pod` (so the target's
`namespace`, the operator's, conflicts with the run's), with honor_labels and metric relabellings taken from the
rendered ServiceMonitor. No Kubernetes API server with endpoints exists here; file SD stands in for its discovery."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.harness import RUNS, Cluster, JobRunner, OperatorProcess, free_port, wait_for
from tests.integration.test_chart import CHART, render, tool

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
NS = "prom"


OPERATOR_NS = "ops"  # where the chart (and so the operator's metrics Service) is installed


def _snake(d: dict[str, Any]) -> dict[str, Any]:
    """ServiceMonitor relabelling (camelCase) to Prometheus configuration (snake_case), as the Prometheus Operator does."""
    return {re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), k): v for k, v in d.items()}


def service_monitor_jobs(target_port: int, sd_dir: Path) -> list[dict[str, Any]]:
    """Scrape jobs for the chart's ServiceMonitor as rendered: `chart` as the Prometheus Operator generates it,
    `chart-override` as it does under overrideHonorLabels (honor_labels forced off), and `bare`, a ServiceMonitor with
    neither honorLabels nor relabellings, to show what the chart's settings prevent."""
    docs = render(CHART / "ci" / "cluster-wide-monitoring-values.yaml")
    sm = next(d for d in docs if d["kind"] == "ServiceMonitor")
    ep = sm["spec"]["endpoints"][0]
    sd = sd_dir / "targets.json"
    sd.write_text(json.dumps([{"targets": [f"127.0.0.1:{target_port}"], "labels": {
        "__meta_kubernetes_namespace": OPERATOR_NS, "__meta_kubernetes_service_name": "genrun-metrics",
        "__meta_kubernetes_pod_name": "genrun-5d8c7b9f4-x2x7q", "__meta_kubernetes_endpoint_port_name": ep["port"]}}]))  # fmt: skip
    relabel = [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_endpoint_port_name"], "target_label": "endpoint"},
    ]

    def job(name: str, honor: bool, metric_relabel: list[dict[str, Any]]) -> dict[str, Any]:
        return {"job_name": name, "honor_labels": honor, "metrics_path": ep["path"],
                "file_sd_configs": [{"files": [str(sd)], "refresh_interval": "1s"}],
                "relabel_configs": relabel, "metric_relabel_configs": metric_relabel}  # fmt: skip

    chart_relabel = [_snake(r) for r in ep.get("metricRelabelings", [])]
    return [
        job("chart", bool(ep.get("honorLabels")), chart_relabel),
        job("chart-override", False, chart_relabel),
        job("bare", False, []),
    ]


class Prometheus:
    def __init__(self, target_port: int, rules: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="genrun-prom-"))
        self.port = free_port()
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": service_monitor_jobs(target_port, self.dir),
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "prometheus.log", "wb"),  # noqa: SIM115
        )  # fmt: skip
        wait_for(lambda: self._ok("/-/ready"), 60, "Prometheus ready")

    def _ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status == 200
        except Exception:
            return False

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def query(self, expr: str) -> Any:
        return self.api("query", query=expr)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster() as c:
        c.create(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            yaml.safe_load((ROOT / "crds" / "generationrun.yaml").read_text()),
        )
        c.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        yield c


def dashboard_exprs(run: str) -> list[tuple[str, str]]:
    dash = json.loads((CHART / "files" / "dashboard.json").read_text())
    out = []
    for panel in dash["panels"]:
        for t in panel["targets"]:
            expr = t["expr"].replace("$namespace", NS).replace("$run", run).replace("$__rate_interval", "1m")
            out.append((panel["title"], expr))
    return out


def test_dashboard_and_alert_queries_have_data(cluster: Cluster, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    docs = render(CHART / "ci" / "cluster-wide-monitoring-values.yaml")
    rules.write_text(yaml.safe_dump(next(d for d in docs if d["kind"] == "PrometheusRule")["spec"]))
    spec = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    spec["shards"]["examplesPerShard"] = 15
    spec["target"]["uniqueExamples"] = 35
    spec["dedup"] = {**spec.get("dedup", {}), "semantic": {"enabled": False}}  # each Job process would load the model
    spec["output"]["path"] = str(tmp_path / "out")
    bad = json.loads(json.dumps(spec))
    bad["sampling"]["temperature"] = 3.5
    with JobRunner(cluster, NS, {"GENRUN_ENGINE": "replay"}), OperatorProcess(cluster, NS) as op:
        prom = Prometheus(op.metrics_port, rules)
        try:
            cluster.create(RUNS.format(ns=NS), {"apiVersion": "genrun.io/v1alpha1", "kind": "GenerationRun",
                                                "metadata": {"name": "watched", "namespace": NS}, "spec": spec})  # fmt: skip
            cluster.create(RUNS.format(ns=NS), {"apiVersion": "genrun.io/v1alpha1", "kind": "GenerationRun",
                                                "metadata": {"name": "broken", "namespace": NS}, "spec": bad})  # fmt: skip
            wait_for(
                lambda: (c := cluster.condition(NS, "watched", "Succeeded")) and c["status"] == "True", 240, "Succeeded"
            )
            kept = cluster.run(NS, "watched")["status"]["totals"]["qcPassed"]
            wait_for(
                lambda: [
                    r for r in prom.query(f'genrun_qc_passed_examples{{name="watched"}} == {kept}')["data"]["result"]
                ],
                30,
                "scraped",
            )
            wait_for(
                lambda: [
                    # every job's target twice (the dashboard's rate() needs two samples of the namespaced series)
                    r
                    for r in prom.query(
                        f'rate(genrun_generated_examples_total{{namespace="{NS}", name="watched"}}[1m])'
                    )["data"]["result"]
                ],
                30,
                "two samples",
            )

            # The run's namespace survives the scrape through the chart's ServiceMonitor, with honor_labels and
            # under overrideHonorLabels; without either it would become exported_namespace.
            by_job = wait_for(
                lambda: (
                    len(m := {r["metric"]["job"]: r["metric"] for r in prom.query('genrun_qc_passed_examples{name="watched"}')["data"]["result"]}) == 3
                    and m
                ),
                30,
                "all three jobs scraped",
            )  # fmt: skip
            for job in ("chart", "chart-override"):
                assert by_job[job]["namespace"] == NS and "exported_namespace" not in by_job[job], by_job[job]
            assert by_job["bare"]["namespace"] == OPERATOR_NS and by_job["bare"]["exported_namespace"] == NS
            own = prom.query('genrun_build_info{job="chart-override"}')["data"]["result"]
            assert own and own[0]["metric"]["namespace"] == OPERATOR_NS  # the operator's own series keep the target's

            for title, expr in dashboard_exprs("watched"):
                res = prom.query(expr)
                assert res["status"] == "success", (title, expr, res)
                assert res["data"]["result"], f"no data for panel {title!r}: {expr}"

            groups = wait_for(
                lambda: (
                    (g := prom.api("rules")["data"]["groups"])
                    and g[0]["rules"][0].get("lastEvaluation", "").startswith("2")
                    and g
                ),
                30,
                "rules evaluated",
            )
            evaluated = groups[0]["rules"]
            assert [r["name"] for r in evaluated] == [
                "GenrunRunFailed",
                "GenrunHighDuplication",
                "GenrunRunStalled",
                "GenrunBudgetNearlySpent",
            ]
            for rule in evaluated:
                assert rule["health"] == "ok", rule
                res = prom.query(rule["query"])
                assert res["status"] == "success", (rule["name"], res)
                # With data for a run: every series an alert reads exists for it.
                for selector in sorted(set(re.findall(r"genrun_\w+", rule["query"]))):
                    data = prom.query(f'{selector}{{namespace="{NS}",name="watched"}}')["data"]["result"]
                    assert data, f"{rule['name']}: no {selector} for the run"
            # And the alert that should fire does: the invalid run is Failed.
            alerts = wait_for(
                lambda: [
                    a for a in prom.api("alerts")["data"]["alerts"] if a["labels"]["alertname"] == "GenrunRunFailed"
                ],
                30,
                "alert",
            )
            assert {a["labels"]["name"] for a in alerts} == {"broken"}
        finally:
            prom.stop()
