#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests/test_slurm.py.
#
#   tests/slurm/setup_slurm.sh start   # install (Debian: slurm-wlm, munge), configure, start
#   tests/slurm/setup_slurm.sh stop    # stop the daemons this script started, by PID
#
# Needs root (apt-get, daemons). `start` installs Debian's slurm-wlm and munge when they are
# missing, writes a minimal slurm.conf for this one node (ProctrackType=proctrack/linuxproc,
# TaskPlugin=task/none: no cgroups or systemd needed), starts munged, slurmctld and slurmd, and
# waits until the node accepts jobs. The daemons' PIDs go to $STATE/pids; `stop` kills exactly
# those PIDs. Nothing else on the machine is touched apart from /etc/slurm/slurm.conf (a copy
# of any existing one is kept as slurm.conf.keras_fda-backup and restored by `stop`).
set -euo pipefail

STATE=${KERAS_FDA_SLURM_STATE:-/var/tmp/keras_fda_slurm}
CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)

log() { echo "setup_slurm.sh: $*" >&2; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v srun >/dev/null && command -v munged >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm munge >/dev/null
}

write_config() {
    mkdir -p /etc/slurm "$STATE/spool/ctld" "$STATE/spool/d" "$STATE/log"
    if [ -f "$CONF" ] && ! grep -q "^# keras_fda test cluster" "$CONF"; then
        cp "$CONF" "$CONF.keras_fda-backup"
    fi
    local cpus
    cpus=$(nproc)
    # MpiParams=ports gives steps started with `srun --resv-ports` a SLURM_STEP_RESV_PORTS.
    cat >"$CONF" <<EOF
# keras_fda test cluster: one node, written by tests/slurm/setup_slurm.sh
ClusterName=keras-fda-test
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MpiParams=ports=30000-30999
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$NODE CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
EOF
}

start_munge() {
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    chown munge:munge /var/lib/munge /var/log/munge /run/munge
    chmod 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$STATE/munged.pid"
}

wait_until() {  # wait_until SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2
    shift 2
    local end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$end" ]; then
            log "$what did not happen within $limit s"
            tail -n 20 "$STATE"/log/*.log >&2 || true
            exit 1
        fi
        sleep 0.2
    done
}

node_is_idle() { [ "$(sinfo -h -n "$NODE" -o %t)" = idle ]; }

all_alive() {
    local pid
    for pid in $(cat "$STATE/pids"); do kill -0 "$pid" 2>/dev/null || return 1; done
}

start() {
    if [ -f "$STATE/pids" ]; then
        if all_alive && scontrol ping >/dev/null 2>&1; then
            log "already running (PIDs $(tr '\n' ' ' <"$STATE/pids"))"
            return
        fi
        log "stopping what is left of an earlier start"
        stop
    fi
    install_packages
    write_config
    start_munge
    slurmctld
    wait_until 30 "slurmctld answering" scontrol ping
    slurmd
    wait_until 30 "slurmd writing its PID file" test -s "$STATE/slurmd.pid"
    cat "$STATE/munged.pid" "$STATE/slurmctld.pid" "$STATE/slurmd.pid" >"$STATE/pids"
    # A node that was down in an earlier run stays down until resumed.
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    wait_until 60 "node $NODE idle" node_is_idle
    log "SLURM is running: node $NODE, PIDs $(tr '\n' ' ' <"$STATE/pids")"
}

stop() {
    [ -f "$STATE/pids" ] || { log "nothing to stop"; return; }
    local pid
    # Reverse order: slurmd, slurmctld, then munged (the others need it to shut down).
    for pid in $(tac "$STATE/pids"); do
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -f "$STATE/pids"
    if [ -f "$CONF.keras_fda-backup" ]; then mv "$CONF.keras_fda-backup" "$CONF"; fi
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
