"""A real Prometheus (Debian's) scrapes a running operator; every PromQL expression of the Grafana dashboard and of
the chart's alert rules is evaluated against it, without error and with data for a run."""

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


class Prometheus:
    def __init__(self, target_port: int, rules: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="genrun-prom-"))
        self.port = free_port()
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {"job_name": "genrun-operator", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}
            ],
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
                    r for r in prom.query('rate(genrun_generated_examples_total{name="watched"}[1m])')["data"]["result"]
                ],
                30,
                "two samples",
            )

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
