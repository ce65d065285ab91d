"""Configuration from environment variables (and CLI flags, which override them)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import platformdirs
from pydantic import (
    BeforeValidator,
    Field,
    HttpUrl,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ._exceptions import ConfigError

DEFAULT_BASE_URL = "https://gptunnel.ru"
DEFAULT_MODEL = "gpt-image-1-medium"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _split_commas(value: Any) -> Any:
    return [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else value


#: A list given in one environment variable as "a,b,c" (pydantic-settings would expect JSON).
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]
PathList = Annotated[list[Path], NoDecode, BeforeValidator(_split_commas)]


def _default_home() -> Path:
    return platformdirs.user_data_path("gptunnel-mcp", appauthor=False)


class Settings(BaseSettings):
    """Everything the server can be told. Field docs double as the README's reference."""

    # Every variable is named in full (validation_alias) and none by its bare field name: matching
    # is case-insensitive, and HOME, HOST or PORT from the user's shell must never be read.
    model_config = SettingsConfigDict(
        env_prefix="GPTUNNEL_",
        populate_by_name=True,
        extra="ignore",
        # An empty variable (`GPTUNNEL_API_KEY=`) means "not set", as shells and MCP client
        # configs commonly leave them.
        env_ignore_empty=True,
    )

    api_key: SecretStr | None = Field(
        default=None, description="GPTunnel API key, sent as bare Authorization."
    )
    base_url: HttpUrl = Field(default=HttpUrl(DEFAULT_BASE_URL), description="GPTunnel API base URL.")
    home: Path = Field(
        default_factory=_default_home,
        validation_alias="GPTUNNEL_MCP_HOME",
        description="Folder for the history database and the image files.",
    )
    database_url: SecretStr | None = Field(
        default=None,
        validation_alias="GPTUNNEL_MCP_DATABASE_URL",
        description="A PostgreSQL database for the history, shared by every replica that names it "
        "(postgresql://user:password@host:port/database); unset: SQLite in GPTUNNEL_MCP_HOME.",
    )
    lease_seconds: float = Field(
        default=10.0,
        ge=1,
        le=300,
        validation_alias="GPTUNNEL_MCP_LEASE_SECONDS",
        description="How long a replica's claim on a pending task outlives it: another replica "
        "adopts the task that much (and a third of it) after the first died.",
    )
    default_model: str = Field(
        default=DEFAULT_MODEL, min_length=1, description="Model used when none is named."
    )
    wait_timeout: float = Field(
        default=50.0, gt=0, le=3600, description="Longest a generate_and_wait call waits, in seconds."
    )
    preview_max_px: int = Field(default=512, ge=64, le=2048, description="Long side of inline previews.")
    max_image_bytes: int = Field(
        default=50 * 1024 * 1024, ge=1024, description="Largest image file accepted from GPTunnel."
    )
    max_image_pixels: int = Field(
        default=40_000_000,
        ge=1_000_000,
        description="Largest image accepted, in pixels (width x height), checked from the file's header "
        "before anything decodes it: a small file can unpack into gigabytes.",
    )
    allow_private_downloads: bool = Field(
        default=False,
        validation_alias="GPTUNNEL_ALLOW_PRIVATE_DOWNLOADS",
        description="Let image links point at loopback, private or link-local addresses other than "
        "GPTUNNEL_BASE_URL's own (a GPTunnel stand-in on a private network).",
    )
    request_timeout: float = Field(default=30.0, gt=0, le=600, description="Timeout of one HTTP request.")
    reuse_window: float = Field(
        default=600.0,
        ge=0,
        description="Seconds after which an identical finished request makes a new image (0: never reuse).",
    )
    max_images_per_hour: int | None = Field(default=None, ge=0, description="Cap on images created per hour.")
    max_images_per_day: int | None = Field(default=None, ge=0, description="Cap on images created per day.")
    export_dirs: PathList = Field(
        default_factory=list,
        validation_alias="GPTUNNEL_EXPORT_DIRS",
        description="Folders save_image may write into for clients that share no roots, as absolute "
        "paths separated by commas; a relative destination is taken from the first.",
    )
    max_spend_per_day: float | None = Field(
        default=None,
        ge=0,
        le=10_000_000,
        allow_inf_nan=False,
        description="Budget in roubles per rolling 24 hours: what GPTunnel reported the images cost, "
        "plus estimates for those still being made and those asked for.",
    )

    # Serving over HTTP (the MCP_ variables are about this server, not about GPTunnel).
    transport: Literal["stdio", "http"] = Field(default="stdio", validation_alias="GPTUNNEL_MCP_TRANSPORT")
    host: str = Field(default="127.0.0.1", validation_alias="GPTUNNEL_MCP_HOST")
    port: int = Field(default=8000, ge=0, le=65535, validation_alias="GPTUNNEL_MCP_PORT")
    allowed_hosts: CommaList = Field(default_factory=list, validation_alias="GPTUNNEL_MCP_ALLOWED_HOSTS")
    allowed_origins: CommaList = Field(default_factory=list, validation_alias="GPTUNNEL_MCP_ALLOWED_ORIGINS")
    auth_token: SecretStr | None = Field(default=None, validation_alias="GPTUNNEL_MCP_AUTH_TOKEN")
    sandbox: bool = Field(
        default=False,
        validation_alias="GPTUNNEL_SANDBOX",
        description="Serve against a built-in stand-in GPTunnel: no key, no network, no cost.",
    )
    multi_user: bool = Field(default=False, validation_alias="GPTUNNEL_MCP_MULTI_USER")
    max_connections: int = Field(
        default=500,
        ge=1,
        validation_alias="GPTUNNEL_MCP_MAX_CONNECTIONS",
        description="Open HTTP connections at most; more are answered 503 and closed.",
    )
    header_timeout: float = Field(
        default=10.0,
        gt=0,
        le=300,
        validation_alias="GPTUNNEL_MCP_HEADER_TIMEOUT",
        description="Seconds a client has to send a request's headers (from connecting, or its first byte).",
    )
    body_timeout: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        validation_alias="GPTUNNEL_MCP_BODY_TIMEOUT",
        description="Seconds a client has to send a request's body once its headers are in.",
    )
    session_idle_timeout: float = Field(
        default=1800.0,
        gt=0,
        le=86400,
        validation_alias="GPTUNNEL_MCP_SESSION_IDLE_TIMEOUT",
        description="Seconds a 2025-11-25 session may go without a request before it ends.",
    )
    max_sessions_per_user: int = Field(
        default=100,
        ge=1,
        validation_alias="GPTUNNEL_MCP_MAX_SESSIONS_PER_USER",
        description="Open 2025-11-25 sessions one user (one key) may have in multi-user mode.",
    )
    auth_failures_per_minute: int = Field(
        default=10,
        ge=1,
        validation_alias="GPTUNNEL_MCP_AUTH_FAILURES_PER_MINUTE",
        description="Refused credentials one client address may send per minute before it gets 429.",
    )
    public_url: HttpUrl | None = Field(
        default=None,
        validation_alias="GPTUNNEL_MCP_PUBLIC_URL",
        description="The address at which GPTunnel reaches this HTTP server (behind a proxy, with the "
        "path it serves the server under): a reference to one of your own images older than GPTunnel's "
        "48 hours is then sent as a signed link to it, which expires within the hour.",
    )

    @field_validator("base_url")
    @classmethod
    def _http_only(cls, value: HttpUrl) -> HttpUrl:
        if value.scheme not in ("http", "https"):
            raise ValueError("must start with http:// or https://")
        return value

    @field_validator("public_url")
    @classmethod
    def _plain_base(cls, value: HttpUrl | None) -> HttpUrl | None:
        if value is None:
            return None
        # Links are made by appending a path to it: anything after the path would end up inside them.
        if value.username is not None or value.password is not None or value.query or value.fragment:
            raise ValueError("must be a plain base URL, without a user name, password, query or fragment")
        return value

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and urlsplit(value.get_secret_value()).scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a PostgreSQL URL, starting with postgresql:// or postgres://")
        return value

    @field_validator("export_dirs")
    @classmethod
    def _absolute_folders(cls, value: list[Path]) -> list[Path]:
        # Relative to what? The server's working folder is whatever its client started it in.
        relative = [str(path) for path in value if not path.expanduser().is_absolute()]
        if relative:
            raise ValueError(f"each folder must be an absolute path, and {', '.join(relative)} is not")
        return [path.expanduser() for path in value]

    @field_validator("home", mode="before")
    @classmethod
    def _expand_home(cls, value: Any) -> Any:
        return Path(value).expanduser() if isinstance(value, str) and value else value

    @property
    def has_http_auth(self) -> bool:
        return self.auth_token is not None or self.multi_user

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    @property
    def api_base(self) -> str:
        return str(self.base_url).rstrip("/")

    @property
    def public_base(self) -> str | None:
        """`public_url` without its trailing slash, for links to be appended to."""
        return None if self.public_url is None else str(self.public_url).rstrip("/")

    @property
    def db_path(self) -> Path:
        return self.home / "history.sqlite3"

    @property
    def images_dir(self) -> Path:
        return self.home / "images"


# Names of the environment variables, for error messages that tell the user what to change.
_ENV_NAMES = {
    "api_key": "GPTUNNEL_API_KEY",
    "base_url": "GPTUNNEL_BASE_URL",
    "home": "GPTUNNEL_MCP_HOME",
    "database_url": "GPTUNNEL_MCP_DATABASE_URL",
    "lease_seconds": "GPTUNNEL_MCP_LEASE_SECONDS",
    "default_model": "GPTUNNEL_DEFAULT_MODEL",
    "wait_timeout": "GPTUNNEL_WAIT_TIMEOUT",
    "preview_max_px": "GPTUNNEL_PREVIEW_MAX_PX",
    "max_image_bytes": "GPTUNNEL_MAX_IMAGE_BYTES",
    "max_image_pixels": "GPTUNNEL_MAX_IMAGE_PIXELS",
    "allow_private_downloads": "GPTUNNEL_ALLOW_PRIVATE_DOWNLOADS",
    "request_timeout": "GPTUNNEL_REQUEST_TIMEOUT",
    "reuse_window": "GPTUNNEL_REUSE_WINDOW",
    "max_images_per_hour": "GPTUNNEL_MAX_IMAGES_PER_HOUR",
    "max_images_per_day": "GPTUNNEL_MAX_IMAGES_PER_DAY",
    "export_dirs": "GPTUNNEL_EXPORT_DIRS",
    "max_spend_per_day": "GPTUNNEL_MAX_SPEND_PER_DAY",
    "transport": "GPTUNNEL_MCP_TRANSPORT",
    "host": "GPTUNNEL_MCP_HOST",
    "port": "GPTUNNEL_MCP_PORT",
    "allowed_hosts": "GPTUNNEL_MCP_ALLOWED_HOSTS",
    "allowed_origins": "GPTUNNEL_MCP_ALLOWED_ORIGINS",
    "auth_token": "GPTUNNEL_MCP_AUTH_TOKEN",
    "multi_user": "GPTUNNEL_MCP_MULTI_USER",
    "sandbox": "GPTUNNEL_SANDBOX",
    "max_connections": "GPTUNNEL_MCP_MAX_CONNECTIONS",
    "header_timeout": "GPTUNNEL_MCP_HEADER_TIMEOUT",
    "body_timeout": "GPTUNNEL_MCP_BODY_TIMEOUT",
    "session_idle_timeout": "GPTUNNEL_MCP_SESSION_IDLE_TIMEOUT",
    "max_sessions_per_user": "GPTUNNEL_MCP_MAX_SESSIONS_PER_USER",
    "auth_failures_per_minute": "GPTUNNEL_MCP_AUTH_FAILURES_PER_MINUTE",
    "public_url": "GPTUNNEL_MCP_PUBLIC_URL",
}


def load_settings(**overrides: Any) -> Settings:
    """Read the environment, apply `overrides` (CLI flags), and make sure the home folder exists.

    Raises `ConfigError` with one line naming the variable and what is wrong with it.
    """
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        name = _ENV_NAMES.get(field, field)
        # The rejected value is shown, so a typo is easy to spot, but never a secret. (`field` is
        # the variable's name for the fields read by their full name.)
        shown = f" (got {err.get('input')!r})"
        if name in ("GPTUNNEL_API_KEY", "GPTUNNEL_MCP_AUTH_TOKEN"):
            shown = ""
        elif name in ("GPTUNNEL_MCP_DATABASE_URL", "GPTUNNEL_MCP_PUBLIC_URL"):
            shown = f" (got {mask_password(str(err.get('input')))!r})"
        raise ConfigError(f"invalid {name}: {err['msg']}{shown}") from None
    _check_combinations(settings)
    if settings.sandbox:
        # Sandbox images are pictures of their prompts: keep them out of the real history.
        settings.home = settings.home / "sandbox"
    ensure_home(settings)
    return settings


def _check_combinations(settings: Settings) -> None:
    """Settings that are each valid but unsafe or meaningless together."""
    if settings.multi_user and not settings.sandbox:
        if settings.transport != "http":
            raise ConfigError(
                "GPTUNNEL_MCP_MULTI_USER needs the HTTP transport: set GPTUNNEL_MCP_TRANSPORT=http "
                "(or pass --transport http)"
            )
        if settings.api_key is not None:
            raise ConfigError(
                "GPTUNNEL_MCP_MULTI_USER=1 uses each client's own key; unset GPTUNNEL_API_KEY so the "
                "server holds none"
            )
        if settings.auth_token is not None:
            raise ConfigError(
                "in multi-user mode clients authenticate with their GPTunnel key as the Bearer token; "
                "unset GPTUNNEL_MCP_AUTH_TOKEN"
            )
    if settings.transport == "http" and settings.auth_token is not None:
        # Long enough that guessing is hopeless; spaces do not survive every client and proxy whole.
        token, shortest = settings.auth_token.get_secret_value(), 16
        if len(token) < shortest or any(c.isspace() for c in token):
            raise ConfigError(
                f"GPTUNNEL_MCP_AUTH_TOKEN must be at least {shortest} characters without spaces, "
                "or it can be guessed (or never sent whole); make one with: openssl rand -hex 24"
            )
    if settings.multi_user and settings.sandbox and settings.transport == "http" and not settings.is_loopback:
        raise ConfigError(
            f"refusing to serve the sandbox for many users on {settings.host}: it takes any key, so "
            "anyone could use it. Unset GPTUNNEL_SANDBOX or GPTUNNEL_MCP_MULTI_USER, or bind to 127.0.0.1"
        )
    if settings.transport == "http" and not settings.is_loopback and not settings.has_http_auth:
        raise ConfigError(
            f"refusing to serve on {settings.host} without authentication: anyone who can reach it "
            "could spend your GPTunnel balance. Set GPTUNNEL_MCP_AUTH_TOKEN (or GPTUNNEL_MCP_MULTI_USER=1), "
            "or bind to 127.0.0.1"
        )


def mask_password(url: str) -> str:
    """`url` with any password in it (after the user name, or as a parameter) replaced by ***,
    fit to be shown in an error or a log. A password with characters a URL should have escaped
    (`/`, `@`) is masked whole too."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        # libpq's other form, "host=... password=...", is no URL but is still masked.
        return re.sub(r"(?i)(\bpassword\s*=\s*)('[^']*'|\S*)", r"\1***", url)
    before_query, question, query = rest.partition("?")
    user, at, hosts = before_query.rpartition("@")
    if at and ":" in user:
        before_query = f"{user.partition(':')[0]}:***@{hosts}"
    query = re.sub(r"(?i)(\bpassword=)[^&]*", r"\1***", query)
    return f"{scheme}{sep}{before_query}{question}{query}"


def ensure_home(settings: Settings) -> None:
    try:
        # Private whatever the umask: the home holds every prompt and image (and the sandbox's
        # home is a folder inside the real one). Folders above are the user's own business.
        ours = [settings.home.parent] if settings.sandbox else []
        for folder in [*ours, settings.home, settings.images_dir]:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the data folder {settings.home} ({exc.strerror}); "
            "set GPTUNNEL_MCP_HOME to a writable folder"
        ) from None
