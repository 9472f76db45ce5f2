#!/usr/bin/env bash
# telvirt's main job end to end on the embedded default: a node in a temporary data dir, VNFs
# created from examples/, placement on this host's cores, lock/unlock, events, authorities,
# restart safety, and a clean shutdown. Usage: scripts/demo.sh [path/to/telvirt]
set -euo pipefail
cd "$(dirname "$0")/.."

TELVIRT="${1:-target/release/telvirt}"
[ -x "$TELVIRT" ] || { echo "demo: $TELVIRT is not built (run: make demo)" >&2; exit 1; }
TELVIRT="$(realpath "$TELVIRT")"
# The example descriptors name examples/vnfs/*.wasm: write the built-in modules there first.
"$TELVIRT" wasm examples --out examples/vnfs >/dev/null

DATA="$(mktemp -d /tmp/telvirt-demo.XXXXXX)"
LOG="$DATA/serve.log"
export TELVIRT_CONFIG="$DATA/client.toml"
SERVER_PID=""
# The default vm guest (kernel from apt, initramfs) is built once and kept across demos.
IMAGE_CACHE="${TELVIRT_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/telvirt}"
mkdir -p "$IMAGE_CACHE"

cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  # VMs outlive their node by design (re-adoption); the demo must not leave any behind.
  for pidfile in "$DATA"/instances/*/qemu.pid; do
    [ -f "$pidfile" ] && kill -KILL "$(cat "$pidfile")" 2>/dev/null || true
  done
  rm -rf "$DATA"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# fw1.yaml edited by sed expression $1, its module path made absolute (the copy lives elsewhere;
# the CLI resolves a relative module against the descriptor's directory).
fw1_like() {
  sed "s|\.\./vnfs/firewall\.wasm|$PWD/examples/vnfs/firewall.wasm|; $1" examples/descriptors/fw1.yaml
}
run() { printf '$ telvirt %s\n' "$*"; "$TELVIRT" "$@"; }
# Packets the last link of network $1 (default: chain) carried.
delivered() { "$TELVIRT" net show "${1:-chain}" -o json | grep -o '"packets": [0-9]*' | tail -1 | grep -o '[0-9]*$'; }

start_node() {
  rm -f "$TELVIRT_CONFIG"
  "$TELVIRT" serve --data-dir "$DATA" --listen 127.0.0.1:0 --image-cache "$IMAGE_CACHE" >>"$LOG" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 200); do
    if [ -f "$TELVIRT_CONFIG" ] && "$TELVIRT" vnf list >/dev/null 2>&1; then return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$LOG"; echo "demo: telvirt serve exited" >&2; exit 1; }
    sleep 0.05
  done
  echo "demo: telvirt serve did not become ready" >&2; cat "$LOG"; exit 1
}

# Polls `vnf show NAME -o json` until the phase is one of the given ones.
wait_phase() {
  local name="$1"; shift
  for _ in $(seq 1 600); do
    phase="$("$TELVIRT" vnf show "$name" -o json | sed -n 's/^  "phase": "\(.*\)",$/\1/p')"
    for want in "$@"; do [ "$phase" = "$want" ] && return 0; done
    sleep 0.1
  done
  echo "demo: $name stayed $phase" >&2; return 1
}

step "Start an all-in-one node (controller + this host's agent + embedded redb store)"
start_node
echo "node up (pid $SERVER_PID), data dir $DATA; the CLI reads $TELVIRT_CONFIG"
HOST="$("$TELVIRT" host list -o json | sed -n 's/^    "name": "\(.*\)",$/\1/p' | head -1)"
run host show "$HOST"

step "Create VNFs from descriptors (YAML and JSON)"
run vnf create -f examples/descriptors/fw1.yaml
run vnf create -f examples/descriptors/nat1.yaml
run vnf create -f examples/descriptors/upf1.json
wait_phase fw1 Running Failed
run vnf list

step "Placement: fw1 holds a dedicated core; nat1 and upf1 wait, and say why"
run vnf show fw1
run vnf show nat1
run host show "$HOST"

step "Freeing capacity: delete fw1, and the shared group 'edge' gets its core"
run vnf delete fw1
wait_phase nat1 Running Failed Scheduled
wait_phase upf1 Running Failed Scheduled
run vnf list
run host show "$HOST"

step "Lock: a locked VNF refuses every change but unlock and delete"
run vnf lock nat1
printf '$ telvirt vnf stop nat1\n'
"$TELVIRT" vnf stop nat1 || echo "(refused, as it must be)"
run vnf unlock nat1
run vnf events nat1

step "Management authorities: each sees only its own VNFs"
TOKEN="$("$TELVIRT" authority create enterprise1 -o json | sed -n 's/^  "token": "\(.*\)"$/\1/p')"
echo "created authority enterprise1 (token shown once)"
printf '$ telvirt --token <enterprise1> vnf list\n'
"$TELVIRT" --token "$TOKEN" vnf list
printf '$ telvirt --token <enterprise1> vnf delete nat1\n'
"$TELVIRT" --token "$TOKEN" vnf delete nat1 || echo "(not visible to enterprise1: 404)"

step "Bad input is refused with the field path, and nothing is stored"
fw1_like 's/count: 1/count: 0/; s/16MiB/16MB/' >"$DATA/bad.yaml"
printf '$ telvirt vnf create -f bad.yaml\n'
"$TELVIRT" vnf create -f "$DATA/bad.yaml" || true

step "Restart safety: kill -9 the node and start it again"
kill -KILL "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
start_node
run vnf list

step "vm VNF: upf1 is a QEMU guest, its vCPU thread pinned to the core the scheduler gave it"
if "$TELVIRT" host list -o json | grep -q '"vm"'; then
  # The first boot waits for the default guest image (a kernel download on a fresh cache).
  for _ in $(seq 1 3000); do
    phase="$("$TELVIRT" vnf show upf1 -o json | sed -n 's/^  "phase": "\(.*\)",$/\1/p')"
    [ "$phase" = Running ] || [ "$phase" = Failed ] && break
    sleep 0.1
  done
  run vnf show upf1
  [ "$phase" = Running ] || { echo "demo: upf1 is $phase; see $LOG" >&2; exit 1; }
  run host show "$HOST"
  QEMU_PID="$(cat "$DATA/instances/upf1/qemu.pid")"
  echo "QEMU pid $QEMU_PID (adopted again after the kill -9 above); its threads and their CPUs:"
  for t in /proc/"$QEMU_PID"/task/*; do
    printf '  %-18s %s\n' "$(cat "$t/comm")" "$(sed -n 's/^Cpus_allowed_list:\t//p' "$t/status")"
  done
  run vnf lock upf1
  wait_phase upf1 Locked
  run vnf unlock upf1
  wait_phase upf1 Running
  run vnf attach upf1 --id rng0 --kind rng
  for _ in $(seq 1 600); do
    "$TELVIRT" vnf show upf1 | grep -q 'devices rng0' && break
    sleep 0.1
  done
  "$TELVIRT" vnf show upf1 | grep Reason
  run vnf detach upf1 rng0
  run vnf console upf1 --lines 5
  echo "upf1's spec.vm.nics n3 and n6 are vhost-user ports of this node's data plane; its guest bridges them:"
  cat >"$DATA/vmchain.yaml" <<'YAML'
apiVersion: telvirt/v1
kind: Network
metadata: { name: vmchain }
spec:
  nodes:
    - { name: gen, kind: generator, rate_pps: 2000 }
    - { name: sink, kind: sink }
  links:
    - gen.out -> upf1.n3
    - upf1.n6 -> sink.in
YAML
  run net create -f "$DATA/vmchain.yaml"
  for _ in $(seq 1 600); do
    n="$(delivered vmchain || true)"
    [ "${n:-0}" -gt 2000 ] && break
    sleep 0.1
  done
  run net show vmchain
  echo "What crossed upf1's NICs, counted on the host's side, and what its guest's kernel counted inside:"
  run vnf stats upf1
  run net delete vmchain
  run vnf delete upf1
  # Gone, or a zombie waiting for its reaper (an adopted QEMU is not our child).
  state=""
  for _ in $(seq 1 50); do
    state="$(sed -n 's/^State:\t\(.\).*/\1/p' "/proc/$QEMU_PID/status" 2>/dev/null || true)"
    { [ -z "$state" ] || [ "$state" = Z ]; } && break
    sleep 0.1
  done
  if [ -z "$state" ] || [ "$state" = Z ]; then echo "QEMU $QEMU_PID is gone"; else echo "QEMU $QEMU_PID still runs"; fi
else
  echo "(the vm runtime is not available on this host; $LOG says why)"
fi

step "Clean shutdown"
kill -TERM "$SERVER_PID"; wait "$SERVER_PID" || true
SERVER_PID=""
tail -n 1 "$LOG"

step "wasm VNFs on the data plane: a second node whose inventory gives both CPUs to VNFs"
DATA2="$(mktemp -d "$DATA/wasm.XXXXXX")"
export TELVIRT_CONFIG="$DATA2/client.toml"
"$TELVIRT" serve --data-dir "$DATA2" --listen 127.0.0.1:0 \
  --inventory examples/inventory/dev2.yaml >>"$DATA2/serve.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 200); do
  if [ -f "$TELVIRT_CONFIG" ] && "$TELVIRT" vnf list >/dev/null 2>&1; then break; fi
  sleep 0.05
done
SERVER2="$(sed -n 's/^server = "\(.*\)"$/\1/p' "$TELVIRT_CONFIG")"
printf '\033[1mweb console: %s/ui/\033[0m (sign in with the token in %s; it shows this node live until the demo moves on to an agent on its own)\n' "$SERVER2" "$TELVIRT_CONFIG"
echo "(the API speaks TLS only: its self-signed certificate $DATA2/tls/server.crt is pinned in the client config; a browser asks once, compare the SHA-256 fingerprint it shows with the one in the log:)"
grep -o 'TLS certificate SHA-256 [0-9A-F:]*' "$DATA2/serve.log" | head -n 1
step "Confinement: an authority names no host path or interface the admin did not grant it"
ENT="$("$TELVIRT" authority create ent1 -o json | sed -n 's/^  "token": "\(.*\)"$/\1/p')"
as_ent() { printf '$ telvirt --token <ent1> %s\n' "$*"; "$TELVIRT" --token "$ENT" "$@"; }
cat >"$DATA2/steal.yaml" <<'YAML'
apiVersion: telvirt/v1
kind: Vnf
metadata: { name: steal }
spec:
  runtime: vm
  vm: { memory: 64MiB, disk: /etc/shadow }
YAML
as_ent vnf create -f "$DATA2/steal.yaml" || echo "(refused: /etc/shadow is a host path ent1 was not granted)"
fw1_like "s/name: fw1/name: fwe/" >"$DATA2/fwe.yaml"
as_ent vnf create -f "$DATA2/fwe.yaml"
wait_phase fwe Running
as_ent module list
IF="tvg$$"
cat >"$DATA2/tap.yaml" <<YAML
apiVersion: telvirt/v1
kind: Network
metadata: { name: tap }
spec:
  nodes: [ { name: esink, kind: sink } ]
  links: [ host:$IF -> fwe.in, fwe.out -> esink.in ]
YAML
as_ent net create -f "$DATA2/tap.yaml" || echo "(refused: host interface $IF is not granted to ent1)"
run authority grant ent1 --interface "tvg$$*"
run authority grants ent1
if [ "$(id -u)" -eq 0 ]; then
  # The granted interface: one end of a veth pair whose other end lives in a namespace.
  GNS="tvdemo$$g"
  ip netns add "$GNS"
  ip link add "$IF" type veth peer name eth0 netns "$GNS"
  ip link set "$IF" up
  ip -n "$GNS" addr add 10.204.0.1/24 dev eth0
  ip -n "$GNS" link set eth0 up
fi
as_ent net create -f "$DATA2/tap.yaml"
if [ "$(id -u)" -eq 0 ]; then
  sleep 1
  # ARP requests from the namespace enter through the granted interface and cross fwe.
  ip netns exec "$GNS" ping -c 3 -i 0.2 -W 1 10.204.0.2 >/dev/null 2>&1 || true
  as_ent net show tap
  ip netns del "$GNS" 2>/dev/null || true
fi
printf '$ telvirt authority revoke ent1 --interface "tvg*"   (in use by network tap)\n'
"$TELVIRT" authority revoke ent1 --interface "tvg$$*" || echo "(refused while network tap uses it)"
as_ent net delete tap
as_ent vnf delete fwe
run authority revoke ent1 --interface "tvg$$*"

step "wasm VNFs fw1 and nat1: the CLI uploads their modules (verified, kept as sha256:<hex>)"
run vnf create -f examples/descriptors/fw1.yaml
run vnf create -f examples/descriptors/nat1.yaml
wait_phase fw1 Running
wait_phase nat1 Running
run vnf list
run module list

# Packets counted on the chain's last link (nat1.out -> sink.in).

step "A chain on the patch panel: generator -> fw1 (firewall) -> nat1 (NAT) -> latency sink"
run net create -f examples/descriptors/chain.yaml
for _ in $(seq 1 100); do [ "$(delivered)" -gt 0 ] 2>/dev/null && break; sleep 0.1; done
P0="$(delivered)"; T0="$(date +%s.%N)"
sleep 5   # the measurement window
P1="$(delivered)"; T1="$(date +%s.%N)"
awk -v p="$((P1 - P0))" -v a="$T0" -v b="$T1" \
  'BEGIN { printf "delivered %d packets in %.2f s: %.0f packets/s through fw1 and nat1\n", p, b - a, p / (b - a) }'
run net show chain

step "Change in place: vnf apply shows each field old -> new, takes labels, config and pinned cores, refuses the rest"
fw1_like "s/role: edge/role: core/" >"$DATA2/fw1-core.yaml"
run vnf apply -f "$DATA2/fw1-core.yaml" --dry-run
run vnf apply -f "$DATA2/fw1-core.yaml"
fw1_like "s/role: edge/role: core/; s/policy: dedicated, count: 1/policy: dedicated, count: 2/" >"$DATA2/fw1-two.yaml"
run vnf apply -f "$DATA2/fw1-two.yaml" || echo "(refused, exit $?: nothing changed)"

step "Upgrade fw1 between batches: another build of the firewall, maps kept, traffic keeps flowing"
perl -pe 's/"version":"1\.0\.0"/"version":"1.0.1"/' examples/vnfs/firewall.wasm >"$DATA2/firewall-v2.wasm"
run vnf upgrade fw1 --module "$DATA2/firewall-v2.wasm"
P2="$(delivered)"
for _ in $(seq 1 50); do [ "$(delivered)" -gt "$P2" ] && break; sleep 0.1; done
echo "still delivering: $P2 -> $(delivered) packets"

step "The firewall's own counters (from its manifest) next to the runtime's"
run vnf stats fw1

step "Metrics: what Prometheus scrapes, with admin's token (all families: docs/metrics.md)"
printf '$ curl --cacert tls/server.crt -H "Authorization: Bearer $TOKEN" %s/metrics | grep ...\n' "$SERVER2"
curl -fsS --cacert "$DATA2/tls/server.crt" -H "Authorization: Bearer $(sed -n 's/^token = "\(.*\)"$/\1/p' "$TELVIRT_CONFIG")" "$SERVER2/metrics" |
  grep -E '^telvirt_(vnf_packets_(received|forwarded)_total\{vnf="fw1"|vnf_packets_dropped_total\{vnf="fw1",reason="verdict"|link_packets_total|sink_latency_seconds_(count|sum)|host_cpus)' || true

step "latency chain: a probe of timestamped frames through the running chain (1 s at 20 kpps)"
run latency chain chain --rate 20000 --packets 20000

step "Capture: five frames fw1 sends to nat1, streamed as pcapng straight into tcpdump"
printf '$ telvirt net capture chain fw1.out -c 5 -w - | tcpdump -nn -r -\n'
"$TELVIRT" net capture chain fw1.out -c 5 -w - | tcpdump -nn -r - 2>/dev/null

step "A rule put into the running firewall's map (control plane, between batches): the chain's UDP service denied, then allowed again"
# Key: the service rule (any source) to 10.0.1.1 UDP port 9; value: action 0, drop.
RULE=000000000a0001010000000911000000
run vnf map-update fw1 rules --put "$RULE=00000000"
P3="$(delivered)"; sleep 1
echo "delivered while denied: $P3 -> $(delivered) packets"
run vnf map-update fw1 rules --delete "$RULE"
P4="$(delivered)"
for _ in $(seq 1 50); do [ "$(delivered)" -gt "$P4" ] && break; sleep 0.1; done
echo "delivered again: $P4 -> $(delivered) packets"
run vnf map-update fw1 rules --put "$RULE=0000" || echo "(refused, exit $?: a value of the wrong size changes nothing)"

step "Steering: endpoint fw stands for fw1 and a standby fw2; one atomic switch moves the traffic"
fw1_like "s/name: fw1/name: fw2/; s/policy: dedicated, count: 1/policy: shared, group: edge, count: 1/" \
  >"$DATA2/fw2.yaml"
run vnf create -f "$DATA2/fw2.yaml"
wait_phase fw2 Running
cat >"$DATA2/chain-steered.yaml" <<'YAML'
apiVersion: telvirt/v1
kind: Network
metadata: { name: chain }
spec:
  nodes:
    - { name: gen, kind: generator, rate_pps: 20000, size: 64, flows: 4 }
    - { name: sink, kind: sink }
  steering:
    - { name: fw, instances: [fw1, fw2] }
  links:
    - gen.out -> fw.in
    - fw.out -> nat1.in
    - nat1.out -> sink.in
YAML
run net apply -f "$DATA2/chain-steered.yaml"
# The endpoint's line of `net show`, once the data plane has placed it.
steering_line() {
  for _ in $(seq 1 50); do
    line="$("$TELVIRT" net show chain | grep '^steering' || true)"
    [ -n "$line" ] && { echo "$line"; return 0; }
    sleep 0.1
  done
  echo "demo: the steering endpoint was not placed" >&2; return 1
}
sleep 1
steering_line
run net steer chain fw fw2
sleep 1
steering_line
echo "(fw1's count stopped at the switch; fw2 carries the traffic)"

if [ "$(id -u)" -eq 0 ] && command -v iperf3 >/dev/null && command -v ping >/dev/null; then
  step "Real traffic: ping and iperf3 between two network namespaces through a wasm firewall"
  NS="tvdemo$$"
  cleanup_ns() {
    for side in a b; do
      ip netns pids "${NS}${side}" 2>/dev/null | xargs -r kill 2>/dev/null || true
      ip netns del "${NS}${side}" 2>/dev/null || true
    done
  }
  trap 'cleanup_ns; cleanup' EXIT
  for side in a b; do
    ip netns add "${NS}${side}"
    ip link add "tvd$$${side}" type veth peer name eth0 netns "${NS}${side}"
    ip -n "${NS}${side}" addr add "10.203.0.$([ $side = a ] && echo 1 || echo 2)/24" dev eth0
    ethtool -K "tvd$$${side}" tx off rx off tso off gso off gro off >/dev/null 2>&1 || true
    sysctl -qw "net.ipv6.conf.tvd$$${side}.disable_ipv6=1" || true
    ip link set "tvd$$${side}" up
    ip netns exec "${NS}${side}" ethtool -K eth0 tx off rx off tso off gso off gro off >/dev/null 2>&1 || true
    ip -n "${NS}${side}" link set eth0 up
    ip -n "${NS}${side}" link set lo up
  done
  # fw3: a bump in the wire (default action 0xffffffff: cross between its ports) with one rule,
  # deny TCP to 10.203.0.2 port 5202 (key: any source, dst, dport 0x1452, proto 6; action 0).
  fw1_like "s/name: fw1/name: fw3/; s/policy: dedicated, count: 1/policy: shared, group: edge, count: 1/; s/blob_hex: \"02000000\"/blob_hex: \"ffffffff000000000acb0002000014520600000000000000\"/" \
    >"$DATA2/fw3.yaml"
  run vnf create -f "$DATA2/fw3.yaml"
  wait_phase fw3 Running
  cat >"$DATA2/wire.yaml" <<YAML
apiVersion: telvirt/v1
kind: Network
metadata: { name: wire }
spec:
  links: [host:tvd$$a -> fw3.in, fw3.out -> host:tvd$$b, host:tvd$$b -> fw3.out, fw3.in -> host:tvd$$a]
YAML
  run net create -f "$DATA2/wire.yaml"
  sleep 1
  ip netns exec "${NS}a" ping -c 3 -i 0.2 10.203.0.2
  ip netns exec "${NS}b" iperf3 -s -p 5201 >/dev/null 2>&1 & SRV1=$!
  ip netns exec "${NS}b" iperf3 -s -p 5202 >/dev/null 2>&1 & SRV2=$!
  sleep 0.5
  ip netns exec "${NS}a" iperf3 -c 10.203.0.2 -p 5201 -t 2 | tail -n 4
  echo "$ iperf3 -c 10.203.0.2 -p 5202   (the rule denies it)"
  if ip netns exec "${NS}a" iperf3 -c 10.203.0.2 -p 5202 -t 1 --connect-timeout 1500; then
    echo "demo: TCP to port 5202 crossed the firewall although a rule denies it" >&2; exit 1
  fi
  echo "no connection, as the rule says"
  run vnf stats fw3
  kill "$SRV1" "$SRV2" 2>/dev/null || true; wait "$SRV1" "$SRV2" 2>/dev/null || true
  run net delete wire
  run vnf delete fw3
  cleanup_ns
else
  echo "(real-traffic step skipped: needs root, ping and iperf3)"
fi

step "A hostile module is refused by the verifier at upload; nothing is created, the other VNFs keep running"
perl -pe 's/"maps\.write",/             /' examples/vnfs/firewall.wasm >"$DATA2/hostile.wasm"
run wasm verify "$DATA2/hostile.wasm" || echo "(refused offline, with the node's verdict)"
fw1_like "s/name: fw1/name: bad1/; s|$PWD/examples/vnfs/firewall.wasm|$DATA2/hostile.wasm|; s/policy: dedicated, count: 1/policy: shared, group: edge, count: 1/" \
  >"$DATA2/bad1.yaml"
printf '$ telvirt vnf create -f bad1.yaml\n'
if "$TELVIRT" vnf create -f "$DATA2/bad1.yaml"; then
  echo "demo: a module the verifier refuses was accepted" >&2; exit 1
fi
echo "(refused at upload: no VNF bad1 exists)"
run vnf list
kill -TERM "$SERVER_PID"; wait "$SERVER_PID" || true
SERVER_PID=""

step "An agent on its own: telvirt controller and telvirt agent as two processes over HTTPS"
DATA3="$DATA/split"
mkdir -p "$DATA3"
CTL_CONFIG="$DATA3/ctl/client.toml"
"$TELVIRT" controller --data-dir "$DATA3/ctl" --listen 127.0.0.1:0 >>"$LOG" 2>&1 &
CTL_PID=$!
AGENT_PID=""
AGENT2_PID=""
stop_split() {
  for pid in "$AGENT2_PID" "$AGENT_PID" "$CTL_PID"; do
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; fi
  done
}
trap 'stop_split; cleanup' EXIT
for _ in $(seq 1 200); do
  [ -f "$CTL_CONFIG" ] && TELVIRT_CONFIG="$CTL_CONFIG" "$TELVIRT" host list >/dev/null 2>&1 && break
  sleep 0.05
done
CTL_URL="$(sed -n 's/^server = "\(.*\)"$/\1/p' "$CTL_CONFIG")"
echo "controller at $CTL_URL (no agent of its own: no hosts yet)"
TELVIRT_CONFIG="$CTL_CONFIG" run host credential demo-host --out "$DATA3/node.token"
printf '$ telvirt agent --controller %s --controller-ca ctl/tls/server.crt --token-file node.token --host-name demo-host --tunnel-address 127.0.0.1:0\n' "$CTL_URL"
"$TELVIRT" agent --controller "$CTL_URL" --controller-ca "$DATA3/ctl/tls/server.crt" --token-file "$DATA3/node.token" --host-name demo-host \
  --data-dir "$DATA3/agent" --image-cache "$IMAGE_CACHE" --heartbeat-interval-ms 200 --tunnel-address 127.0.0.1:0 >>"$LOG" 2>&1 &
AGENT_PID=$!
for _ in $(seq 1 200); do
  TELVIRT_CONFIG="$CTL_CONFIG" "$TELVIRT" host list 2>/dev/null | grep -q "demo-host.*Ready" && break
  sleep 0.05
done
TELVIRT_CONFIG="$CTL_CONFIG" run host list
fw1_like "s/name: fw1/name: fw5/; s/policy: dedicated, count: 1/policy: shared, group: edge, count: 1/" >"$DATA3/fw5.yaml"
TELVIRT_CONFIG="$CTL_CONFIG" run vnf create -f "$DATA3/fw5.yaml"
TELVIRT_CONFIG="$CTL_CONFIG" wait_phase fw5 Running
echo "(the agent fetched fw5's module from the controller; maps and counters are read on its host)"
TELVIRT_CONFIG="$CTL_CONFIG" run vnf maps fw5
echo "$ telvirt vnf list   (with the node credential instead of the admin's token)"
if TELVIRT_CONFIG="$CTL_CONFIG" "$TELVIRT" --token "$(cat "$DATA3/node.token")" vnf list; then
  echo "demo: a node credential acted as an authority" >&2; exit 1
fi
echo "(refused: a node credential acts only for its host's agent)"

step "A vm VNF moves live to a second agent: its guest's memory streams from one QEMU to the other"
if TELVIRT_CONFIG="$CTL_CONFIG" "$TELVIRT" host show demo-host -o json | grep -q '"vm"'; then
  TELVIRT_CONFIG="$CTL_CONFIG" "$TELVIRT" host credential demo-host2 --out "$DATA3/node2.token" >/dev/null
  printf '$ telvirt agent ... --host-name demo-host2 --tunnel-address 127.0.0.2:0   (a second host on this machine)\n'
  "$TELVIRT" agent --controller "$CTL_URL" --controller-ca "$DATA3/ctl/tls/server.crt" --token-file "$DATA3/node2.token" --host-name demo-host2 \
    --data-dir "$DATA3/agent2" --image-cache "$IMAGE_CACHE" --heartbeat-interval-ms 200 --tunnel-address 127.0.0.2:0 >>"$LOG" 2>&1 &
  AGENT2_PID=$!
  for _ in $(seq 1 200); do
    TELVIRT_CONFIG="$CTL_CONFIG" "$TELVIRT" host list 2>/dev/null | grep -q "^demo-host2  *Ready" && break
    sleep 0.05
  done
  TELVIRT_CONFIG="$CTL_CONFIG" "$TELVIRT" host cordon demo-host2 >/dev/null
  cat >"$DATA3/vm2.yaml" <<'YAML'
apiVersion: telvirt/v1
kind: Vnf
metadata: { name: vm2 }
spec:
  runtime: vm
  cpu: { policy: shared, group: edge, count: 1 }
  vm: { memory: 256MiB }
YAML
  TELVIRT_CONFIG="$CTL_CONFIG" run vnf create -f "$DATA3/vm2.yaml"
  TELVIRT_CONFIG="$CTL_CONFIG" wait_phase vm2 Running Failed
  [ "$phase" = Running ] || { TELVIRT_CONFIG="$CTL_CONFIG" "$TELVIRT" vnf show vm2; echo "demo: vm2 is $phase; see $LOG" >&2; exit 1; }
  TELVIRT_CONFIG="$CTL_CONFIG" "$TELVIRT" host uncordon demo-host2 >/dev/null
  echo "(vm2 booted on demo-host; demo-host2 holds its cores while the guest streams, then runs it)"
  TELVIRT_CONFIG="$CTL_CONFIG" run vnf migrate vm2 --to demo-host2
  # demo-host2's agent notes the arrival once the guest's agent answered there.
  for _ in $(seq 1 200); do
    TELVIRT_CONFIG="$CTL_CONFIG" "$TELVIRT" vnf show vm2 | grep -q "arrived by a migration stream" && break
    sleep 0.1
  done
  TELVIRT_CONFIG="$CTL_CONFIG" "$TELVIRT" vnf events vm2 | grep -E "moving to|resumed on|moved from|arrived"
  echo "(its traffic went to demo-host2 as the guest resumed there, before it answered and the move switched;"
  echo " the guest was not booted again: its uptime counts from its boot on demo-host)"
  TELVIRT_CONFIG="$CTL_CONFIG" run vnf show vm2
  TELVIRT_CONFIG="$CTL_CONFIG" run vnf delete vm2
  kill -TERM "$AGENT2_PID"; wait "$AGENT2_PID" || true
  AGENT2_PID=""
else
  echo "(skipped: the vm runtime is not available on this host; $LOG says why)"
fi

kill -TERM "$AGENT_PID"; wait "$AGENT_PID" || true
AGENT_PID=""
for _ in $(seq 1 100); do
  TELVIRT_CONFIG="$CTL_CONFIG" "$TELVIRT" host list 2>/dev/null | grep -q "^demo-host  *NotReady" && break
  sleep 0.1
done
echo "(the agent stopped: its host turns NotReady when its heartbeat lease lapses; fw5 shows Unknown)"
TELVIRT_CONFIG="$CTL_CONFIG" run host list
TELVIRT_CONFIG="$CTL_CONFIG" run vnf list
stop_split
CTL_PID=""

step "A cluster on this machine: etcd, two controllers, four hosts (network namespaces), a chain across two of them, a NAT pair under a TCP flow"
if [ "$(id -u)" -eq 0 ]; then
  CL="$DATA3/cluster"
  CL_CONFIG="$CL/control/client.toml"
  cl() { printf '$ telvirt %s\n' "$*"; TELVIRT_CONFIG="$CL_CONFIG" "$TELVIRT" "$@"; }
  . scripts/demo-pair.sh
  trap 'pair_demo_cleanup; "$TELVIRT" cluster down --dir "$CL" >/dev/null 2>&1; cleanup' EXIT
  # The agents' async control threads at SCHED_FIFO 2: a wasm move's freeze waits for them,
  # and here they share two cores with the data plane and an iperf3 flow (ADR 065).
  run cluster up --hosts 4 --controllers 2 --control-priority 2 --dir "$CL"
  cl host list
  # fwa on h1, fwb on h2, fwc on h3: the other hosts cordoned while each is placed.
  for vnf in "fwa h1" "fwb h2" "fwc h3"; do
    set -- $vnf
    fw1_like "s/name: fw1/name: $1/; s/policy: dedicated, count: 1/policy: shared, group: edge, count: 1/" >"$CL/$1.yaml"
    for h in h1 h2 h3 h4; do
      if [ "$h" = "$2" ]; then cl host uncordon "$h" >/dev/null; else cl host cordon "$h" >/dev/null; fi
    done
    cl vnf create -f "$CL/$1.yaml"
    TELVIRT_CONFIG="$CL_CONFIG" wait_phase "$1" Running
  done
  for h in h1 h2 h3 h4; do cl host uncordon "$h" >/dev/null; done
  cl vnf list
  cat >"$CL/span.yaml" <<'YAML'
apiVersion: telvirt/v1
kind: Network
metadata: { name: span }
spec:
  nodes:
    - { name: gen, kind: generator, rate_pps: 5000 }
    - { name: sink, kind: sink }
  links: [ gen.out -> fwa.in, fwa.out -> fwb.in, fwb.out -> sink.in ]
YAML
  cl net create -f "$CL/span.yaml"
  sleep 2
  echo "(fwa runs on h1 and fwb on h2: the link between them crosses a VXLAN tunnel, one VNI per link)"
  cl net show span
  BR="$(tr -d ' \n' <"$CL/cluster.json" | grep -o '"bridge":"[^"]*"' | cut -d'"' -f4)"
  echo "$ tcpdump -i $BR -nn -c 2 udp port 4789   (the tunnel between the hosts, as tcpdump decodes it)"
  timeout 5 tcpdump -i "$BR" -nn -c 2 udp port 4789 2>/dev/null || true
  echo "(fwc moves to h1 with its maps: h1 holds it beside h3 until the switch)"
  cl vnf migrate fwc --to h1
  echo "(fwa moves to h3, the generator with it: h1 leaves the network and keeps its final counts there, which net show still shows)"
  cl vnf migrate fwa --to h3
  for _ in $(seq 1 50); do
    TELVIRT_CONFIG="$CL_CONFIG" "$TELVIRT" net show span 2>/dev/null | grep -q "which the network left" && break
    sleep 0.1
  done
  cl net show span
  LEADER_URL="$(sed -n 's/^server = "\(.*\)"$/\1/p' "$CL_CONFIG")"
  LEADER_PID="$(tr -d ' \n' <"$CL/cluster.json" | grep -o "\"url\":\"$LEADER_URL\",\"pid\":[0-9]*" | grep -o '[0-9]*$')"
  echo "$ kill -9 <the leading controller, $LEADER_URL>"
  kill -9 "$LEADER_PID"
  for _ in $(seq 1 100); do
    [ "$(sed -n 's/^server = "\(.*\)"$/\1/p' "$CL_CONFIG")" != "$LEADER_URL" ] && break
    sleep 0.05
  done
  echo "(the other controller leads now, and wrote the client config: nothing acknowledged was lost)"
  cl vnf list
  H2_PID="$(tr -d ' \n' <"$CL/cluster.json" | grep -o '"name":"h2"[^}]*"pid":[0-9]*' | grep -o '[0-9]*$')"
  echo "$ kill -9 <the agent of h2, where fwb (the middle of the chain) runs>"
  kill -9 "$H2_PID"
  for _ in $(seq 1 100); do
    TELVIRT_CONFIG="$CL_CONFIG" "$TELVIRT" host list 2>/dev/null | grep -q "^h2 *NotReady" && break
    sleep 0.1
  done
  echo "(h2's lease lapsed: it is NotReady and fwb is Unknown, with an event saying why)"
  cl host list
  TELVIRT_CONFIG="$CL_CONFIG" wait_phase fwb Unknown
  echo "(5 s later (--heal-after-ms) the healer places fwb on a Ready host; the chain follows it)"
  for _ in $(seq 1 300); do
    TELVIRT_CONFIG="$CL_CONFIG" "$TELVIRT" vnf show fwb -o json 2>/dev/null | grep -q '"host": "h[134]"' && break
    sleep 0.1
  done
  TELVIRT_CONFIG="$CL_CONFIG" wait_phase fwb Running
  cl vnf events fwb
  sleep 2
  cl net show span
  echo "(an active-standby NAT: the active's maps stream to its standby on another host; a TCP flow through it survives SIGKILL of the active's agent)"
  nat_pair_demo
  run cluster down --dir "$CL" --purge
  trap cleanup EXIT
else
  echo "(skipped: cluster up creates network namespaces, which needs root)"
fi
echo "demo finished"
