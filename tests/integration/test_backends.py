"""One manifest, two backends: `genrun run` on this machine and the Kopf operator (kmock + the harness's Job runner +
a real SeaweedFS; replay engine in both), then both outputs read back the same way, with `genrun status --json` and
`genrun report --json`.

Both runs are the same run: the same name, namespace and uid (the planner's randomness is seeded by
namespace/name/uid), so their round plans, datasets and totals are the same. Only the places differ (an output folder
here, an s3:// prefix there), and so do the clocks in the conditions.
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from tests.integration.harness import RUNS, Cluster, JobRunner, OperatorProcess, SeaweedFS, wait_for
from tests.integration.test_operator import NS, manifest, succeeded
from tests.integration.test_operator import cluster as cluster  # the fixture, re-exported

pytestmark = pytest.mark.integration
GENRUN = [sys.executable, "-P", "-m", "genrun.operator.cli"]
BUCKET = "genrun-test"


@pytest.fixture(scope="module")
def s3() -> Iterator[SeaweedFS]:
    with SeaweedFS() as weed:
        weed.client().create_bucket(Bucket=BUCKET)
        yield weed


def genrun(args: list[str], s3: SeaweedFS) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GENRUN_"))}
    env.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_ENDPOINT_URL=s3.endpoint)
    res = subprocess.run([*GENRUN, *args], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    return res.stdout


def rows(s3: SeaweedFS, location: str) -> list[dict[str, Any]]:
    """The dataset's rows: every per-round part under the dataset folder, in round order."""
    if location.startswith("s3://"):
        prefix = location.removeprefix(f"s3://{BUCKET}/").rstrip("/") + "/"
        listed = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        keys = sorted(o["Key"] for o in listed if o["Key"].endswith(".parquet"))
        assert keys, f"no dataset parts under {location}"
        out: list[dict[str, Any]] = []
        for key in keys:
            body = s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
            out += pq.read_table(io.BytesIO(body)).to_pylist()
        return out
    parts = sorted(Path(location).glob("*.parquet"))
    assert parts, f"no dataset parts under {location}"
    return [r for p in parts for r in pq.read_table(p).to_pylist()]


def round_plans(s3: SeaweedFS, output: str) -> list[Any]:
    if output.startswith("s3://"):
        prefix = output.removeprefix(f"s3://{BUCKET}/") + "/rounds/"
        keys = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"])
        return [json.loads(s3.client().get_object(Bucket=BUCKET, Key=k)["Body"].read()) for k in keys]
    return [json.loads(p.read_text()) for p in sorted(Path(output, "rounds").glob("r*/plan.json"))]


def test_same_manifest_local_and_operator_read_back_the_same(cluster: Cluster, s3: SeaweedFS, tmp_path: Path) -> None:
    doc = manifest("both", s3)
    doc["metadata"]["uid"] = "3f1c2d4e-0000-4000-8000-000000000001"  # kept by the emulator, as a restore keeps it

    local = copy.deepcopy(doc)
    local["spec"]["output"] = {"path": str(tmp_path / "both")}
    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump(local))
    genrun(["run", str(path), "--engine", "replay", "--quiet"], s3)

    with JobRunner(cluster, NS, {"GENRUN_ENGINE": "replay"}), OperatorProcess(cluster, NS):
        cluster.create(RUNS.format(ns=NS), doc)
        wait_for(lambda: succeeded(cluster, "both"), 240, "Succeeded")

    outputs = {"local": str(tmp_path / "both"), "cluster": f"s3://{BUCKET}/both"}
    status = {k: json.loads(genrun(["status", "--json", out], s3)) for k, out in outputs.items()}
    report = {k: json.loads(genrun(["report", "--json", out], s3).splitlines()[-1]) for k, out in outputs.items()}

    # Device time is measured wall time of each engine, so it differs between two runs; the rest must not.
    clocked = ("engineSeconds", "startupSeconds", "startupShare", "gpuHours")
    counts = {k: {f: v for f, v in st["totals"].items() if f not in clocked} for k, st in status.items()}
    assert counts["local"] == counts["cluster"] and counts["local"]["qcPassed"] >= 30
    for st in status.values():
        t = st["totals"]
        assert t["engineStarts"] == 1 and t["engineSeconds"] >= t["startupSeconds"] > 0, t
    assert status["local"]["rounds"] == status["cluster"]["rounds"] and len(status["local"]["rounds"]) >= 2
    for st in status.values():
        assert {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]}["Succeeded"] == ("True", "TargetMet")
    # The status the operator wrote to storage is the custom resource's, clocks aside.
    cr = cluster.run(NS, "both")["status"]
    shown = lambda st: {k: st[k] for k in ("round", "totals", "rounds", "output", "observedGeneration")}  # noqa: E731
    clockless = lambda st: [{**c, "lastTransitionTime": ""} for c in st["conditions"]]  # noqa: E731
    assert shown(cr) == shown(status["cluster"]) and clockless(cr) == clockless(status["cluster"])

    where = ("dataset", "report")
    same = lambda r: {k: v for k, v in r.items() if k not in where}  # noqa: E731
    assert same(report["local"]) == same(report["cluster"]) and report["local"]["round"] == len(
        status["local"]["rounds"]
    )
    assert round_plans(s3, outputs["local"]) == round_plans(s3, outputs["cluster"])
    datasets = {k: rows(s3, st["output"]["dataset"]) for k, st in status.items()}
    assert datasets["local"] == datasets["cluster"] and len(datasets["local"]) == status["local"]["totals"]["qcPassed"]
