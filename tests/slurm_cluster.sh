#!/bin/bash
# A real one-node SLURM cluster for the tests, run as root (Debian's slurm-wlm and munge):
#
#   tests/slurm_cluster.sh start DIR    write DIR/slurm.conf, start munged (unless running),
#                                       slurmctld and slurmd; print the SLURM_CONF to export
#   tests/slurm_cluster.sh stop DIR     cancel this cluster's jobs and wait for their steps, stop
#                                       the daemons that `start DIR` started, then check that no
#                                       process of this cluster survives (exit 1 if one did)
set -euo pipefail
cmd=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
host=$(hostname -s)

# Processes of this cluster: the daemons and everything they started (slurmstepd, job steps)
# carry its SLURM_CONF in their environment.
cluster_pids() {
    grep -lzx "SLURM_CONF=$dir/slurm.conf" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | grep -vx -e $$ -e "$PPID" || true
}

steps_running() {
    for pid in $(cluster_pids); do
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmstepd ] && return 0
    done
    return 1
}

stop() {
    # Not exported: the checks below must not find their own commands' environments.
    local conf=$dir/slurm.conf
    if [ -f "$dir/slurmctld.started" ]; then  # cancel every job, then wait for its steps to end
        SLURM_CONF=$conf squeue -h -o %i 2>/dev/null | SLURM_CONF=$conf xargs -r scancel --full 2>/dev/null || true
        for _ in $(seq 90); do
            [ -z "$(SLURM_CONF=$conf squeue -h -o %i 2>/dev/null)" ] && ! steps_running && break
            sleep 1
        done
    fi
    for name in slurmd slurmctld munged; do
        if [ -f "$dir/$name.started" ]; then
            pid=$(cat "$dir/$name.pid" 2>/dev/null || true)
            if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
                for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            fi
            rm -f "$dir/$name.started"
        fi
    done
    left=$(cluster_pids)
    if [ -n "$left" ]; then
        echo "processes of the cluster in $dir survived its stop; killed:" >&2
        ps -o pid,args -p "$(echo $left | tr ' ' ,)" >&2 || true
        kill -9 $left 2>/dev/null || true
        return 1
    fi
}

if [ "$cmd" = stop ]; then stop; exit $?; fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }

mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
# Ports of our own: another cluster (a developer's, or one a killed test run left behind) may
# hold SLURM's usual ones, and sbatch would then talk to it instead of to ours.
read -r ctld_port slurmd_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("", 0))
print(*(s.getsockname()[1] for s in socks))')
cat >"$dir/slurm.conf" <<CONF
ClusterName=gpt2dist-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
KillWait=30
NodeName=$host CPUs=$(nproc) State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
export SLURM_CONF=$dir/slurm.conf

if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; chown munge:munge /etc/munge/munge.key; }
    # munged runs as munge, which cannot write into $dir: its pid file lives in /run/munge.
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/gpt2dist-test.pid
    ln -sf /run/munge/gpt2dist-test.pid "$dir/munged.pid"
    touch "$dir/munged.started"
fi
/usr/sbin/slurmctld && touch "$dir/slurmctld.started"
/usr/sbin/slurmd && touch "$dir/slurmd.started"
for _ in $(seq 60); do
    alive=1
    for name in slurmctld slurmd; do
        pid=$(cat "$dir/$name.pid" 2>/dev/null || true)
        { [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; } || alive=0
    done
    if [ "$alive" = 1 ] && sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 1
done
echo "slurm did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
stop
exit 1
