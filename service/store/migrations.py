"""Database schema, applied by `consent-ledger migrate` (and on start).

The ledger tables are append-only in the database itself: a trigger refuses
UPDATE, DELETE and TRUNCATE for everyone (even the owner), and the service
role only holds INSERT and SELECT on them.  ``ledger_head`` is the one row
the writer updates; its trigger only lets it move forward onto a real entry.
"""

from __future__ import annotations

import asyncpg

from projections import schema as projection_tables

APP_ROLE = "consent_ledger_app"
_LOCK_KEY = 0x434C4447  # "CLDG": serialises concurrent migrations

LEDGER_TABLES = ("ledger_events", "ledger_idempotency", "cohorts")
# Added by later migrations, append-only like the ledger tables.
COHORT_HOLDERS = "cohort_holders"

_V1 = f"""
CREATE TABLE ledger_events (
    position          bigint      PRIMARY KEY CHECK (position > 0),
    event_id          uuid        NOT NULL UNIQUE,
    event_type        text        NOT NULL,
    aggregate_id      uuid        NOT NULL,
    aggregate_version integer     NOT NULL CHECK (aggregate_version > 0),
    recorded_at       timestamptz NOT NULL,
    entry             bytea       NOT NULL,
    leaf_hash         bytea       NOT NULL CHECK (length(leaf_hash) = 32),
    chain_hash        bytea       NOT NULL CHECK (length(chain_hash) = 32),
    UNIQUE (aggregate_id, aggregate_version)
);
CREATE INDEX ledger_events_type_position ON ledger_events (event_type, position);

CREATE TABLE ledger_head (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    position   bigint  NOT NULL CHECK (position >= 0),
    chain_hash bytea   NOT NULL CHECK (length(chain_hash) = 32)
);
INSERT INTO ledger_head VALUES (true, 0, '\\x{'00' * 32}');

CREATE TABLE ledger_idempotency (
    scope        text     NOT NULL,
    key          text     NOT NULL,
    request_hash bytea    NOT NULL,
    positions    bigint[] NOT NULL,
    PRIMARY KEY (scope, key)
);

-- Cohorts are content-addressed: cohort_id = SHA-256 of the canonical list.
CREATE TABLE cohorts (
    cohort_id bytea   PRIMARY KEY CHECK (length(cohort_id) = 32),
    size      integer NOT NULL CHECK (size >= 0),
    encoding  text    NOT NULL,
    members   bytea   NOT NULL
);

CREATE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'consent-ledger: % on % refused: the ledger is append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE FUNCTION ledger_head_advance() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.position < OLD.position THEN
        RAISE EXCEPTION 'consent-ledger: head may not move back (% -> %)', OLD.position, NEW.position
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.position > 0 AND NOT EXISTS (
        SELECT 1 FROM ledger_events WHERE position = NEW.position AND chain_hash = NEW.chain_hash
    ) THEN
        RAISE EXCEPTION 'consent-ledger: head (%) does not match a ledger entry', NEW.position
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER ledger_head_forward BEFORE UPDATE ON ledger_head
    FOR EACH ROW EXECUTE FUNCTION ledger_head_advance();
CREATE TRIGGER ledger_head_keep BEFORE DELETE ON ledger_head
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_head_no_truncate BEFORE TRUNCATE ON ledger_head
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
"""

_APPEND_ONLY = "".join(
    f"""
CREATE TRIGGER {t}_append_only BEFORE UPDATE OR DELETE ON {t}
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER {t}_no_truncate BEFORE TRUNCATE ON {t}
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
"""
    for t in LEDGER_TABLES
)

# Merkle tiles (full ones only) and signed checkpoints: both append-only.
_V2 = """
CREATE TABLE merkle_tiles (
    level  smallint NOT NULL CHECK (level >= 0 AND level < 64),
    n      bigint   NOT NULL CHECK (n >= 0),
    hashes bytea    NOT NULL CHECK (length(hashes) = 8192),
    root   bytea    NOT NULL CHECK (length(root) = 32),
    PRIMARY KEY (level, n)
);

CREATE TABLE checkpoints (
    tree_size bigint      PRIMARY KEY CHECK (tree_size >= 0),
    root      bytea       NOT NULL CHECK (length(root) = 32),
    note      text        NOT NULL,
    signed_at timestamptz NOT NULL DEFAULT now()
);
""" + "".join(
    f"""
CREATE TRIGGER {t}_append_only BEFORE UPDATE OR DELETE ON {t}
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER {t}_no_truncate BEFORE TRUNCATE ON {t}
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
"""
    for t in ("merkle_tiles", "checkpoints")
)


# Projections (read models).  Unlike the ledger tables these are rewritten
# freely: each is rebuildable from position 0, and `projection_positions`
# records, in the same transaction as the view rows, how far each got.
PROJECTION_TABLES = (
    "projection_positions",
    "patient_choices",
    "patient_consents",
    "patient_choice_history",
    "grants_view",
    "data_uses_view",
    "cohort_blocks",
    "grant_coverage",
    "grant_approvals",
    "grant_outputs",
    "grant_value",
)



# Issue 8.  Who may refer to a stored cohort: the organisations that stored it
# (CohortStored) or recorded a use of it (DataUseRecorded), written in the
# same transaction as that entry.  Existing holders come from the ledger's
# data uses; a cohort stored but never used must be stored again (which now
# records who stored it).  use_id is unique per organisation, not globally.
_V4 = """
CREATE TABLE cohort_holders (
    cohort_id         bytea NOT NULL CHECK (length(cohort_id) = 32),
    organisation_code text  NOT NULL,
    PRIMARY KEY (cohort_id, organisation_code)
);
CREATE TRIGGER cohort_holders_append_only BEFORE UPDATE OR DELETE ON cohort_holders
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER cohort_holders_no_truncate BEFORE TRUNCATE ON cohort_holders
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
INSERT INTO cohort_holders
    SELECT DISTINCT decode(p->>'cohort_id', 'hex'), p->>'organisation_code'
    FROM (SELECT convert_from(entry, 'UTF8')::jsonb->'payload' AS p FROM ledger_events
          WHERE event_type = 'DataUseRecorded') uses;

"""


# Issue 12.  Witness cosignatures collected for the log's checkpoints
# (C2SP tlog-cosignature lines, appended to the note when served).  One per
# witness key and checkpoint; like the checkpoints, never changed or removed.
_V5 = """
CREATE TABLE checkpoint_cosignatures (
    tree_size   bigint      NOT NULL REFERENCES checkpoints (tree_size),
    witness     text        NOT NULL,
    line        text        NOT NULL,
    cosigned_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tree_size, witness)
);
CREATE INDEX checkpoint_cosignatures_witness ON checkpoint_cosignatures (witness, tree_size);
CREATE TRIGGER checkpoint_cosignatures_append_only BEFORE UPDATE OR DELETE ON checkpoint_cosignatures
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER checkpoint_cosignatures_no_truncate BEFORE TRUNCATE ON checkpoint_cosignatures
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
"""


# Issue 13.  Notification subscriptions and their outbox: service state, not
# ledger (the ledger records registrations and changes, never the patients).
# `cursor` is the ledger position a subscription's notifications are made up to,
# advanced in the same transaction as the notifications it made.
_V8 = """
CREATE TABLE subscriptions (
    id                text        PRIMARY KEY,
    owner             text        NOT NULL,
    url               text        NOT NULL,
    events            text[]      NOT NULL,
    description       text        NOT NULL,
    secret            text        NOT NULL,
    status            text        NOT NULL CHECK (status IN ('active', 'paused', 'failing', 'deleted')),
    cursor            bigint      NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    patients_count    integer     NOT NULL DEFAULT 0,
    patients_encoding text,
    patients          bytea,
    patients_version  integer     NOT NULL DEFAULT 0
);
CREATE INDEX subscriptions_owner ON subscriptions (owner);
CREATE TABLE notifications (
    seq              bigserial   PRIMARY KEY,
    subscription_id  text        NOT NULL REFERENCES subscriptions (id),
    webhook_id       text        NOT NULL UNIQUE,
    type             text        NOT NULL,
    position         bigint      NOT NULL,
    body             bytea       NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    attempts         integer     NOT NULL DEFAULT 0,
    first_attempt_at timestamptz,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    last_status      integer,
    last_error       text
);
CREATE INDEX notifications_pending ON notifications (subscription_id, seq) WHERE delivered_at IS NULL;
CREATE INDEX notifications_feed ON notifications (subscription_id, seq);
"""


# Issue 12.  The patients a filter call removed, stored compactly like a
# cohort and named by the call's id, so a patient's receipt for that call can
# be proved long after it (the entry holds only the commitment to them).
_V9 = """
CREATE TABLE removed_sets (
    call_id  text  PRIMARY KEY,
    encoding text  NOT NULL,
    members  bytea NOT NULL
);
CREATE TRIGGER removed_sets_append_only BEFORE UPDATE OR DELETE ON removed_sets
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
"""


# Roles are cluster-wide, grants per database: this step is safe to re-run.
_PRIVILEGES = f"""
-- Checked first so that an owner without CREATEROLE can migrate once an
-- administrator has created the role (deploy/POSTGRES-ROLES.md).
DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
        CREATE ROLE {APP_ROLE} NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
END $$;
-- Earlier versions created it with LOGIN; nobody logs in as it (its members
-- do), so take that away where this owner may.
DO $$ BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}' AND rolcanlogin) THEN
        ALTER ROLE {APP_ROLE} NOLOGIN;
    END IF;
EXCEPTION WHEN insufficient_privilege THEN NULL;
END $$;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO {APP_ROLE};
REVOKE ALL ON ledger_events, ledger_idempotency, cohorts, ledger_head, schema_migrations FROM PUBLIC;
GRANT SELECT, INSERT ON ledger_events, ledger_idempotency, cohorts TO {APP_ROLE};
REVOKE ALL ON {COHORT_HOLDERS} FROM PUBLIC;
GRANT SELECT, INSERT ON {COHORT_HOLDERS} TO {APP_ROLE};
GRANT SELECT, UPDATE ON ledger_head TO {APP_ROLE};
GRANT SELECT ON schema_migrations TO {APP_ROLE};
REVOKE ALL ON merkle_tiles, checkpoints, checkpoint_cosignatures FROM PUBLIC;
GRANT SELECT, INSERT ON merkle_tiles, checkpoints, checkpoint_cosignatures TO {APP_ROLE};
REVOKE ALL ON removed_sets FROM PUBLIC;
GRANT SELECT, INSERT ON removed_sets TO {APP_ROLE};
REVOKE ALL ON subscriptions, notifications FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE ON subscriptions, notifications TO {APP_ROLE};
GRANT USAGE ON SEQUENCE notifications_seq_seq TO {APP_ROLE};
-- Projection tables are the service's to rewrite (they are rebuildable views).
REVOKE ALL ON {", ".join(PROJECTION_TABLES)} FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON {", ".join(PROJECTION_TABLES)} TO {APP_ROLE};
"""

# Versions 3 and 4 create and change the projections' tables, which the
# projections define (projections/schema.py).
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, _V1 + _APPEND_ONLY), (2, _V2), (3, projection_tables.V3), (4, _V4 + projection_tables.V4), (5, _V5),
    (6, projection_tables.V6), (7, projection_tables.V7), (8, _V8), (9, _V9),
)


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply pending migrations as the schema owner; return the versions applied."""
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in MIGRATIONS:
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied.append(version)
        await conn.execute(_PRIVILEGES)
    return applied
