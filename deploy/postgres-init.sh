#!/bin/sh
# Runs once, when the PostgreSQL volume is first initialised (docker-entrypoint-initdb.d).
# Creates the schema owner (used by `consent-ledger migrate` and by the service to
# connect) and its database.  The owner is a member of the least-privileged
# consent_ledger_app role so the service's pooled connections can act as it;
# the owner is not a superuser.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
     -v owner_password="$CONSENT_LEDGER_OWNER_PASSWORD" <<'SQL'
CREATE ROLE consent_ledger_app LOGIN;
CREATE ROLE consent_ledger_owner LOGIN PASSWORD :'owner_password';
GRANT consent_ledger_app TO consent_ledger_owner;
CREATE DATABASE consent_ledger OWNER consent_ledger_owner;
SQL
