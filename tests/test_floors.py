"""The dependency floors that pyproject.toml promises are the versions `make test-min` tests: requirements-min.txt
pins each declared requirement at its floor (one `>=` a requirement, nothing else), and under `make test-min`
(LLMERASER_TEST_MIN set) the installed versions are those pins."""

from __future__ import annotations

import os
import re
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11, as the test extra (trl) needs

ROOT = Path(__file__).resolve().parents[1]
TESTED = ("dependencies", "test", "formats", "embedded")  # what make test-min installs; `bench` is not


def declared() -> dict[str, list[Requirement]]:
    """pyproject's requirements by group: `dependencies` and each optional extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"dependencies": project["dependencies"], **project["optional-dependencies"]}
    return {g: [Requirement(r) for r in reqs] for g, reqs in groups.items()}


def pins() -> dict[str, Version]:
    """requirements-min.txt: name → pinned version (each line `name==version`, comments and blanks aside)."""
    out = {}
    for line in (ROOT / "requirements-min.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.]*)", line)
            assert m, f"requirements-min.txt: {line!r} is not name==version"
            name = canonicalize_name(m[1])
            assert name not in out, f"requirements-min.txt pins {name} twice"
            out[name] = Version(m[2])
    return out


def floor(req: Requirement) -> Version:
    (spec,) = req.specifier  # one specifier: a floor, no cap (a cap would need its own test)
    assert spec.operator == ">=", f"{req}: a floor is declared as >=, got {spec.operator}"
    return Version(spec.version)


def test_every_tested_requirement_is_pinned_at_its_floor() -> None:
    pinned, groups = pins(), declared()
    for group in TESTED:
        for req in groups[group]:
            name = canonicalize_name(req.name)
            assert name in pinned, f"pyproject {group}: {req} has no pin in requirements-min.txt"
            assert pinned[name] == floor(req), f"pyproject {group}: {req}, but requirements-min.txt pins {pinned[name]}"
    # an untested group's requirement on a pinned package declares the same floor
    for req in (r for g, reqs in groups.items() if g not in TESTED for r in reqs):
        if canonicalize_name(req.name) in pinned:
            assert pinned[canonicalize_name(req.name)] == floor(req), f"{req} disagrees with requirements-min.txt"


def test_every_pin_is_a_declared_floor() -> None:
    names = {canonicalize_name(r.name) for g in TESTED for r in declared()[g]}
    assert set(pins()) <= names, f"pinned but not declared: {sorted(set(pins()) - names)}"


@pytest.mark.skipif(not os.environ.get("LLMERASER_TEST_MIN"), reason="only under make test-min")
def test_the_installed_versions_are_the_floors() -> None:
    """make test-min ran at the floors: each pinned package is installed at its pin (a local label such as torch's
    `+cpu` aside)."""
    for name, pin in pins().items():
        assert Version(Version(version(name)).public) == pin, f"{name} {version(name)} installed, {pin} pinned"
