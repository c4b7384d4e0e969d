"""The distribution ships every subpackage, and the model zoo only under pyro_slots."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _config():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_is_listed():
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "pyro_slots").rglob("__init__.py")
    }
    found.add("pyro_slots.models")
    assert set(_config()["packages"]) == found


def test_models_folder_maps_into_the_pyro_slots_namespace():
    cfg = _config()
    assert "models" not in cfg["packages"]
    assert cfg["package-dir"]["pyro_slots.models"] == "models"
    import pyro_slots.models

    assert Path(pyro_slots.models.__file__).parent == ROOT / "models"
