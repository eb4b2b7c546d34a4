#!/usr/bin/env bash
# A real two-node Pacemaker + Corosync cluster in network namespaces, each
# node running repld through the replblk OCF agent as a promotable clone,
# with resource-level fencing by crm-fence-peer:
#
#   1. bring-up: exactly one Primary, the other in sync;
#   2. move the promoted role to the other node (data follows);
#   3. SIGKILL the Primary's repld: the other node is promoted (after
#      fencing its peer by constraint), the data is intact; the killed
#      node resyncs after a cleanup and the constraint goes;
#   4. cut the replication link (`ip link set down`): the Primary holds
#      writes, fences the peer (constraint), resumes; never two Primaries;
#      after the link heals and the peer resyncs, the constraint goes.
#
#   bash tools/pacemaker-test.sh        (root; tools/test.sh runs it)
#
# Each node is `ip netns exec NS unshare --pid --fork --mount-proc
# --mount --uts`: its own network, hostname, /proc, tmpfs /run and
# /dev/shm, and bind-mounted /etc/corosync, /var/lib/pacemaker,
# /var/log/{pacemaker,cluster} and OCF agent directory. Killing the
# namespace's PID 1 ends every process of the node (corosync, the
# Pacemaker daemons, repld, agents); the namespaces and the work
# directory are removed on exit, also on failure. Traffic stays inside
# the two namespaces (10.99.1.0/24 cluster, 10.99.2.0/24 replication).
# Every wait is bounded.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${REPLBLK_BIN:-$REPO/target/debug}
START=$SECONDS
for tool in corosync pacemakerd crm crm_mon crm_resource cibadmin qemu-io unshare nsenter ip; do
    command -v "$tool" >/dev/null || { echo "pacemaker-test: $tool is not installed" >&2; exit 1; }
done
[[ -x $BIN/repld && -x $BIN/replctl ]] || { echo "pacemaker-test: build first (cargo build): no $BIN/repld" >&2; exit 1; }

W=$(mktemp -d /var/tmp/replblk-pcmk-XXXXXX)
NS=(rbpcmk$$a rbpcmk$$b)
NAMES=(alpha beta)
CLUSTER_IP=(10.99.1.1 10.99.1.2)
REPL_IP=(10.99.2.1 10.99.2.2)
FLOAT_IP=10.99.1.100
declare -a INIT_PID=("" "")   # host PIDs of each node's PID-namespace init
declare -a UNSHARE_PID=("" "")
FAILED=1

log() { printf '[%4ds] %s\n' $((SECONDS - START)) "$*"; }

cleanup() {
    local rc=$?
    set +e
    if [[ $FAILED -ne 0 ]]; then
        echo "---- pacemaker-test FAILED (exit $rc); node logs:" >&2
        for i in 0 1; do
            for f in "$W/${NAMES[$i]}/log/repld.log" "$W/${NAMES[$i]}/log/pacemaker/repld-r0.log" \
                "$W/${NAMES[$i]}/log/pacemaker/pacemaker.log"; do
                [[ -f $f ]] && { echo "== $f (tail)" >&2; tail -n 30 "$f" >&2; }
            done
        done
        [[ -n ${INIT_PID[0]} ]] && on 0 crm_mon -1 -A >&2 2>/dev/null
    fi
    for i in 0 1; do
        # PID 1 of a PID namespace: SIGKILL ends every process in it.
        [[ -n ${INIT_PID[$i]} ]] && kill -KILL "${INIT_PID[$i]}" 2>/dev/null
        [[ -n ${UNSHARE_PID[$i]} ]] && wait "${UNSHARE_PID[$i]}" 2>/dev/null
    done
    for ns in "${NS[@]}"; do
        ip netns del "$ns" 2>/dev/null
    done
    if [[ $FAILED -ne 0 && -n ${KEEP_LOGS:-} ]]; then
        echo "logs kept in $W" >&2
    else
        rm -rf "$W"
    fi
    [[ $FAILED -eq 0 ]] && log "cleaned up"
}
trap cleanup EXIT

fail() { echo "pacemaker-test: FAIL: $*" >&2; exit 1; }

# Runs a command inside node i (its network, mount, UTS and PID namespaces).
on() {
    local i=$1
    shift
    nsenter -t "${INIT_PID[$i]}" -n -m -u -p -- "$@"
}

# wait_until SECONDS DESCRIPTION COMMAND...: polls every 0.5 s.
wait_until() {
    local limit=$1 what=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@"; do
        [[ $SECONDS -lt $deadline ]] || fail "timed out after ${limit}s waiting for $what"
        sleep 0.5
    done
}

# role_of i: Primary, Secondary or "-" (repld not answering).
field_of() {
    local i=$1 f=$2 st
    st=$(on "$i" "$BIN/replctl" --socket /run/replblk/repld.sock status r0 --json 2>/dev/null) || { echo -; return; }
    printf '%s\n' "$st" | sed -n "s/.*\"$f\":\"\\([^\"]*\\)\".*/\\1/p"
}
role_of() { field_of "$1" role; }
bool_of() {
    local st
    st=$(on "$1" "$BIN/replctl" --socket /run/replblk/repld.sock status r0 --json 2>/dev/null) || { echo -; return; }
    printf '%s\n' "$st" | sed -n "s/.*\"$2\":\\(true\\|false\\).*/\\1/p"
}
# gone i PID: the process has exited (a zombie counts as gone).
gone() { [[ -z $(on "$1" cat "/proc/$2/cmdline" 2>/dev/null | tr -d '\0') ]]; }

# Never two Primaries: checked at every poll below.
one_primary_at_most() {
    local a b
    a=$(role_of 0)
    b=$(role_of 1)
    [[ $a == Primary && $b == Primary ]] && fail "two Primaries"
    return 0
}

is_primary_only() {  # is_primary_only i: node i Primary, the other Secondary
    one_primary_at_most
    [[ $(role_of "$1") == Primary && $(role_of $((1 - $1))) == Secondary ]]
}

in_sync() {
    one_primary_at_most
    local i
    for i in 0 1; do
        [[ $(field_of "$i" disk) == UpToDate && $(field_of "$i" peer_disk) == UpToDate &&
            $(field_of "$i" replication) == Established ]] || return 1
    done
}

constraint_present() { on 0 cibadmin --query --scope constraints --xpath "//rsc_location[@id='replblk-fence-r0']" >/dev/null 2>&1; }
constraint_absent() { one_primary_at_most; ! constraint_present; }
constraint_names() { on 0 cibadmin --query --scope constraints --xpath "//rsc_location[@id='replblk-fence-r0']//expression" 2>/dev/null | sed -n 's/.*value="\([a-z]*\)".*/\1/p'; }

# qemu-io against the Primary's export through the floating address, run
# from node i's namespace.
qio() {
    local i=$1
    shift
    local out
    out=$(on "$i" timeout 60 qemu-io -f raw "nbd://$FLOAT_IP:10809/r0" "$@" 2>&1) || fail "qemu-io $*: $out"
    [[ $out != *fail* && $out != *error* ]] || fail "qemu-io $*: $out"
}

dc_elected() { on 0 crm_mon -1 2>/dev/null | grep -q "Current DC: .* partition with quorum"; }

# ---------------------------------------------------------------------------
log "work directory $W; namespaces ${NS[*]}"
for i in 0 1; do
    ip netns add "${NS[$i]}"
    ip -n "${NS[$i]}" link set lo up
done
ip link add "rbc$$a" netns "${NS[0]}" type veth peer name "rbc$$b" netns "${NS[1]}"
ip link add "rbr$$a" netns "${NS[0]}" type veth peer name "rbr$$b" netns "${NS[1]}"
CL_IF=("rbc$$a" "rbc$$b")
RE_IF=("rbr$$a" "rbr$$b")
for i in 0 1; do
    ip -n "${NS[$i]}" addr add "${CLUSTER_IP[$i]}/24" dev "${CL_IF[$i]}"
    ip -n "${NS[$i]}" addr add "${REPL_IP[$i]}/24" dev "${RE_IF[$i]}"
    ip -n "${NS[$i]}" link set "${CL_IF[$i]}" up
    ip -n "${NS[$i]}" link set "${RE_IF[$i]}" up
done

# The OCF agents each node sees: ours and IPaddr2.
RD=$W/resource.d
mkdir -p "$RD/replblk" "$RD/heartbeat"
install -m 0755 "$REPO/tools/ocf/replblk" "$RD/replblk/replblk"
cp -a /usr/lib/ocf/resource.d/heartbeat/IPaddr2 "$RD/heartbeat/"

cat >"$W/replblk.toml" <<EOF
[nbd]
listen = "0.0.0.0:10809"

[control]
socket = "/run/replblk/repld.sock"

[replication]
ping_interval_ms = 500
ping_timeout_ms = 2000
reconnect_max_ms = 1000

[[resource]]
name = "r0"
secret = "pacemaker-test-secret"
fencing = "resource-only"
fence_peer_handler = "$REPO/tools/handlers/crm-fence-peer"
unfence_peer_handler = "$REPO/tools/handlers/crm-unfence-peer"
fence_timeout_ms = 30000
fence_retry_ms = 2000

[resource.on.alpha]
disk = "$W/alpha/disk.img"
address = "${REPL_IP[0]}:7790"

[resource.on.beta]
disk = "$W/beta/disk.img"
address = "${REPL_IP[1]}:7790"
EOF

for i in 0 1; do
    n=${NAMES[$i]}
    d=$W/$n
    mkdir -p "$d/corosync" "$d/corosync-lib" "$d/log/cluster" "$d/log/pacemaker"
    install -d -o hacluster -g haclient "$d/pacemaker" "$d/pacemaker/cib" "$d/pacemaker/pengine" \
        "$d/pacemaker/blackbox" "$d/pacemaker/cores"
    chown hacluster:haclient "$d/log/pacemaker"
    truncate -s 64M "$d/disk.img"
    cat >"$d/corosync/corosync.conf" <<EOF
totem {
    version: 2
    cluster_name: replblk-test
    transport: knet
    crypto_cipher: none
    crypto_hash: none
    token: 3000
}
nodelist {
    node {
        ring0_addr: ${CLUSTER_IP[0]}
        name: alpha
        nodeid: 1
    }
    node {
        ring0_addr: ${CLUSTER_IP[1]}
        name: beta
        nodeid: 2
    }
}
quorum {
    provider: corosync_votequorum
    two_node: 1
}
logging {
    to_logfile: yes
    logfile: /var/log/cluster/corosync.log
    to_stderr: no
    to_syslog: no
}
EOF
    cat >"$d/init.sh" <<EOF
set -e
mount --make-rprivate /
mount -t tmpfs tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount --bind $d/corosync /etc/corosync
mount --bind $d/corosync-lib /var/lib/corosync
mount --bind $d/pacemaker /var/lib/pacemaker
mount --bind $d/log/pacemaker /var/log/pacemaker
mount --bind $d/log/cluster /var/log/cluster
mount --bind $RD /usr/lib/ocf/resource.d
hostname $n
mkdir -p /run/replblk /run/resource-agents /run/crm
echo ready > $d/ready
# PID 1 of the namespace: reaps orphans (repld, daemons) until killed
# from outside.
exec python3 -c '
import os, time
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.5)
'
EOF
    mkdir -p /var/lib/corosync /var/log/pacemaker /var/log/cluster
    ip netns exec "${NS[$i]}" unshare --pid --fork --mount-proc --mount --uts sh "$d/init.sh" \
        </dev/null >"$d/log/init.log" 2>&1 &
    UNSHARE_PID[$i]=$!
done
for i in 0 1; do
    wait_until 10 "node ${NAMES[$i]} namespace" test -f "$W/${NAMES[$i]}/ready"
    INIT_PID[$i]=$(cat "/proc/${UNSHARE_PID[$i]}/task/${UNSHARE_PID[$i]}/children" | awk '{print $1}')
    [[ -n ${INIT_PID[$i]} ]] || fail "no init process for ${NAMES[$i]}"
done
log "namespaces up (init PIDs ${INIT_PID[*]})"

# ---------------------------------------------------------------------------
# First sync, as an operator does it before handing the resource to the
# cluster: metadata on both, skip the initial sync (both disks are zero).
for i in 0 1; do
    on "$i" sh -c "setsid -f $BIN/repld --config $W/replblk.toml --node ${NAMES[$i]} \
        --pidfile /run/replblk/boot.pid </dev/null >>$W/${NAMES[$i]}/log/repld.log 2>&1"
done
for i in 0 1; do
    wait_until 20 "repld on ${NAMES[$i]}" on "$i" test -S /run/replblk/repld.sock
    on "$i" "$BIN/replctl" --socket /run/replblk/repld.sock create-md r0 >/dev/null
    on "$i" "$BIN/replctl" --socket /run/replblk/repld.sock up r0 >/dev/null
done
connected0() { [[ $(field_of 0 connection) == Connected ]]; }
wait_until 30 "the bootstrap pair to connect" connected0
on 0 "$BIN/replctl" --socket /run/replblk/repld.sock new-current-uuid r0 --clear-bitmap >/dev/null
wait_until 20 "both UpToDate" in_sync
for i in 0 1; do
    pid=$(on "$i" cat /run/replblk/boot.pid)
    on "$i" kill -TERM "$pid"
    wait_until 30 "bootstrap repld on ${NAMES[$i]} to exit" gone "$i" "$pid"
done
log "metadata created, initial sync skipped"

# ---------------------------------------------------------------------------
for i in 0 1; do
    on "$i" sh -c "corosync -f </dev/null >>/var/log/cluster/corosync.out 2>&1 &
        sleep 1; pacemakerd </dev/null >>/var/log/pacemaker/pacemakerd.out 2>&1 &"
done
wait_until 120 "a DC with quorum" dc_elected
log "cluster up: $(on 0 crm_mon -1 | grep 'Current DC')"

on 0 crm configure property stonith-enabled=false
on 0 crm configure property no-quorum-policy=ignore
on 0 crm configure rsc_defaults resource-stickiness=100 migration-threshold=1
on 0 crm configure primitive r0 ocf:replblk:replblk \
    params resource=r0 config="$W/replblk.toml" repld="$BIN/repld" replctl="$BIN/replctl" \
    logfile=/var/log/pacemaker/repld-r0.log \
    op monitor interval=3s role=Promoted timeout=20s \
    op monitor interval=4s role=Unpromoted timeout=20s \
    op start timeout=60s op stop timeout=100s op promote timeout=90s op demote timeout=90s
on 0 crm configure clone r0-clone r0 meta promotable=true promoted-max=1 promoted-node-max=1 \
    clone-max=2 clone-node-max=1 notify=true
on 0 crm configure primitive r0-ip ocf:heartbeat:IPaddr2 params ip=$FLOAT_IP cidr_netmask=24 \
    op monitor interval=5s
on 0 crm configure colocation r0-ip-with-primary inf: r0-ip r0-clone:Promoted
on 0 crm configure order r0-promote-then-ip Mandatory: r0-clone:promote r0-ip:start

primary_index() {
    if [[ $(role_of 0) == Primary ]]; then echo 0; elif [[ $(role_of 1) == Primary ]]; then echo 1; else echo -; fi
}
exactly_one_primary_in_sync() {
    local p
    p=$(primary_index)
    [[ $p != - ]] && is_primary_only "$p" && in_sync
}
ip_on() { on "$1" ip -4 addr show dev "${CL_IF[$1]}" | grep -q "$FLOAT_IP/"; }
wait_until 120 "exactly one Primary, in sync" exactly_one_primary_in_sync
P=$(primary_index)
S=$((1 - P))
wait_until 60 "the floating address on the Primary" ip_on "$P"
log "1. bring-up: ${NAMES[$P]} is Primary, ${NAMES[$S]} Secondary, in sync; $FLOAT_IP on ${NAMES[$P]}"
qio "$S" -c "write -P 0xa1 0 1M" -c "read -P 0xa1 0 1M"

# ---------------------------------------------------------------------------
on 0 crm_resource --move --promoted -r r0-clone -N "${NAMES[$S]}" >/dev/null 2>&1
wait_until 90 "${NAMES[$S]} promoted by the move" is_primary_only "$S"
wait_until 60 "the floating address to follow" ip_on "$S"
on 0 crm_resource --clear -r r0-clone >/dev/null 2>&1
wait_until 60 "in sync after the move" in_sync
qio "$P" -c "read -P 0xa1 0 1M" -c "write -P 0xb2 1M 1M"
log "2. promoted role moved to ${NAMES[$S]}; data followed"
P=$S
S=$((1 - P))

# ---------------------------------------------------------------------------
pid=$(on "$P" cat /run/resource-agents/replblk-r0.pid)
on "$P" kill -KILL "$pid"
log "3. killed repld (PID $pid in its namespace) on the Primary ${NAMES[$P]}"
is_primary() { one_primary_at_most; [[ $(role_of "$1") == Primary ]]; }
wait_until 90 "${NAMES[$S]} promoted after the kill" is_primary "$S"
one_primary_at_most
wait_until 30 "the fencing constraint from ${NAMES[$S]}" constraint_present
[[ $(constraint_names) == "${NAMES[$S]}" ]] || fail "constraint names $(constraint_names), not ${NAMES[$S]}"
wait_until 60 "the floating address on ${NAMES[$S]}" ip_on "$S"
qio "$P" -c "read -P 0xa1 0 1M" -c "read -P 0xb2 1M 1M" -c "write -P 0xc3 2M 1M"
log "   ${NAMES[$S]} promoted, constraint placed, data intact"
on 0 crm_resource --cleanup -r r0-clone >/dev/null 2>&1
wait_until 120 "${NAMES[$P]} back and resynced" in_sync
wait_until 30 "the constraint lifted after the resync" constraint_absent
is_primary_only "$S" || fail "roles changed during the resync"
log "   ${NAMES[$P]} restarted by the cluster, resynced; constraint removed"
P=$S
S=$((1 - P))

# ---------------------------------------------------------------------------
# A writer on the Primary runs through the cut: its writes are held while
# the peer is fenced, never failed.
WRITES=()
for k in $(seq 0 39); do
    WRITES+=(-c "write -P 0xd4 $((3072 + k * 64))K 64K" -c "sleep 100")
done
on "$S" timeout 120 qemu-io -f raw "nbd://$FLOAT_IP:10809/r0" "${WRITES[@]}" >"$W/writer.out" 2>&1 &
WRITER=$!
ip -n "${NS[$P]}" link set "${RE_IF[$P]}" down
log "4. replication link cut (${RE_IF[$P]} down on the Primary ${NAMES[$P]})"
wait_until 30 "the Primary to fence its peer" constraint_present
[[ $(constraint_names) == "${NAMES[$P]}" ]] || fail "constraint names $(constraint_names), not ${NAMES[$P]}"
resumed() { [[ $(bool_of "$P" io_frozen) == false && $(bool_of "$P" peer_fenced) == true ]]; }
wait_until 60 "writes to resume on ${NAMES[$P]}" resumed
# Whatever the cluster does meanwhile, the Secondary is not promoted.
for _ in $(seq 1 20); do
    one_primary_at_most
    [[ $(role_of "$S") == Secondary ]] || fail "${NAMES[$S]} left Secondary while cut off"
    sleep 0.5
done
wait "$WRITER" || fail "the writer through the cut failed: $(cat "$W/writer.out")"
grep -q -i -E "fail|error" "$W/writer.out" && fail "the writer saw errors: $(cat "$W/writer.out")"
PLOG=$W/${NAMES[$P]}/log/pacemaker/repld-r0.log
grep -q "lost the peer: writes frozen until it is fenced" "$PLOG" || fail "no freeze logged on ${NAMES[$P]}"
grep -q "fence-peer handler: the peer is fenced; writes resume" "$PLOG" || fail "no resume logged on ${NAMES[$P]}"
stamp() { date -d "$(grep -m1 "$1" "$PLOG" | awk '{print $1}')" +%s.%N; }
frozen_ms=$(awk -v a="$(stamp 'writes frozen until')" -v b="$(stamp 'writes resume')" 'BEGIN { printf "%d", (b - a) * 1000 }')
log "   writes held for ${frozen_ms} ms ($(grep -o 'fence-peer handler finished in [^:]*' "$PLOG" | tail -n 1))"
log "   constraint placed by ${NAMES[$P]}, writes completed, ${NAMES[$S]} stayed Secondary"
ip -n "${NS[$P]}" link set "${RE_IF[$P]}" up
wait_until 120 "the pair to reconnect and resync" in_sync
wait_until 30 "the constraint lifted after the heal" constraint_absent
is_primary_only "$P" || fail "roles changed during the heal"
qio "$S" -c "read -P 0xd4 3M 2560K" -c "read -P 0xc3 2M 1M"
log "   link healed, ${NAMES[$S]} resynced, constraint removed"

# Both copies hold the same data (the metadata at the end differs).
size=$(on 0 "$BIN/replctl" --socket /run/replblk/repld.sock status r0 --json | sed -n 's/.*"size":\([0-9]*\).*/\1/p')
cmp -n "$size" "$W/alpha/disk.img" "$W/beta/disk.img" || fail "the copies differ"
FAILED=0
log "pacemaker-test passed in $((SECONDS - START)) s"
