#!/usr/bin/env bash
# Makes sure PostgreSQL (127.0.0.1:5432, trust auth for user postgres) and a
# NATS server with JetStream (127.0.0.1:4222) are installed and running.
# Installs the Debian packages if missing, starts what is stopped, and fails
# loudly if either still cannot be reached. Idempotent and fast when all is up.
set -euo pipefail

log() { echo "services: $*"; }
die() { echo "services: ERROR: $*" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_install() {
    command -v apt-get >/dev/null || die "apt-get not found: install $* by hand"
    if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
    apt-get install -y -qq "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port seconds
    for _ in $(seq 1 $(( $2 * 5 ))); do port_open "$1" && return 0; sleep 0.2; done
    return 1
}

as_postgres() {
    if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi
}

# ---- PostgreSQL --------------------------------------------------------------
if ! command -v pg_ctlcluster >/dev/null || ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    log "installing postgresql"
    apt_install postgresql
fi
version=$(ls /etc/postgresql | sort -V | tail -n 1)
if port_open 5432; then
    log "postgresql $version already running"
else
    log "starting postgresql $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null \
        || as_postgres "pg_ctlcluster $version main start" \
        || die "could not start PostgreSQL $version"
    wait_port 5432 20 || die "PostgreSQL does not listen on 127.0.0.1:5432"
fi
if ! psql -h 127.0.0.1 -U postgres -d postgres -w -Atc 'select 1' >/dev/null 2>&1; then
    # A fresh Debian cluster asks for a password on TCP; tests use trust.
    hba="/etc/postgresql/$version/main/pg_hba.conf"
    log "enabling trust auth for 127.0.0.1 in $hba"
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    as_postgres "pg_ctlcluster $version main reload" || pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    sleep 1
    psql -h 127.0.0.1 -U postgres -d postgres -w -Atc 'select 1' >/dev/null \
        || die "PostgreSQL at 127.0.0.1:5432 refuses user postgres"
fi

# ---- NATS with JetStream ------------------------------------------------------
if ! command -v nats-server >/dev/null; then
    log "installing nats-server"
    apt_install nats-server
fi
if port_open 4222; then
    log "nats-server already running"
else
    log "starting nats-server with JetStream"
    mkdir -p /var/lib/nats-server
    start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server)" -- \
        -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
    wait_port 4222 20 || die "nats-server does not listen on 127.0.0.1:4222"
fi

log "DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres"
log "NATS_URL=nats://127.0.0.1:4222"
