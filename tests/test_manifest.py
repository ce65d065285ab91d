"""server.json is a valid MCP registry manifest, and every place that names the version agrees."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import gptunnel_mcp

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
#: A copy of https://static.modelcontextprotocol.io/schemas/2025-12-11/server.schema.json: no
#: machine here can download it, and the test must run in a plain clone.
SCHEMA = Path(__file__).parent / "data" / "server.schema.2025-12-11.json"
MANIFEST = json.loads((ROOT / "server.json").read_text())


def test_server_json_is_valid_against_the_registry_schema() -> None:
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(MANIFEST, schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def test_versions_agree() -> None:
    # pyproject reads the version from the package, so checking the package covers it; the
    # built metadata of the installed distribution proves that link works.
    from importlib.metadata import version

    assert MANIFEST["version"] == gptunnel_mcp.__version__
    assert [p["version"] for p in MANIFEST["packages"]] == [gptunnel_mcp.__version__]
    assert version("gptunnel-mcp") == gptunnel_mcp.__version__
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["hatch"]["version"]["path"] == "src/gptunnel_mcp/_version.py"


def test_manifest_declares_the_key_as_a_required_secret_and_readme_proves_ownership() -> None:
    (package,) = MANIFEST["packages"]
    assert package["registryType"] == "pypi" and package["identifier"] == "gptunnel-mcp"
    assert package["transport"] == {"type": "stdio"}
    env = {v["name"]: v for v in package["environmentVariables"]}
    assert env["GPTUNNEL_API_KEY"]["isRequired"] and env["GPTUNNEL_API_KEY"]["isSecret"]
    assert not any(v.get("isRequired") for n, v in env.items() if n != "GPTUNNEL_API_KEY")
    assert f"mcp-name: {MANIFEST['name']}" in (ROOT / "README.md").read_text()
