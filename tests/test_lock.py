"""The lock file and pyproject.toml agree, and this environment is exactly what the lock says.

`requirements.lock` pins every package the install brings in (runtime and the `test` extra). It is made by the
command in its own header, which docs/install.md documents; rerun that command after any change to the dependencies.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)")


def parse_lock(text: str) -> dict[str, str]:
    """{canonical name: version} of every pinned line."""
    pins = {}
    for line in text.splitlines():
        m = PIN.match(line)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def declared(pyproject: dict) -> list[Requirement]:
    """The runtime dependencies and every extra's, as requirements."""
    project = pyproject["project"]
    extras = project.get("optional-dependencies", {})
    return [Requirement(r) for r in project["dependencies"] + [r for rs in extras.values() for r in rs]]


def disagreements(pyproject_text: str, lock_text: str) -> list[str]:
    """What a change to pyproject.toml without re-locking leaves behind: a dependency (or a resolver constraint)
    missing from the lock, or pinned there at a version its specifier rejects."""
    pyproject = tomllib.loads(pyproject_text)
    lock = parse_lock(lock_text)
    constraints = [Requirement(r) for r in pyproject.get("tool", {}).get("uv", {}).get("constraint-dependencies", [])]
    problems = []
    for req in declared(pyproject):
        name = canonicalize_name(req.name)
        if name not in lock:
            problems.append(f"{req} is declared in pyproject.toml but not in requirements.lock")
        elif not req.specifier.contains(lock[name], prereleases=True):
            problems.append(f"{req} is declared in pyproject.toml but requirements.lock pins {name}=={lock[name]}")
    for req in constraints:
        name = canonicalize_name(req.name)
        if name in lock and not req.specifier.contains(lock[name], prereleases=True):
            problems.append(f"constraint {req} is violated: requirements.lock pins {name}=={lock[name]}")
    return problems


def installed_closure(roots: list[Requirement]) -> dict[str, str]:
    """{canonical name: installed version} of `roots` and everything they require here, extras and markers
    evaluated for this interpreter and platform."""
    seen: dict[str, str] = {}
    done: set[tuple[str, frozenset]] = set()
    stack = list(roots)
    while stack:
        req = stack.pop()
        name, extras = canonicalize_name(req.name), frozenset(req.extras)
        if (name, extras) in done:
            continue
        done.add((name, extras))
        dist = metadata.distribution(name)
        seen[name] = dist.version
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (extras or {""})):
                stack.append(sub)
    return seen


def test_pyproject_and_lock_agree():
    problems = disagreements((REPO / "pyproject.toml").read_text(), (REPO / "requirements.lock").read_text())
    assert not problems, "; ".join(problems) + ". Refresh the lock with the command in its header (docs/install.md)"


def test_a_dependency_added_or_repinned_without_relocking_is_caught():
    pyproject, lock = (REPO / "pyproject.toml").read_text(), (REPO / "requirements.lock").read_text()
    added = pyproject.replace('"tqdm==', '"not-a-locked-package==1.0",\n    "tqdm==')
    repinned = pyproject.replace('"transformers==5.23.0"', '"transformers==5.24.0"')
    assert added != pyproject and repinned != pyproject
    assert any("not-a-locked-package" in p for p in disagreements(added, lock))
    assert any("transformers" in p for p in disagreements(repinned, lock))
    tightened = pyproject.replace('"filelock<4.3"', '"filelock<4.2"')
    assert any("filelock" in p for p in disagreements(tightened, lock))


def test_lock_header_is_the_documented_refresh_command():
    header = (REPO / "requirements.lock").read_text().splitlines()[1].strip("# ").strip()
    assert header.startswith("uv pip compile pyproject.toml")
    documented = (REPO / "docs" / "install.md").read_text()
    assert header in documented, "docs/install.md must show the command that made the lock"


def test_this_environment_is_exactly_the_lock():
    """Every package reachable from pyproject.toml is installed at its locked version, and the lock holds nothing
    else (a stale pin). Fails in an environment installed without the lock."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    lock = parse_lock((REPO / "requirements.lock").read_text())
    try:
        closure = installed_closure(declared(pyproject))
    except metadata.PackageNotFoundError as e:
        pytest.fail(f"{e} is required but not installed: install with the README's commands")
    wrong = {n: (v, lock.get(n)) for n, v in closure.items() if lock.get(n) != v}
    assert not wrong, f"installed (version, locked version) differ: {wrong}"
    stale = sorted(set(lock) - set(closure))
    assert not stale, f"requirements.lock pins packages nothing here requires: {stale}; refresh the lock"
