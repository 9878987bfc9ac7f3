"""Configuration, read from the environment in this one place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


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
    projection_poll_interval: float = 1.0
    filter_wait: float = 5.0

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
        writer_queue_size=int(env.get("CONSENT_LEDGER_WRITER_QUEUE", "10000")),
        writer_max_batch=int(env.get("CONSENT_LEDGER_WRITER_BATCH", "500")),
        pool_size=int(env.get("CONSENT_LEDGER_POOL_SIZE", "10")),
        # Projections also poll, so a lost NOTIFY only delays them by this much.
        projection_poll_interval=float(env.get("CONSENT_LEDGER_PROJECTION_POLL", "1.0")),
        # How long an opt-out filter call waits for `min_position` before 503.
        filter_wait=float(env.get("CONSENT_LEDGER_FILTER_WAIT", "5.0")),
    )
