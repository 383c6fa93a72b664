#!/usr/bin/env bash
# A two-node Slurm cluster on this machine, for the tests: one slurmctld on loopback and
# two slurmd, each in a network and UTS namespace of its own (hostnames node1 and node2),
# joined by a veth pair with addresses inside the namespaces only. Each has its own
# spool directories and shares the rest of the file system (/tmp too) with the host.
# The daemons reach slurmctld, and it them, through scripts/nsforward.py (loopback on the
# host side).
# Needs root, and scripts/setup.sh's packages (slurm-wlm, munge, libpmix-dev: PMIx must
# be installed before slurmd starts, or srun --mpi=pmix cannot load it).
# Its configuration lives in a directory of its own ($state/etc), never in /etc/slurm, so
# it runs beside a machine's own Slurm: clients reach it with SLURM_CONF=$state/etc/slurm.conf
# (scripts/test.sh exports it).
# Usage: scripts/slurm-cluster.sh start|stop|status
set -euo pipefail
cd "$(dirname "$0")/.."
state=/var/lib/capsid-slurm
conf=$state/etc/slurm.conf
export SLURM_CONF=$conf
mark="# written by capsid's scripts/slurm-cluster.sh"
nodes=(node1 node2)
addr() { case $1 in node1) echo 10.77.0.11 ;; node2) echo 10.77.0.12 ;; esac; }

stop() {
    for f in "$state"/*.pid; do
        [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
    done
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    sleep 0.5
    for n in "${nodes[@]}"; do ip netns del "capsid-$n" 2>/dev/null || true; done
    ip route del local 10.77.0.0/24 dev lo 2>/dev/null || true
    sed -i '/# capsid-slurm$/d' /etc/hosts
    for f in /etc/slurm/slurm.conf /etc/slurm/mpi.conf; do  # where older versions wrote
        grep -qs "$mark" "$f" && rm -f "$f"
    done
    rm -rf "$state"
    rmdir /tmp/capsid-slurm-pmix 2>/dev/null || true
}

start() {
    stop
    mkdir -p "$state/etc" "$state/ctld" /var/log/slurm /run/munge
    chmod 755 "$state" "$state/etc"
    if ! pgrep -x munged >/dev/null; then
        chown munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
        runuser -u munge -- /usr/sbin/munged --force
    fi
    # the nodes: two namespaces joined by a veth pair
    ip netns add capsid-node1
    ip netns add capsid-node2
    ip link add capsid-n1 type veth peer name capsid-n2
    ip link set capsid-n1 netns capsid-node1
    ip link set capsid-n2 netns capsid-node2
    for n in "${nodes[@]}"; do
        ip -n "capsid-$n" link set lo up
        ip -n "capsid-$n" addr add "$(addr "$n")/24" dev "capsid-${n/node/n}"
        ip -n "capsid-$n" link set "capsid-${n/node/n}" up
        grep -q "^$(addr "$n") $n " /etc/hosts || echo "$(addr "$n") $n # capsid-slurm" >>/etc/hosts
    done
    # slurmctld reaches a node's slurmd at its address, delivered on the host's loopback
    ip route add local 10.77.0.0/24 dev lo
    host=$(hostname -s)
    cat >"$conf" <<CONF
$mark
ClusterName=capsid
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd-%n.pid
SlurmdSpoolDir=$state/spool
StateSaveLocation=$state/ctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
NodeName=node1 NodeAddr=10.77.0.11 CPUs=4 RealMemory=2000 State=UNKNOWN
NodeName=node2 NodeAddr=10.77.0.12 CPUs=4 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
CONF
    slurmctld -c -i
    setsid python3 scripts/nsforward.py \
        capsid-node1:127.0.0.1:6817=host:127.0.0.1:6817 \
        capsid-node2:127.0.0.1:6817=host:127.0.0.1:6817 \
        host:10.77.0.11:6818=capsid-node1:10.77.0.11:6818 \
        host:10.77.0.12:6818=capsid-node2:10.77.0.12:6818 \
        </dev/null >/var/log/slurm/nsforward.log 2>&1 &
    echo $! >"$state/nsforward.pid"
    # Slurm's PMIx plugin names its files by job step only, in the spool directory and in
    # a directory for its clients (which must be where their containers see it: /tmp).
    # Each node has both of its own, at the same paths: a mount namespace of its own.
    clients=/tmp/capsid-slurm-pmix
    printf '%s\nPMIxTimeout=60\nPMIxCliTmpDirBase=%s\n' "$mark" "$clients" >"$state/etc/mpi.conf"
    mkdir -p "$state/spool" "$clients"
    for n in "${nodes[@]}"; do
        mkdir -p "$state/spool-$n" "$state/clients-$n"
        chmod 1777 "$state/clients-$n"
        # nsenter, not `ip netns exec`: that remounts /sys, and slurmd needs the cgroups.
        nsenter --net="/run/netns/capsid-$n" unshare --uts --mount --propagation private \
            sh -c "mount --bind $state/spool-$n $state/spool && \
                   mount --bind $state/clients-$n $clients && hostname $n && exec slurmd -N $n"
    done
    for _ in $(seq 100); do
        if [ "$(sinfo -h -o '%t' | sort -u | tr '\n' ' ')" = "idle " ]; then
            echo "slurm-cluster: node1 and node2 are up"
            return 0
        fi
        sleep 0.2
    done
    sinfo >&2 || true
    tail -5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd-node1.log >&2 || true
    echo "slurm-cluster: the nodes did not come up" >&2
    return 1
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) sinfo ;;
    conf) echo "$conf" ;;
    *) echo "usage: $0 start|stop|status|conf" >&2; exit 2 ;;
esac
