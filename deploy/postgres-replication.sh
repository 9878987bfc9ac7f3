#!/bin/sh
# Runs once, when the primary's volume is first initialised, after
# 10-consent-ledger.sh: the login the streaming replica connects with
# (REPLICATION only: it receives WAL, it cannot connect to a database) and the
# physical slot that keeps the WAL the replica has not received yet.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
     -v replication_password="$CONSENT_LEDGER_REPLICATION_PASSWORD" <<'SQL'
CREATE ROLE consent_ledger_replicator LOGIN REPLICATION PASSWORD :'replication_password';
SELECT pg_create_physical_replication_slot('consent_ledger_replica');
SQL
echo "host replication consent_ledger_replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
