"""Packaging: the folders import as genrun.operator / genrun.worker from an editable install and from a wheel, and
the operator never loads the worker's engine."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = (
    "import sys, genrun.operator, genrun.operator.planner, genrun.operator.validate, genrun.worker, "
    "genrun.contract.records, genrun.crds, genrun.contract.api; "
    "from genrun.operator.validate import load_crd; assert load_crd()['spec']['group'] == 'genrun.io'; "
    "heavy = sorted(m for m in ('vllm', 'torch', 'pyarrow', 'kopf') if m in sys.modules); "
    "print('loaded:', heavy, genrun.operator.__file__)"
)


def test_operator_import_loads_no_engine() -> None:
    out = subprocess.run([sys.executable, "-P", "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert "loaded: []" in out


def test_repo_root_does_not_shadow_the_standard_library(tmp_path: Path) -> None:
    """Our folder is named `operator`; in a clean interpreter, `python -m` from the repo root would import it instead
    of the standard library. The scripts export PYTHONSAFEPATH=1 and genrun spawns Python with -P: check both hold."""
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    base = str(_fresh_venv(tmp_path / "clean", site=False))  # a new venv: nothing imports `operator` early
    shadowed = subprocess.run([base, "-m", "json.tool", "--help"], cwd=ROOT, env=clean, capture_output=True, text=True)
    assert shadowed.returncode != 0 and "cannot import name" in shadowed.stderr  # the hazard is real
    safe = subprocess.run(
        [base, "-P", "-m", "json.tool", "--help"], cwd=ROOT, env=clean, capture_output=True, text=True
    )
    assert safe.returncode == 0, safe.stderr
    for script in ("scripts/setup.sh", "scripts/test.sh", "scripts/lint.sh", "scripts/quickstart.sh", ".ci/run"):
        assert "export PYTHONSAFEPATH=1" in (ROOT / script).read_text(), script


def test_no_bare_operator_import() -> None:
    for path in [
        *ROOT.glob("contract/**/*.py"),
        *ROOT.glob("operator/**/*.py"),
        *ROOT.glob("worker/**/*.py"),
        *ROOT.glob("tests/**/*.py"),
    ]:
        for line in path.read_text().splitlines():
            assert not line.startswith(("import operator", "from operator ")), f"{path}: {line}"


def _fresh_venv(where: Path, site: bool = True) -> Path:
    # System site-packages give the new venv our dependencies without a download; only genrun is installed anew.
    venv.EnvBuilder(with_pip=False, system_site_packages=site).create(where)
    return where / "bin" / "python"


@pytest.fixture(scope="module")
def deps_path() -> str:
    import jsonschema
    import yaml  # noqa: F401  (the probe needs the core dependencies on the path)

    return str(Path(jsonschema.__file__).parents[1])


@pytest.mark.parametrize("mode", ["editable", "wheel"])
def test_install_imports(mode: str, tmp_path: Path, deps_path: str) -> None:
    py = _fresh_venv(tmp_path / "venv")
    env = {**os.environ, "PYTHONPATH": deps_path, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [
        sys.executable,
        "-P",
        "-m",
        "pip",
        "--python",
        str(py),
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
    ]
    if mode == "editable":
        subprocess.run([*pip, "-e", str(ROOT)], check=True, env=env, cwd=tmp_path)
    else:
        subprocess.run(
            [
                sys.executable,
                "-P",
                "-m",
                "build",
                "--wheel",
                "--no-isolation",
                "--outdir",
                str(tmp_path / "dist"),
                str(ROOT),
            ],
            check=True,
            capture_output=True,
            env=env,
        )
        wheel = next((tmp_path / "dist").glob("genrun-*.whl"))
        subprocess.run([*pip, str(wheel)], check=True, env=env, cwd=tmp_path)
    # Run from an empty folder so the checkout itself is not on the path.
    res = subprocess.run([str(py), "-c", PROBE], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "loaded: []" in res.stdout
    where = res.stdout.split()[-1]
    if mode == "wheel":
        assert "site-packages" in where and str(ROOT) not in where
    else:
        assert where.startswith(str(ROOT / "operator"))
    cli = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "genrun"), "validate", str(ROOT / "examples" / "quickstart.yaml")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert cli.returncode == 0, cli.stderr
