"""Configuration, read from the environment in this one place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(RuntimeError):
    """Settings that cannot work together; the message says what to set."""

from contracts import approvals, cosignature, nhs_number, note


@dataclass(frozen=True)
class Config:
    database_url: str | None
    data_dir: Path
    environment: str
    jwks: str | None
    jwt_issuer: str
    jwt_audience: str
    log_format: str
    log_level: str
    writer_queue_size: int
    writer_max_batch: int
    pool_size: int
    jwks_refresh_seconds: float = 300.0
    jwks_min_refresh_seconds: float = 30.0
    request_timeout_seconds: float = 60.0
    service_database_url: str | None = None
    log_origin: str = "consent-ledger.example/log"
    log_key_file: Path | None = None
    log_extra_key_files: tuple[Path, ...] = ()
    checkpoint_interval: float = 1.0
    projection_poll_interval: float = 1.0
    filter_wait: float = 5.0
    token_max_lifetime_seconds: float = 86_400.0
    nhs_number_ranges: tuple[str, ...] = ()
    task_stall_seconds: float = 30.0
    progress_seconds: float = 10.0
    statistics_seconds: float = 60.0
    # Streaming replicas that serve reads; how long a read naming a position waits for one to replay
    # that far before it reads from the primary; how far (entries) a replica may trail and stay in rotation.
    # The key patients' transparency secrets are derived from (service/app/transparency.py).
    transparency_key_file: Path | None = None
    # How often a standby process tries for the writer lease (and its holder checks it still holds it).
    lease_seconds: float = 1.0
    read_database_urls: tuple[str, ...] = ()
    read_wait: float = 2.0
    replica_max_lag: int = 10_000
    # Webhooks: networks an endpoint may resolve to although private (tests: loopback), how long
    # a notification is retried before the subscription is marked failing, the first retry's delay.
    webhook_allow: tuple[str, ...] = ()
    webhook_retry_window: float = 3 * 86_400.0
    webhook_retry_base: float = 5.0
    webhook_timeout: float = 10.0
    # Which approvals a new grant needs before it is in force (contracts/approvals.py).
    approvals: tuple[tuple[str, str], ...] = ()
    # Witnesses the log submits its checkpoints to: (add-checkpoint URL, cosigner vkey).
    witnesses: tuple[tuple[str, str], ...] = ()
    witness_quorum: int = 0
    witness_interval: float = 10.0

    @property
    def production(self) -> bool:
        return self.environment == "production"


def load(env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ if env is None else env)
    environment = env.get("CONSENT_LEDGER_ENV", "development")
    return Config(
        database_url=env.get("DATABASE_URL") or None,
        data_dir=Path(env.get("CONSENT_LEDGER_DATA_DIR", ".consent-ledger")).resolve(),
        environment=environment,
        jwks=env.get("CONSENT_LEDGER_JWKS") or None,
        jwt_issuer=env.get("CONSENT_LEDGER_JWT_ISSUER", "consent-ledger-dev"),
        jwt_audience=env.get("CONSENT_LEDGER_JWT_AUDIENCE", "consent-ledger"),
        log_format=env.get("CONSENT_LEDGER_LOG_FORMAT", "json"),
        log_level=env.get("CONSENT_LEDGER_LOG_LEVEL", "info"),
        writer_queue_size=_number(env, "CONSENT_LEDGER_WRITER_QUEUE", "10000", int),
        writer_max_batch=_number(env, "CONSENT_LEDGER_WRITER_BATCH", "500", int),
        pool_size=_number(env, "CONSENT_LEDGER_POOL_SIZE", "10", int),
        jwks_refresh_seconds=_number(env, "CONSENT_LEDGER_JWKS_REFRESH_SECONDS", "300", float),
        jwks_min_refresh_seconds=_number(env, "CONSENT_LEDGER_JWKS_MIN_REFRESH_SECONDS", "30", float),
        service_database_url=env.get("CONSENT_LEDGER_SERVICE_DATABASE_URL") or None,
        request_timeout_seconds=_number(env, "CONSENT_LEDGER_REQUEST_TIMEOUT_SECONDS", "60", float),
        # The checkpoint origin and the log key's name: a schema-less URL of the log.
        log_origin=env.get("CONSENT_LEDGER_LOG_ORIGIN", "consent-ledger.example/log"),
        log_key_file=Path(env["CONSENT_LEDGER_LOG_KEY"]) if env.get("CONSENT_LEDGER_LOG_KEY") else None,
        # During a key rotation the old and new keys both sign every checkpoint.
        log_extra_key_files=tuple(
            Path(p) for p in env.get("CONSENT_LEDGER_LOG_EXTRA_KEYS", "").split(",") if p.strip()
        ),
        checkpoint_interval=_number(env, "CONSENT_LEDGER_CHECKPOINT_INTERVAL", "1.0", float),
        # Projections also poll, so a lost NOTIFY only delays them by this much.
        projection_poll_interval=_number(env, "CONSENT_LEDGER_PROJECTION_POLL", "1.0", float),
        # How long an opt-out filter call waits for `min_position` before 503.
        filter_wait=_number(env, "CONSENT_LEDGER_FILTER_WAIT", "5.0", float),
        # Tokens that would live longer than this are refused (a stolen one must expire).
        token_max_lifetime_seconds=_number(env, "CONSENT_LEDGER_TOKEN_MAX_LIFETIME_SECONDS", "86400", float),
        # Which allocated NHS number ranges are accepted; production leaves out the synthetic (test) range.
        nhs_number_ranges=tuple(r.strip() for r in env.get(
            "CONSENT_LEDGER_NHS_NUMBER_RANGES",
            ",".join(nhs_number.PRODUCTION_RANGES if environment == "production" else nhs_number.RANGES),
        ).split(",") if r.strip()),
        # A background task without progress for this long (beyond its own
        # period) makes /readyz answer 503, naming the task.
        task_stall_seconds=_number(env, "CONSENT_LEDGER_TASK_STALL_SECONDS", "30", float),
        # Long commands print a progress line this often when stderr is not a terminal.
        progress_seconds=_number(env, "CONSENT_LEDGER_PROGRESS_SECONDS", "10", float),
        # Public statistics scan whole projection tables: computed at most this often.
        statistics_seconds=_number(env, "CONSENT_LEDGER_STATISTICS_SECONDS", "60", float),
        approvals=_approvals(env, environment),
        read_database_urls=tuple(u.strip() for u in env.get("CONSENT_LEDGER_READ_DATABASE_URL", "").split(",")
                                 if u.strip()),
        read_wait=_number(env, "CONSENT_LEDGER_READ_WAIT", "2", float),
        lease_seconds=_number(env, "CONSENT_LEDGER_LEASE_SECONDS", "1", float),
        transparency_key_file=Path(env["CONSENT_LEDGER_TRANSPARENCY_KEY"])
        if env.get("CONSENT_LEDGER_TRANSPARENCY_KEY") else None,
        replica_max_lag=_number(env, "CONSENT_LEDGER_REPLICA_MAX_LAG", "10000", int),
        # Endpoints on private, loopback or link-local addresses are refused unless a network here allows them.
        webhook_allow=_networks(env.get("CONSENT_LEDGER_WEBHOOK_ALLOW", "")),
        webhook_retry_window=_number(env, "CONSENT_LEDGER_WEBHOOK_RETRY_WINDOW", "259200", float),
        webhook_retry_base=_number(env, "CONSENT_LEDGER_WEBHOOK_RETRY_BASE", "5", float),
        webhook_timeout=_number(env, "CONSENT_LEDGER_WEBHOOK_TIMEOUT", "10", float),
        **_witnessing(env),
    )


def _networks(text: str) -> tuple[str, ...]:
    import ipaddress

    out = []
    for item in text.split(","):
        if item.strip():
            try:
                out.append(str(ipaddress.ip_network(item.strip(), strict=False)))
            except ValueError:
                raise ConfigError(f"CONSENT_LEDGER_WEBHOOK_ALLOW: {item.strip()!r} is not a network "
                                  "(e.g. 127.0.0.0/8 or 10.1.2.0/24)") from None
    return tuple(out)


def _approvals(env: dict[str, str], environment: str) -> tuple[tuple[str, str], ...]:
    """CONSENT_LEDGER_APPROVALS: "approval:condition,..."; in production the NHS default
    (contracts/approvals.py), elsewhere none, so a development grant is in force at once."""
    if "CONSENT_LEDGER_APPROVALS" not in env:
        return approvals.PRODUCTION_POLICY if environment == "production" else ()
    try:
        return approvals.parse(env["CONSENT_LEDGER_APPROVALS"])
    except ValueError as exc:
        raise ConfigError(f"CONSENT_LEDGER_APPROVALS: {exc}") from None


def _witnessing(env: dict[str, str]) -> dict[str, Any]:
    """CONSENT_LEDGER_WITNESSES: comma-separated "<add-checkpoint URL> <witness vkey>" pairs;
    CONSENT_LEDGER_WITNESS_QUORUM: how many of them make a checkpoint witnessed (default: a majority)."""
    witnesses = []
    for item in env.get("CONSENT_LEDGER_WITNESSES", "").split(","):
        if not item.strip():
            continue
        parts = item.split()
        if len(parts) != 2 or not parts[0].startswith(("http://", "https://")):
            raise ConfigError(f"CONSENT_LEDGER_WITNESSES: {item.strip()!r} is not '<add-checkpoint URL> <vkey>' "
                              "(e.g. 'https://witness.example/add-checkpoint witness.example/w+1a2b3c4d+BASE64')")
        try:
            cosignature.parse_vkey(parts[1])
        except note.NoteError as exc:
            raise ConfigError(f"CONSENT_LEDGER_WITNESSES: {parts[1]!r} is not a witness vkey: {exc}") from None
        witnesses.append((parts[0], parts[1]))
    quorum = _number(env, "CONSENT_LEDGER_WITNESS_QUORUM", str(len(witnesses) // 2 + 1 if witnesses else 0), int)
    if witnesses and not 1 <= quorum <= len(witnesses):
        raise ConfigError(f"CONSENT_LEDGER_WITNESS_QUORUM={quorum} must be between 1 and the "
                          f"{len(witnesses)} witness(es) in CONSENT_LEDGER_WITNESSES")
    return {"witnesses": tuple(witnesses), "witness_quorum": quorum,
            # Witnesses are asked at most this often (each checkpoint in between is covered by the next).
            "witness_interval": _number(env, "CONSENT_LEDGER_WITNESS_INTERVAL", "10", float)}


def _number(env: dict[str, str], name: str, default: str, kind: type[int] | type[float]) -> Any:
    value = env.get(name, default)
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a {'whole ' if kind is int else ''}number") from None
