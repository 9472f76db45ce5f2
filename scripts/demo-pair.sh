# Sourced by demo.sh in its cluster step (root only): an iperf3 TCP flow between two network
# namespaces through an active-standby NAT whose active's agent is killed with SIGKILL, then
# through a NAT without a standby that moves to another host (`vnf migrate`).
#
# Needs: TELVIRT, CL (the cluster's dir), CL_CONFIG, the functions cl and wait_phase, a cluster
# with a Ready host that holds neither of natp's instances, iperf3 and ethtool.

# The host of natp's instance in role $1 (active or standby).
pair_host() {
  TELVIRT_CONFIG="$CL_CONFIG" "$TELVIRT" vnf show natp -o json | tr -d ' \n' |
    grep -o "\"role\":\"$1\",\"host\":\"h[0-9]*\"" | grep -o 'h[0-9]*"$' | tr -d '"'
}

# The value of field $2 of host $1 in cluster.json.
cluster_field() {
  tr -d ' \n' <"$CL/cluster.json" | grep -o "\"name\":\"$1\"[^}]*" | grep -o "\"$2\":\"*[^,\"]*" | head -n 1 |
    sed 's/.*:"*//'
}

nat_pair_demo() {
  local sed_pair ns_c ns_s vc vs act sby free ns_free mac_c mac_s out srv kill_at
  sed_pair='s/name: nat1/name: natp/; s/cpu: { policy: shared, group: edge, count: 1 }/cpu: { policy: shared, group: edge, count: 1 }\n  redundancy: active-standby/; s|\.\./vnfs/nat.wasm|'"$PWD"'/examples/vnfs/nat.wasm|'
  sed "$sed_pair" examples/descriptors/nat1.yaml >"$CL/natp.yaml"
  cl vnf create -f "$CL/natp.yaml"
  TELVIRT_CONFIG="$CL_CONFIG" wait_phase natp Running
  act="$(pair_host active)"; sby="$(pair_host standby)"
  free=""
  for h in $(TELVIRT_CONFIG="$CL_CONFIG" "$TELVIRT" host list | awk '$2 ~ /^Ready/ {print $1}'); do
    [ "$h" != "$act" ] && [ "$h" != "$sby" ] && { free="$h"; break; }
  done
  [ -n "$free" ] || { echo "demo: no Ready host is left for the client and server" >&2; return 1; }
  ns_free="$(cluster_field "$free" namespace)"
  echo "(natp is active on $act, its standby on $sby; a client and a server namespace hang off $free, as off a switch)"
  # Client 10.204.0.1 and server 192.0.2.2; the NAT's public address is 192.0.2.1 (its default).
  # The NAT forwards IPv4 TCP/UDP only (no ARP): each side knows the other's MAC statically.
  ns_c="tvpc$$"; ns_s="tvps$$"; vc="tvc$$"; vs="tvs$$"
  PAIR_NS="$ns_c $ns_s"
  NS_C="$ns_c"; NS_S="$ns_s"; VC="$vc"; VS="$vs"; FREE="$free"
  for side in c s; do
    local ns="tvp$side$$" veth="tv$side$$"
    ip netns add "$ns"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" netns "$ns_free"
    for where in "$ns" "$ns_free"; do
      local dev; [ "$where" = "$ns" ] && dev=eth0 || dev="$veth"
      # 1400: the frames cross a VXLAN tunnel between the hosts (50 bytes more) on a 1500 MTU.
      ip -n "$where" link set "$dev" mtu 1400 up
      ip netns exec "$where" ethtool -K "$dev" tx off rx off tso off gso off gro off >/dev/null 2>&1 || true
      ip netns exec "$where" sysctl -qw "net.ipv6.conf.$dev.disable_ipv6=1" || true
    done
    ip -n "$ns" link set lo up
  done
  ip -n "$ns_c" addr add 10.204.0.1/24 dev eth0
  ip -n "$ns_s" addr add 192.0.2.2/24 dev eth0
  mac_c="$(ip -n "$ns_c" -o link show eth0 | grep -o 'link/ether [0-9a-f:]*' | cut -d' ' -f2)"
  mac_s="$(ip -n "$ns_s" -o link show eth0 | grep -o 'link/ether [0-9a-f:]*' | cut -d' ' -f2)"
  ip -n "$ns_c" route add 192.0.2.0/24 dev eth0
  ip -n "$ns_c" neigh add 192.0.2.2 lladdr "$mac_s" dev eth0 nud permanent
  ip -n "$ns_s" neigh add 192.0.2.1 lladdr "$mac_c" dev eth0 nud permanent
  cat >"$CL/edge.yaml" <<YAML
apiVersion: telvirt/v1
kind: Network
metadata: { name: edge }
spec:
  links: [host:$vc@$free -> natp.in, natp.out -> host:$vs@$free, host:$vs@$free -> natp.out, natp.in -> host:$vc@$free]
YAML
  cl net create -f "$CL/edge.yaml"
  ip netns exec "$ns_s" iperf3 -s -p 5201 >/dev/null 2>&1 & srv=$!
  out="$CL/iperf3.txt"
  for _ in $(seq 1 100); do
    ip netns exec "$ns_c" iperf3 -c 192.0.2.2 -p 5201 -t 1 >/dev/null 2>&1 && break
    sleep 0.2
  done
  echo "$ iperf3 -c 192.0.2.2 -t 8 -i 0.1   (client namespace, through natp; the active's agent dies at 3 s)"
  ip netns exec "$ns_c" iperf3 -c 192.0.2.2 -p 5201 -t 8 -i 0.1 --forceflush >"$out" 2>&1 &
  local client=$!
  sleep 3
  echo "$ kill -9 <the agent of $act, where natp is active>"
  kill_at="$(date +%s%N)"
  kill -9 "$(cluster_field "$act" pid)"
  for _ in $(seq 1 300); do
    [ "$(pair_host active)" = "$sby" ] && break
    sleep 0.01
  done
  echo "(the standby on $sby is the active after $(( ($(date +%s%N) - kill_at) / 1000000 )) ms, as its API says; the flow goes on)"
  wait "$client" || { cat "$out"; echo "demo: the TCP flow through natp broke" >&2; return 1; }
  grep -E '^\[ *[0-9]+\] +[0-9.]+-[0-9.]+ +sec' "$out" | sed -n '26,40p'
  tail -n 4 "$out"
  flow_outage "$out"
  kill "$srv" 2>/dev/null || true; wait "$srv" 2>/dev/null || true
  TELVIRT_CONFIG="$CL_CONFIG" wait_phase natp Running
  cl vnf show natp
  cl vnf maps natp
  cl vnf events natp
  cl net delete edge
  echo "(a NAT without a standby moves instead: its maps stream to the destination, then the traffic)"
  nat_move_demo
  pair_demo_cleanup
}

# The outage as the iperf3 flow in file $1 saw it: the longest run of 100 ms intervals that
# moved no data.
flow_outage() {
  awk '/^\[ *[0-9]+\] +[0-9.]+-[0-9.]+ +sec/ && !/sender|receiver/ {
      split($3, t, "-")
      if (/ 0.00 bits\/sec/) { if (run == 0) from = t[1]; run++; if (run > best) { best = run; at = from } } else run = 0
    } END {
      if (best == 0) print "outage: no 100 ms interval without data (the gap was shorter than iperf3'"'"'s resolution; the Retr column shows the segments TCP resent)"
      else printf "outage: %d ms without data from %s s on (the longest gap; TCP resends after its retransmission timer, so its gap is longer than the data path'"'"'s)\n", best * 100, at }' "$1"
}

pair_demo_cleanup() {
  for ns in ${PAIR_NS:-}; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  PAIR_NS=""
}

# natm: a NAT without a standby, moved to another host while a TCP flow runs through it (the
# namespaces of nat_pair_demo, kept by it in NS_C, NS_S, VC, VS and FREE).
nat_move_demo() {
  local from to out srv client
  sed 's/name: nat1/name: natm/; s|\.\./vnfs/nat.wasm|'"$PWD"'/examples/vnfs/nat.wasm|' examples/descriptors/nat1.yaml >"$CL/natm.yaml"
  cl vnf create -f "$CL/natm.yaml"
  TELVIRT_CONFIG="$CL_CONFIG" wait_phase natm Running
  from="$(TELVIRT_CONFIG="$CL_CONFIG" "$TELVIRT" vnf show natm -o json | tr -d ' \n' | grep -o '"host":"h[0-9]*"' | head -n 1 | cut -d'"' -f4)"
  to=""
  for h in $(TELVIRT_CONFIG="$CL_CONFIG" "$TELVIRT" host list | awk '$2 == "Ready" {print $1}'); do
    [ "$h" != "$from" ] && { to="$h"; break; }
  done
  [ -n "$to" ] || { echo "(no other Ready host to move natm to)"; return 0; }
  cat >"$CL/edge2.yaml" <<YAML
apiVersion: telvirt/v1
kind: Network
metadata: { name: edge2 }
spec:
  links: [host:$VC@$FREE -> natm.in, natm.out -> host:$VS@$FREE, host:$VS@$FREE -> natm.out, natm.in -> host:$VC@$FREE]
YAML
  cl net create -f "$CL/edge2.yaml"
  ip netns exec "$NS_S" iperf3 -s -p 5202 >/dev/null 2>&1 & srv=$!
  for _ in $(seq 1 100); do
    ip netns exec "$NS_C" iperf3 -c 192.0.2.2 -p 5202 -t 1 >/dev/null 2>&1 && break
    sleep 0.2
  done
  out="$CL/iperf3-move.txt"
  echo "$ iperf3 -c 192.0.2.2 -t 8 -i 0.1   (through natm on $from; it moves to $to at 3 s)"
  ip netns exec "$NS_C" iperf3 -c 192.0.2.2 -p 5202 -t 8 -i 0.1 --forceflush >"$out" 2>&1 &
  client=$!
  sleep 3
  cl vnf migrate natm --to "$to"
  wait "$client" || { cat "$out"; echo "demo: the TCP flow through natm broke" >&2; return 1; }
  tail -n 4 "$out"
  flow_outage "$out"
  kill "$srv" 2>/dev/null || true; wait "$srv" 2>/dev/null || true
  cl vnf events natm
  cl net delete edge2
}
