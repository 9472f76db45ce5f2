#!/bin/bash
# Busy against adaptive polling in one `telvirt serve` (examples/inventory/dev2.yaml), three
# alternating rounds of `telvirt latency chain` at 100 kpps (RATE, PACKETS to change):
#   same-worker: fwb (busy, cpu0) and fwa (poll: adaptive, cpu1), each alone in a network
#                gen -> fw -> sink; the probe's generator and sink run on cpu0's worker.
#   one-core:    one firewall pinned to cpu1, re-created each round as busy / adaptive.
# Run from the repository after `cargo build --release -p telvirt`. Prints one line per probe.
set -euo pipefail
T=${TELVIRT:-$PWD/target/release/telvirt}
REPO=$PWD
W=$(mktemp -d /tmp/tv-poll.XXXXXX)
RATE=${RATE:-100000}
PACKETS=${PACKETS:-100000}
cd "$W"
$T serve --listen 127.0.0.1:0 --data-dir "$W/d" --inventory "$REPO/examples/inventory/dev2.yaml" > serve.log 2>&1 &
SERVE=$!
trap 'kill $SERVE; rm -rf "$W"' EXIT
export TELVIRT_CONFIG=$W/d/client.toml
for _ in $(seq 1 100); do [ -f d/client.toml ] && $T vnf list >/dev/null 2>&1 && break; sleep 0.1; done
phase() { $T vnf show "$1" -o json | python3 -c 'import json,sys;print(json.load(sys.stdin)["phase"])'; }
running() { for _ in $(seq 1 100); do [ "$(phase "$1")" = Running ] && return; sleep 0.2; done; echo "$1 never ran" >&2; exit 1; }
gone() { for _ in $(seq 1 100); do $T vnf show "$1" >/dev/null 2>&1 || return 0; sleep 0.2; done; }
probe() {
  $T latency chain "$1" --rate "$RATE" --packets "$PACKETS" -o json | python3 -c "
import json,sys;d=json.load(sys.stdin)
print('$2', 'p50 %.2f p99 %.2f p99.9 %.2f max %.1f lost %d' % (d['p50_us'],d['p99_us'],d['p999_us'],d['max_us'],d['lost']))"
}
fw() { sed "s/name: fw1/name: $1/; s#\.\./vnfs/#$REPO/examples/vnfs/#; $2" "$REPO/examples/descriptors/fw1.yaml"; }
net() { printf "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: %s }\nspec:\n  nodes:\n    - { name: g%s, kind: generator, rate_pps: 1000 }\n    - { name: s%s, kind: sink }\n  links:\n    - g%s.out -> %s.in\n    - %s.out -> s%s.in\n" "$1" "$1" "$1" "$1" "$2" "$2" "$1"; }

fw fwb "" > fwb.yaml
fw fwa "s/engine: cranelift/engine: cranelift\n    poll: adaptive/" > fwa.yaml
$T vnf create -f fwb.yaml > /dev/null; running fwb
$T vnf create -f fwa.yaml > /dev/null; running fwa
net nb fwb > nb.yaml; net na fwa > na.yaml
$T net create -f nb.yaml > /dev/null; $T net create -f na.yaml > /dev/null
sleep 1
for r in 1 2 3; do probe nb "same-worker busy r$r"; probe na "same-worker adaptive r$r"; done
$T net delete nb > /dev/null; $T net delete na > /dev/null
$T vnf delete fwb > /dev/null; $T vnf delete fwa > /dev/null; gone fwb; gone fwa

fw fw "s/policy: dedicated, count: 1/policy: pinned, cores: [1]/" > busy.yaml
sed 's/engine: cranelift/engine: cranelift\n    poll: adaptive/' busy.yaml > adaptive.yaml
net n fw > n.yaml
for r in 1 2 3; do
  for mode in busy adaptive; do
    $T vnf create -f $mode.yaml > /dev/null; running fw
    $T net create -f n.yaml > /dev/null; sleep 1
    probe n "one-core $mode r$r"
    $T net delete n > /dev/null; $T vnf delete fw > /dev/null; gone fw
  done
done
