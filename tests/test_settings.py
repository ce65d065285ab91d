"""Configuration: defaults, environment variables, and one clear line for every bad value."""

from __future__ import annotations

from pathlib import Path

import platformdirs
import pytest

from gptunnel_mcp import ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [
        "GPTUNNEL_API_KEY",
        "GPTUNNEL_BASE_URL",
        "GPTUNNEL_MCP_HOME",
        "GPTUNNEL_DEFAULT_MODEL",
        "GPTUNNEL_WAIT_TIMEOUT",
    ]:
        monkeypatch.delenv(name, raising=False)


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTUNNEL_MCP_HOME", str(tmp_path / "home"))
    settings = load_settings()
    assert settings.api_key is None
    assert settings.api_base == "https://gptunnel.ru"
    assert settings.default_model.startswith("gpt-image-1")
    assert 0 < settings.wait_timeout < 60
    assert settings.images_dir.is_dir()


def test_environment_is_read_and_flags_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTUNNEL_MCP_HOME", str(tmp_path))
    monkeypatch.setenv("GPTUNNEL_API_KEY", "k")
    monkeypatch.setenv("GPTUNNEL_BASE_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("GPTUNNEL_WAIT_TIMEOUT", "12.5")
    settings = load_settings(wait_timeout="20")
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "k"
    assert settings.api_base == "http://127.0.0.1:9"
    assert settings.wait_timeout == 20


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("GPTUNNEL_WAIT_TIMEOUT", "soon", "invalid GPTUNNEL_WAIT_TIMEOUT"),
        ("GPTUNNEL_WAIT_TIMEOUT", "-3", "invalid GPTUNNEL_WAIT_TIMEOUT"),
        ("GPTUNNEL_BASE_URL", "gptunnel.ru", "invalid GPTUNNEL_BASE_URL"),
        ("GPTUNNEL_BASE_URL", "ftp://gptunnel.ru", "invalid GPTUNNEL_BASE_URL"),
        ("GPTUNNEL_MCP_PUBLIC_URL", "mcp.example.com", "invalid GPTUNNEL_MCP_PUBLIC_URL"),
        ("GPTUNNEL_MCP_PUBLIC_URL", "https://mcp.example.com/?via=x", "without a user name, password, query"),
        ("GPTUNNEL_EXPORT_DIRS", "/srv/images,exports", "must be an absolute path, and exports is not"),
    ],
)
def test_bad_values_give_one_line_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, words: str
) -> None:
    monkeypatch.setenv("GPTUNNEL_MCP_HOME", str(tmp_path))
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_the_public_url_is_a_base_for_links_and_its_password_is_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPTUNNEL_MCP_HOME", str(tmp_path))
    monkeypatch.setenv("GPTUNNEL_MCP_PUBLIC_URL", "https://mcp.example.com/gptunnel/")
    assert load_settings().public_base == "https://mcp.example.com/gptunnel"
    monkeypatch.setenv("GPTUNNEL_MCP_PUBLIC_URL", "https://user:hunter2-secret@mcp.example.com")
    with pytest.raises(ConfigError, match="GPTUNNEL_MCP_PUBLIC_URL") as info:
        load_settings()
    assert "hunter2-secret" not in str(info.value)


def test_home_that_cannot_be_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("GPTUNNEL_MCP_HOME", str(blocker / "home"))
    with pytest.raises(ConfigError, match="set GPTUNNEL_MCP_HOME to a writable folder"):
        load_settings()


def test_the_shells_own_variables_are_never_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Variables are matched case-insensitively: a bare field name would pick up HOME or PORT.
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    for name, value in {"HOST": "example.org", "PORT": "9", "TRANSPORT": "http", "SANDBOX": "1"}.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.home == platformdirs.user_data_path("gptunnel-mcp", appauthor=False)
    assert settings.home != tmp_path / "user"
    assert (settings.host, settings.port, settings.transport, settings.sandbox) == (
        "127.0.0.1",
        8000,
        "stdio",
        False,
    )


def test_export_folders_are_a_comma_separated_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTUNNEL_MCP_HOME", str(tmp_path))
    assert load_settings().export_dirs == []
    monkeypatch.setenv("GPTUNNEL_EXPORT_DIRS", "/srv/images, ~/Pictures ,")
    assert load_settings().export_dirs == [Path("/srv/images"), Path.home() / "Pictures"]
