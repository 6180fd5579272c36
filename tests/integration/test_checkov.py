"""checkov (PyPI, pinned in pyproject's `checkov` extra; scripts/setup.sh installs it into .tools/checkov) on what the
project deploys: the rendered Helm chart, and the shard and merge Jobs the builders make for every examples/*.yaml.

The Jobs must pass every Pod Security "restricted" check checkov has (listed in POD_SECURITY below); what is
skipped is listed in SKIPPED with the reason, and nothing else may fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from genrun.contract.api import parse_manifest
from genrun.operator import manifests as mf
from genrun.operator.planner import CreateMergeJob, CreateShardJob, Observed, decide
from genrun.operator.settings import Settings

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "genrun"

# Every check skipped, and why: for the chart (the operator's objects) and for the Jobs, scanned separately so that
# a check skipped for one is still enforced on the other.
_DIGEST = (
    "images are referenced by tag (the chart's appVersion, operator.workerImage, spec.worker.image); a digest can "
    "be given there where a cluster requires it"
)
_PULL = (
    "imagePullPolicy IfNotPresent: tags are immutable releases, and re-pulling a multi-GB vLLM image for every shard "
    "pod would cost minutes per shard"
)
_NETPOL = (
    "the NetworkPolicy is optional and off by default (it needs an enforcing CNI); with networkPolicy.enabled this "
    "check passes for every pod (the second parametrisation)"
)
SKIPPED_CHART: dict[str, str] = {
    "CKV_K8S_43": _DIGEST,
    "CKV_K8S_15": _PULL,
    "CKV_K8S_38": "the operator calls the API server: it needs its ServiceAccount token (enforced for the Jobs)",
    "CKV_K8S_9": "one Kopf operator with no Service traffic to gate: liveness (/healthz) is probed, readiness adds "
    "nothing",
    "CKV_K8S_11": "no CPU limit on purpose (CFS throttling makes reconcile latency spiky); CPU is requested, memory "
    "is limited",
    "CKV2_K8S_6": _NETPOL,
}
SKIPPED_JOBS: dict[str, str] = {
    "CKV_K8S_43": _DIGEST,
    "CKV_K8S_15": _PULL,
    "CKV_K8S_21": "Jobs go to their run's namespace, which the run's author picks; examples/quickstart.yaml names "
    "none, so its Jobs are built for 'default'",
    "CKV_K8S_35": "S3 keys reach boto3 as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY by secretKeyRef (their values never "
    "pass through the operator); boto3 reads no per-key files",
    "CKV2_K8S_6": _NETPOL,
}
# The checks that make up Pod Security "restricted" (plus the ServiceAccount token): every Job must pass each.
POD_SECURITY = {
    "CKV_K8S_20": "allowPrivilegeEscalation false",
    "CKV_K8S_22": "read-only root filesystem",
    "CKV_K8S_23": "no root containers (runAsNonRoot)",
    "CKV_K8S_28": "NET_RAW dropped",
    "CKV_K8S_31": "seccomp RuntimeDefault",
    "CKV_K8S_37": "capabilities dropped",
    "CKV_K8S_38": "no ServiceAccount token",
    "CKV_K8S_40": "a high UID",
    "CKV_K8S_16": "not privileged",
    "CKV_K8S_17": "no hostPID",
    "CKV_K8S_18": "no hostIPC",
    "CKV_K8S_19": "no hostNetwork",
}


def checkov() -> str:
    for found in (ROOT / ".tools" / "checkov" / "bin" / "checkov", shutil.which("checkov")):
        if found and Path(found).exists():
            return str(found)
    pytest.fail("checkov is not installed: run scripts/setup.sh")


def helm() -> str:
    local = ROOT / ".tools" / "bin" / "helm"
    found = str(local) if local.exists() else shutil.which("helm")
    if not found:
        pytest.fail("helm is not installed: run scripts/setup.sh")
    return found


def builder_jobs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        ref, spec = parse_manifest(yaml.safe_load(path.read_text()))
        shard = next(a for a in decide(ref, spec, Observed()).actions if isinstance(a, CreateShardJob))
        merge = CreateMergeJob(f"{ref.name}-r1-merge", 0, 1, ((1, shard.shard.seed),))
        docs += [mf.shard_job(ref, shard, spec, Settings()), mf.merge_job(ref, merge, spec, Settings())]
    return docs


def scan(folder: Path, skip: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [checkov(), "-d", str(folder), "--framework", "kubernetes", "--compact", "--skip-download", "-o", "json",
         *(["--skip-check", ",".join(skip)] if skip else [])],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},  # offline: no guideline download
    )  # fmt: skip
    assert out.stdout.strip(), out.stderr[-2000:]
    report = json.loads(out.stdout)
    return report[0] if isinstance(report, list) else report


def _failed_and_passed(report: dict[str, Any]) -> tuple[list[tuple[str, str]], dict[str, set[str]]]:
    assert report["summary"]["parsing_errors"] == 0
    failed = [(f["check_id"], f["resource"]) for f in report["results"]["failed_checks"]]
    passed: dict[str, set[str]] = {}
    for p in report["results"]["passed_checks"]:
        passed.setdefault(p["resource"], set()).add(p["check_id"])
    return failed, passed


@pytest.mark.parametrize("network_policy", [False, True], ids=["defaults", "networkPolicy"])
def test_checkov_passes_on_the_rendered_chart_and_the_builders_jobs(tmp_path: Path, network_policy: bool) -> None:
    args = [helm(), "template", "genrun", str(CHART), "--namespace", "ops"]
    if network_policy:  # the worker policy in the examples' namespaces too
        args += ["--set", "networkPolicy.enabled=true", "--set", "networkPolicy.workerNamespaces={data,default}"]
    chart = [
        d for d in yaml.safe_load_all(subprocess.run(args, capture_output=True, text=True, check=True).stdout) if d
    ]
    policies = [d for d in chart if d["kind"] == "NetworkPolicy"]
    # The operator's; in each worker namespace (ops: watched; data; default) the workers' and the run engines'.
    names = sorted((d["metadata"]["namespace"], d["metadata"]["name"]) for d in policies)
    workers = [(ns, f"genrun-{kind}") for ns in ("data", "default", "ops") for kind in ("engine", "workers")]
    assert names == (sorted([("ops", "genrun"), *workers]) if network_policy else [])
    keep = [] if network_policy else ["CKV2_K8S_6"]

    (tmp_path / "chart").mkdir()
    (tmp_path / "chart" / "chart.yaml").write_text(yaml.safe_dump_all(chart))
    failed, passed = _failed_and_passed(
        scan(tmp_path / "chart", [c for c in SKIPPED_CHART if c != "CKV2_K8S_6" or keep])
    )
    assert failed == [], failed
    assert any(r.startswith("Deployment.") for r in passed)

    jobs = builder_jobs()
    assert len(jobs) >= 4
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "jobs.yaml").write_text(yaml.safe_dump_all(jobs + policies))
    failed, passed = _failed_and_passed(scan(tmp_path / "jobs", [c for c in SKIPPED_JOBS if c != "CKV2_K8S_6" or keep]))
    assert failed == [], failed
    job_resources = [r for r in passed if r.startswith("Job.")]
    assert len(job_resources) == len(jobs)
    for r in job_resources:
        missing = set(POD_SECURITY) - passed[r]
        assert not missing, (r, {m: POD_SECURITY[m] for m in missing})
    if network_policy:
        pods = [r for r in passed if r.startswith("Pod.")]
        assert len(pods) == len(jobs) and all("CKV2_K8S_6" in passed[r] for r in pods)  # each has a NetworkPolicy
