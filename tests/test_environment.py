"""environment.yml (conda) installs the same dependencies as pyproject.toml (pip)."""

import re
import tomllib

import yaml

from nbutils.config import PROJECT_ROOT


def _normalise(spec: str) -> str:
    name, rest = re.match(r"([A-Za-z0-9_.\-]+)(.*)", spec.replace(" ", "")).groups()
    return name.lower().replace("_", "-") + rest


def test_environment_yml_matches_pyproject():
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    pip_deps = {_normalise(d) for d in pyproject["project"]["dependencies"]}
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    conda_pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert {_normalise(d) for d in conda_pip} == pip_deps
    assert any(str(d).startswith("python") for d in env["dependencies"])
