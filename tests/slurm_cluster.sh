#!/bin/bash
# A real SLURM cluster for the tests, run as root (Debian's slurm-wlm and munge):
#
#   tests/slurm_cluster.sh start DIR [N]  write DIR/slurm.conf, start munged (unless running),
#                                         slurmctld and slurmd; print the SLURM_CONF to export.
#                                         N=1 (default): one node, this host. N>1: N nodes
#                                         node1..nodeN, each a network namespace of its own
#                                         (address 10.X.Y.2.., hostname nodeI, one slurmd) on a
#                                         bridge where slurmctld listens (10.X.Y.1)
#   tests/slurm_cluster.sh stop DIR       cancel this cluster's jobs and wait for their steps, stop
#                                         the daemons that `start DIR` started, kill what is left
#                                         in its namespaces and remove them, then check that no
#                                         process of this cluster survives (exit 1 if one did)
#   tests/slurm_cluster.sh kill-node DIR I [unplug]   SIGKILL every process on node I (its slurmd
#                                              too): a node that dies; print how many were killed.
#                                              unplug: cut its link first, so that its peers see
#                                              no closed connection, only silence (a power loss)
#   tests/slurm_cluster.sh start-node DIR I    start node I's slurmd again (a rebooted node)
set -euo pipefail
cmd=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
host=$(hostname -s)
# Names and subnet of this cluster's network, from its directory: clusters of other test runs
# on this machine get others.
id=$(printf %s "$dir" | md5sum | cut -c1-6)
bridge=g2d$id
prefix=10.$((0x${id:0:2} % 200 + 20)).$((0x${id:2:2}))
netns() { echo "g2d-$id-node$1"; }

# The command line that runs a command on node $1, as on a machine of its own: in its network
# namespace, with its own hostname, and with DIR/hosts (every node's address) as /etc/hosts, in a
# mount namespace of its own (so the host's /etc/hosts stays as it is).
on_node() {
    node_cmd=(nsenter "--net=/run/netns/$(netns "$1")" unshare --uts --mount
              sh -c 'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"' "node$1" "$dir/hosts")
}

start_slurmd() {
    on_node "$1"
    "${node_cmd[@]}" /usr/sbin/slurmd -N "node$1"
    touch "$dir/slurmd-node$1.started"
}

# A bridge in this namespace (the controller's side) and one namespace per node, joined to
# it by a veth pair; each node resolves every node's name to its address.
net_up() {
    ip link add "$bridge" type bridge
    ip addr add "$prefix.1/24" dev "$bridge"
    ip link set "$bridge" up
    for i in $(seq "$1"); do
        local ns
        ns=$(netns "$i")
        ip netns add "$ns"
        echo "$ns" >>"$dir/netns"
        ip link add "$bridge-$i" type veth peer name eth0 netns "$ns"
        ip link set "$bridge-$i" master "$bridge" up
        ip -n "$ns" addr add "$prefix.$((i + 1))/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
    done
    { echo "127.0.0.1 localhost"; echo "$prefix.1 $host"
      for i in $(seq "$1"); do echo "$prefix.$((i + 1)) node$i"; done; } >"$dir/hosts"
}

net_down() {
    [ -f "$dir/netns" ] || return 0
    for ns in $(cat "$dir/netns"); do
        for _ in $(seq 50); do  # what is left on the node, until it is gone
            pids=$(ip netns pids "$ns" 2>/dev/null || true)
            [ -n "$pids" ] || break
            kill -9 $pids 2>/dev/null || true
            sleep 0.2
        done
        ip netns del "$ns" 2>/dev/null || true  # its end of the veth pair goes with it
    done
    ip link del "$bridge" 2>/dev/null || true
    rm -f "$dir/netns"
}

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
    for started in "$dir"/slurmd*.started "$dir"/slurmctld.started "$dir"/munged.started; do
        [ -f "$started" ] || continue
        pid=$(cat "${started%.started}.pid" 2>/dev/null || true)
        if [ -n "$pid" ] && kill "$pid" 2>/dev/null; then
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        fi
        rm -f "$started"
    done
    net_down
    left=$(cluster_pids)
    if [ -n "$left" ]; then
        echo "processes of the cluster in $dir survived its stop; killed:" >&2
        ps -o pid,args -p "$(echo $left | tr ' ' ,)" >&2 || true
        kill -9 $left 2>/dev/null || true
        return 1
    fi
}

case $cmd in
    stop) stop; exit $? ;;
    kill-node)
        [ "${4:-}" != unplug ] || ip link set "$bridge-$3" down
        pids=$(ip netns pids "$(netns "$3")")
        kill -9 $pids
        echo "$pids" | wc -w
        exit 0 ;;
    start-node) export SLURM_CONF=$dir/slurm.conf; ip link set "$bridge-$3" up; start_slurmd "$3"; exit 0 ;;
    start) ;;
    *) echo "usage: $0 start DIR [N] | stop DIR | kill-node DIR I [unplug] | start-node DIR I" >&2; exit 2 ;;
esac
nodes=${3:-1}

mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
# Ports of our own: another cluster (a developer's, or one a killed test run left behind) may
# hold SLURM's usual ones, and sbatch would then talk to it instead of to ours.
read -r ctld_port slurmd_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("", 0))
print(*(s.getsockname()[1] for s in socks))')
if [ "$nodes" = 1 ]; then
    node_names=$host
    cluster_conf="SlurmctldHost=$host
SlurmdSpoolDir=$dir/spool
SlurmdPidFile=$dir/slurmd.pid
SlurmdLogFile=$dir/slurmd.log
KillWait=30
NodeName=$host CPUs=$(nproc) State=UNKNOWN"
else
    # Each slurmd has its own spool, pid and log file (%n: its node name), address and port.
    node_names=node[1-$nodes]
    cluster_conf="SlurmctldHost=$host($prefix.1)
SlurmdSpoolDir=$dir/spool/%n
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmdLogFile=$dir/slurmd-%n.log
# After a rank fails, srun waits KillWait + 2 s for the tasks of a node that is gone.
KillWait=10"
    for i in $(seq "$nodes"); do
        mkdir -p "$dir/spool/node$i"
        cluster_conf+="
NodeName=node$i NodeAddr=$prefix.$((i + 1)) Port=$((slurmd_port + i)) CPUs=$(nproc) State=UNKNOWN"
    done
fi
cat >"$dir/slurm.conf" <<CONF
ClusterName=gpt2dist-test
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
# A requeued job waits cred_expire (AuthInfo), then the next pass of a scheduler starts it: every
# second here, not every 30 s (backfill) or 60 s (main loop), SLURM's defaults.
SchedulerParameters=bf_interval=1,sched_interval=1
MpiDefault=none
ReturnToService=2
JobRequeue=1
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
StateSaveLocation=$dir/state
SlurmctldPidFile=$dir/slurmctld.pid
SlurmctldLogFile=$dir/slurmctld.log
$cluster_conf
PartitionName=test Nodes=$node_names Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
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
[ "$nodes" = 1 ] || net_up "$nodes"
/usr/sbin/slurmctld && touch "$dir/slurmctld.started"
if [ "$nodes" = 1 ]; then
    /usr/sbin/slurmd && touch "$dir/slurmd.started"
else
    for i in $(seq "$nodes"); do start_slurmd "$i"; done
fi
for _ in $(seq 60); do
    alive=1
    for started in "$dir"/slurmctld.started "$dir"/slurmd*.started; do
        pid=$(cat "${started%.started}.pid" 2>/dev/null || true)
        { [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; } || alive=0
    done
    if [ "$alive" = 1 ] && [ "$(sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)$')" = "$nodes" ]; then
        echo "SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 1
done
echo "slurm did not come up; see $dir/slurmctld.log and $dir/slurmd*.log" >&2
stop
exit 1
