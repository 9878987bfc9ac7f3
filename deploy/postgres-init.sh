#!/bin/sh
# Runs once, when the PostgreSQL volume is first initialised (docker-entrypoint-initdb.d):
# the provisioning step of deploy/POSTGRES-ROLES.md.  Three roles, none a superuser:
#   consent_ledger_owner    owns the schema; `consent-ledger migrate` logs in as it
#   consent_ledger_app      group role holding the service's INSERT/SELECT grants
#   consent_ledger_service  the service's login: NOINHERIT member of consent_ledger_app only
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
     -v owner_password="$CONSENT_LEDGER_OWNER_PASSWORD" \
     -v service_password="$CONSENT_LEDGER_SERVICE_PASSWORD" <<'SQL'
CREATE ROLE consent_ledger_owner LOGIN PASSWORD :'owner_password';
CREATE DATABASE consent_ledger OWNER consent_ledger_owner;
CREATE ROLE consent_ledger_app NOLOGIN;
CREATE ROLE consent_ledger_service LOGIN NOINHERIT PASSWORD :'service_password'
    IN ROLE consent_ledger_app;
\c consent_ledger
REVOKE ALL ON DATABASE consent_ledger FROM PUBLIC;
GRANT CONNECT ON DATABASE consent_ledger TO consent_ledger_owner, consent_ledger_service;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
SQL
