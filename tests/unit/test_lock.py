"""``requirements.lock`` (the tested set that set-up installs) agrees with ``pyproject.toml``.

Fails when a dependency or extra is added or its range changed without refreshing the lock
(``bash scripts/lock.sh``), or when the lock pins a version outside the declared range.
"""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
GPU_ONLY_EXTRAS = {"gpu"}  # never installed on the CPU machines the lock is for


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra, requirements in project["optional-dependencies"].items():
        if extra not in GPU_ONLY_EXTRAS:
            lines += requirements
    return [Requirement(line) for line in lines]


def _locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"requirements.lock: {line!r} is not a NAME==VERSION pin"
        pins[canonicalize_name(name)] = version
    return pins


def test_every_declared_dependency_is_pinned_inside_its_range():
    pins = _locked()
    problems = []
    for requirement in _declared():
        version = pins.get(canonicalize_name(requirement.name))
        if version is None:
            problems.append(f"{requirement.name} is not pinned")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement.name}=={version} is outside {requirement.specifier}")
    assert not problems, "pyproject.toml and requirements.lock disagree (refresh with `bash " \
        "scripts/lock.sh`): " + "; ".join(problems)


def test_the_lock_holds_no_gpu_only_package():
    pins = _locked()
    assert not [name for name in pins if name.startswith("nvidia-")
                or name.startswith("transformer-engine")]
