#!/bin/sh
# The streaming replica's entrypoint.  On first start (an empty volume) it
# clones the primary with pg_basebackup -R through the slot that
# postgres-replication.sh made, so PostgreSQL starts as a hot standby that
# streams from the primary; then it hands over to the image's entrypoint.
# The password comes from PGPASSWORD; -R keeps it in postgresql.auto.conf.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 0700 "$PGDATA"
    gosu postgres pg_basebackup --pgdata="$PGDATA" --host=postgres --port=5432 \
        --username=consent_ledger_replicator --slot=consent_ledger_replica \
        --write-recovery-conf --wal-method=stream --checkpoint=fast
fi
exec docker-entrypoint.sh "$@"
