"""The package's declared dependencies: each floor in pyproject.toml is the version .ci/floors.txt pins, the
stack `bash .ci/floors` runs the suite on."""
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
FLOORS = ROOT / ".ci" / "floors.txt"


def dependencies() -> list[Requirement]:
    """pyproject.toml's [project] dependencies (read as text: Python 3.10 has no tomllib)."""
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    return [Requirement(r) for r in re.findall(r'"([^"]+)"', block.group(1))]


def pins() -> dict[str, Version]:
    out = {}
    for line in FLOORS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            out[name.strip()] = Version(version)
    return out


def test_the_declared_floors_are_the_tested_ones():
    declared = {req.name: {Version(s.version) for s in req.specifier if s.operator == ">="}
                for req in dependencies()}
    assert "torch" in declared and "datasets" in declared  # (the whole list was read)
    floors = pins()
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(floors)
    for name, version in floors.items():
        assert declared.get(name) == {version}, f"pyproject.toml's floor for {name} is {declared.get(name)}, " \
                                                f".ci/floors.txt pins {version}"


def test_the_floor_run_uses_the_oldest_python_declared():
    text = (ROOT / "pyproject.toml").read_text()
    oldest = re.search(r'^requires-python = ">=(\d+\.\d+)"', text, re.M).group(1)
    assert re.search(r"PYTHON:-python(\d+\.\d+)", (ROOT / ".ci" / "floors").read_text()).group(1) == oldest
