"""The projections' tables, as the migrations create and change them
(service/store/migrations.py applies these at their version numbers; a
projection's ``tables`` name them, rebuild makes shadow copies of them)."""

# Version 3: tracked positions, the choices projection and the uses projection.
V3 = """
CREATE TABLE projection_positions (
    name     text   PRIMARY KEY,
    position bigint NOT NULL CHECK (position >= 0)
);

-- choices: current choice per patient (9-digit stem) and scope, consents per grant.
CREATE TABLE patient_choices (
    stem       integer     NOT NULL,
    scope      text        NOT NULL,
    opted_out  boolean     NOT NULL,
    position   bigint      NOT NULL,
    changed_at timestamptz NOT NULL,
    PRIMARY KEY (stem, scope)
);
CREATE INDEX patient_choices_opted_out ON patient_choices (scope, stem) WHERE opted_out;
CREATE TABLE patient_consents (
    stem     integer     NOT NULL,
    grant_id text        NOT NULL,
    position bigint      NOT NULL,
    given_at timestamptz NOT NULL,
    PRIMARY KEY (stem, grant_id)
);
CREATE TABLE patient_choice_history (
    stem        integer     NOT NULL,
    position    bigint      NOT NULL,
    event_type  text        NOT NULL,
    scope       text,
    grant_id    text,
    channel     text,
    actor_kind  text        NOT NULL,
    proxy_role  text,
    recorded_at timestamptz NOT NULL,
    reader      text,       -- PersonalDataRead rows: who read the patient's data
    PRIMARY KEY (stem, position)
);

-- uses: grants, data uses, and cohorts cut into blocks for membership tests.
CREATE TABLE grants_view (
    grant_id            text        PRIMARY KEY,
    position            bigint      NOT NULL,
    organisation_code   text        NOT NULL,
    organisation_name   text        NOT NULL,
    purpose             text        NOT NULL,
    purpose_description text        NOT NULL,
    patient_benefit     text        NOT NULL,
    legal_basis         text        NOT NULL,
    datasets            text[]      NOT NULL,
    commercial          boolean     NOT NULL,
    valid_from          timestamptz NOT NULL,
    valid_until         timestamptz NOT NULL,
    exemption_basis     text,
    exemption_reference text,
    revoked_position    bigint,
    revoked_at          timestamptz,
    uses                integer     NOT NULL DEFAULT 0,
    opted_out_included  bigint      NOT NULL DEFAULT 0
);
CREATE TABLE data_uses_view (
    position               bigint      PRIMARY KEY,
    use_id                 text        NOT NULL UNIQUE,
    grant_id               text        NOT NULL,
    cohort_id              bytea       NOT NULL,
    cohort_size            integer     NOT NULL,
    purpose                text        NOT NULL,
    datasets               text[]      NOT NULL,
    access_method          text        NOT NULL,
    occurred_at            timestamptz NOT NULL,
    recorded_at            timestamptz NOT NULL,
    opt_out_state_position bigint      NOT NULL,
    opted_out_included     integer     NOT NULL,
    consented_included     integer     NOT NULL,
    exemption_basis        text,
    exemption_reference    text
);
CREATE INDEX data_uses_view_cohort ON data_uses_view (cohort_id, position);
CREATE INDEX data_uses_view_grant ON data_uses_view (grant_id);
-- A cohort's stems grouped by their high 16 bits: `kind` 'a' holds the low
-- 16 bits as sorted uint16 (sparse blocks), 'b' a 65,536-bit bitmap (dense).
CREATE TABLE cohort_blocks (
    block     integer NOT NULL,
    cohort_id bytea   NOT NULL,
    kind      text    NOT NULL CHECK (kind IN ('a', 'b')),
    members   bytea   NOT NULL,
    PRIMARY KEY (block, cohort_id)
);
-- The union of a grant's cohorts, same encoding as `cohorts.members`.
CREATE TABLE grant_coverage (
    grant_id text    PRIMARY KEY,
    patients integer NOT NULL,
    encoding text    NOT NULL,
    members  bytea   NOT NULL
);
"""

# Version 4 (issue 8): use_id is unique per organisation, not globally.
V4 = """
ALTER TABLE data_uses_view ADD COLUMN organisation_code text;
UPDATE data_uses_view d SET organisation_code = g.organisation_code FROM grants_view g WHERE g.grant_id = d.grant_id;
ALTER TABLE data_uses_view ALTER COLUMN organisation_code SET NOT NULL;
ALTER TABLE data_uses_view DROP CONSTRAINT data_uses_view_use_id_key;
ALTER TABLE data_uses_view ADD CONSTRAINT data_uses_view_use_id_key UNIQUE (organisation_code, use_id);
"""

# Version 6 (issue 14): the approvals a grant needs and those recorded.
V6 = """
ALTER TABLE grants_view ADD COLUMN requires text[] NOT NULL DEFAULT '{}';
CREATE TABLE grant_approvals (
    grant_id          text        NOT NULL,
    approval          text        NOT NULL,
    organisation_code text        NOT NULL,
    organisation_name text        NOT NULL,
    reference         text        NOT NULL,
    position          bigint      NOT NULL,
    recorded_at       timestamptz NOT NULL,
    PRIMARY KEY (grant_id, approval)
);
"""

# Version 7 (issue 14): what grants promised (benefits, commercial terms) and what they delivered.
V7 = """
ALTER TABLE grants_view ADD COLUMN benefits jsonb, ADD COLUMN commercial_terms jsonb;
CREATE TABLE grant_outputs (
    grant_id    text        NOT NULL,
    position    bigint      PRIMARY KEY,
    kind        text        NOT NULL,
    identifier  text        NOT NULL,
    title       text        NOT NULL,
    benefit     integer,
    recorded_at timestamptz NOT NULL
);
CREATE INDEX grant_outputs_grant ON grant_outputs (grant_id, position);
CREATE TABLE grant_value (
    grant_id     text        NOT NULL,
    position     bigint      PRIMARY KEY,
    direction    text        NOT NULL CHECK (direction IN ('received', 'allocated')),
    amount       bigint      NOT NULL,
    currency     text        NOT NULL,
    care_service text,
    recorded_at  timestamptz NOT NULL
);
CREATE INDEX grant_value_grant ON grant_value (grant_id, position);
"""
