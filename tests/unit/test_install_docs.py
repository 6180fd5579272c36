"""How a user gets genrun: the README and docs/install.md build the two images the chart needs from the Dockerfiles
(hadolint checks the files themselves: tests/integration/test_chart.py) and point the chart's values at them; the
main job's setup installs the runtime only, the tests' setup everything."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ("Dockerfile.operator", "Dockerfile.worker")


def shell_lines(markdown: str) -> list[str]:
    """The commands of the document's ```bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", markdown, re.S)
    return [line for b in blocks for line in b.replace("\\\n", " ").splitlines()]


def test_readme_and_install_doc_build_and_push_both_images_and_install_the_chart_with_them() -> None:
    values = yaml.safe_load((ROOT / "charts" / "genrun" / "values.yaml").read_text())
    for doc in ("README.md", "docs/install.md"):
        lines = shell_lines((ROOT / doc).read_text())
        for dockerfile in DOCKERFILES:
            assert (ROOT / dockerfile).is_file()
            build = [x for x in lines if f"docker build -f {dockerfile} " in x]
            assert build, f"{doc}: no `docker build -f {dockerfile}`"
            tag = re.search(r"-t (\S+)", build[0])
            assert tag and any(f"docker push {tag.group(1)}" in x for x in lines), f"{doc}: {dockerfile} is not pushed"
        helm = next(x for x in lines if x.startswith("helm install genrun charts/genrun"))
        sets = dict(re.findall(r"--set ([\w.]+)=(\S+)", helm))
        for key in sets:  # every value the command sets is one the chart has
            node = values
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{doc}: --set {key}: no such chart value"
                node = node[part]
        assert "genrun-operator" in sets["image.repository"] and "genrun-worker" in sets["operator.workerImage"]


def fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    """An emulated virtualenv: its python and genrun only log their arguments (no package is installed)."""
    venv, log = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    for name in ("python", "genrun"):
        exe = venv / "bin" / name
        exe.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n')
        exe.chmod(0o755)
    return venv, log


def test_setup_runtime_installs_no_test_tools_emulated_pip(tmp_path: Path) -> None:
    venv, log = fake_venv(tmp_path)
    env = {**os.environ, "GENRUN_VENV": str(venv), "PATH": f"{tmp_path / 'none'}:/usr/bin:/bin"}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--runtime"], env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    installs = [c for c in calls if " install " in c and " -e " in c]
    assert installs == ["python -m pip --disable-pip-version-check install -q -e .[worker-cpu,hub]"]
    assert "genrun model prepare" in calls
    assert not any(t in c for c in calls for t in ("dev]", "checkov", "prometheus"))


def test_setup_refuses_an_unknown_option_before_touching_anything(tmp_path: Path) -> None:
    venv, log = fake_venv(tmp_path)
    res = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), "--test-only"],
                         env={**os.environ, "GENRUN_VENV": str(venv)}, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 2 and "unknown option '--test-only'" in res.stderr
    assert not log.exists()


def test_quickstart_sets_up_the_runtime_and_test_sets_up_everything() -> None:
    quick = (ROOT / "scripts" / "quickstart.sh").read_text()
    test = (ROOT / "scripts" / "test.sh").read_text()
    assert re.search(r"^bash scripts/setup\.sh --runtime$", quick, re.M)
    assert re.search(r"^bash scripts/setup\.sh$", test, re.M)
