"""The distribution ships every subpackage, and the model zoo only under pyro_slots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
#: Folders of data files shipped as packages without an ``__init__.py`` (no Python code).
DATA_PACKAGES = {"pyro_slots.configs"}


def _config():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_is_listed():
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "pyro_slots").rglob("__init__.py")
    }
    found.add("pyro_slots.models")
    assert set(_config()["packages"]) == found | DATA_PACKAGES


def test_models_folder_maps_into_the_pyro_slots_namespace():
    cfg = _config()
    assert "models" not in cfg["packages"]
    assert cfg["package-dir"]["pyro_slots.models"] == "models"
    import pyro_slots.models

    assert Path(pyro_slots.models.__file__).parent == ROOT / "models"


def test_every_public_subpackage_is_an_attribute_of_the_package_lazily():
    """In a fresh interpreter: ``import pyro_slots`` loads neither ArviZ nor matplotlib, and every
    public subpackage listed in pyproject.toml is then reachable as an attribute."""
    subpackages = sorted(
        name.split(".")[1]
        for name in _config()["packages"]
        if name.count(".") == 1 and name not in DATA_PACKAGES
    )
    code = f"""
import json, sys
import pyro_slots
heavy = [m for m in ("arviz", "matplotlib", "pyro_slots.diagnostics", "pyro_slots.cli")
         if m in sys.modules]
found = {{}}
for name in {subpackages!r}:
    module = getattr(pyro_slots, name)
    found[name] = module.__name__
    assert sys.modules[module.__name__] is module
assert pyro_slots.diagnostics.summary is sys.modules["pyro_slots.diagnostics"].summary
print(json.dumps({{"heavy": heavy, "found": found, "dir": dir(pyro_slots)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["heavy"] == []
    assert report["found"] == {name: f"pyro_slots.{name}" for name in subpackages}
    assert set(subpackages) <= set(report["dir"])
    import pyro_slots

    assert set(subpackages) <= set(pyro_slots.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        pyro_slots.nothing  # noqa: B018


def test_the_shipped_recipes_are_package_data():
    """pyro_slots/configs/*.yaml (``pyro-slots train --config NAME``) is in the distribution:
    the package-data pattern matches every recipe file and nothing else is in the folder."""
    patterns = _config()["package-data"]["pyro_slots.configs"]
    assert patterns == ["*.yaml"]
    folder = ROOT / "pyro_slots" / "configs"
    files = sorted(p.name for p in folder.iterdir())
    assert files and files == sorted(p.name for p in folder.glob("*.yaml"))
