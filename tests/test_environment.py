"""environment.yml (what Binder installs) agrees with pyproject.toml (what pip installs)."""
from pathlib import Path

import tomllib
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def requirements(lines):
    """{normalised name: specifier} of requirement strings (pip options are skipped)."""
    out = {}
    for line in lines:
        if line.strip().startswith("-"):
            continue
        req = Requirement(line)
        out[req.name.lower().replace("_", "-")] = str(req.specifier)
    return out


def pyproject_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return requirements(project["dependencies"] + project["optional-dependencies"]["book"])


def environment():
    return yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))


def environment_pip_lines():
    pips = [d["pip"] for d in environment()["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1, "environment.yml needs exactly one pip: section"
    return pips[0]


def test_environment_lists_the_same_dependencies_as_pyproject():
    want = pyproject_requirements()
    have = requirements(environment_pip_lines())
    assert sorted(set(want) - set(have)) == [], "in pyproject.toml but not environment.yml"
    assert sorted(set(have) - set(want)) == [], "in environment.yml but not pyproject.toml"
    differing = {name: (want[name], have[name]) for name in want if want[name] != have[name]}
    assert not differing, f"version ranges differ (pyproject, environment): {differing}"


def test_environment_is_python_311_with_pip_and_installs_the_package():
    conda = [d for d in environment()["dependencies"] if isinstance(d, str)]
    assert "python=3.11" in conda and "pip" in conda
    assert "-e ." in environment_pip_lines()


def test_pyproject_never_asks_for_a_torch_newer_than_this_machine_has():
    # torch 2.14.1 / torchvision 0.29.1 are what the registries here resolve to.
    deps = pyproject_requirements()
    assert Requirement("torch" + deps["torch"]).specifier.contains("2.14.1")
    assert Requirement("torchvision" + deps["torchvision"]).specifier.contains("0.29.1")


def test_test_extra_includes_the_book_extra():
    # scripts/setup.sh counts a satisfied [test] install as a satisfied [book] install.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert set(requirements(extras["book"]).items()) <= set(requirements(extras["test"]).items())
