#!/bin/bash
# Per-packet cost of xbr's programs, two xbr binaries side by side (OLD=... NEW=...), in
# interleaved rounds on a lab of namespaces (`xbr lab`, namespaces ppl-*; run as root):
# - published port: kernel BPF run-time stats of uplink_ingress and port_ingress during a 3 s
#   iperf3 TCP stream from the outside namespace through the published port (real traffic);
# - east-west redirect and a frame to the outside (no connection): BPF_PROG_TEST_RUN repeat.
set -u
: "${OLD:?the xbr binary to compare against}" "${NEW:?the xbr binary to measure}"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd); WORK=$(mktemp -d)
# On any exit: the stats switch off, the attachment and the lab go.
trap 'sysctl -qw kernel.bpf_stats_enabled=0; $NEW -n ppl-host detach br0 --pin-root /sys/fs/bpf/ppbench >/dev/null 2>&1; $NEW lab down $HERE/per-packet-lab.toml >/dev/null; rm -rf "$WORK"' EXIT
ROOT=/sys/fs/bpf/ppbench; H=ppl-host; N=${ROUNDS:-5}; REP=${REP:-2000000}
$NEW lab up $HERE/per-packet-lab.toml >/dev/null
J() { ip -n $H -j link show $1 | python3 -c "import json,sys;print(json.load(sys.stdin)[0][\"$2\"])"; }
OUTMAC=$(ip -n ppl-out -j link show eth0 | python3 -c 'import json,sys;print(json.load(sys.stdin)[0]["address"])')
python3 $HERE/per-packet-frames.py $OUTMAC $(J uplink0 address) 40000 $(J br0 address) $(J uplink0 ifindex) $(J veth-a ifindex) $WORK
run() { nsenter --net=/run/netns/$H bpftool prog run pinned $1 data_in $2 ctx_in $3 repeat $REP 2>&1 | python3 -c '
import sys,re; t=sys.stdin.read(); r=re.search(r"Return value: (\d+), duration \(average\): (\d+)ns",t); print(r.group(1),r.group(2)) if r else print("ERR",t.replace("\n"," "))'; }
prog() { nsenter --net=/run/netns/$H bpftool prog show pinned $1 -j | python3 -c 'import json,sys; p=json.load(sys.stdin); print(p.get("run_time_ns",0), p.get("run_cnt",0))'; }
sysctl -qw kernel.bpf_stats_enabled=1
for round in $(seq $N); do
 for which in old new; do
  X=$OLD; [ $which = new ] && X=$NEW
  $X -n $H attach br0 --uplink uplink0 --pin-root $ROOT >/dev/null
  $X -n $H publish br0 8080:10.77.0.2:80 --pin-root $ROOT >/dev/null
  D=$(ls -d $ROOT/netns-*/br0)
  ip netns exec ppl-a iperf3 -s -1 -p 80 >/dev/null 2>&1 & SERVER=$!
  sleep 0.5
  read ut0 uc0 < <(prog $D/uplink_ingress); read pt0 pc0 < <(prog $D/port_ingress)
  ip netns exec ppl-out iperf3 -c 10.78.0.1 -p 8080 -t 3 -J > $WORK/iperf.json 2>&1
  read ut1 uc1 < <(prog $D/uplink_ingress); read pt1 pc1 < <(prog $D/port_ingress)
  wait $SERVER 2>/dev/null
  GBPS=$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"]/1e9,2))' $WORK/iperf.json 2>/dev/null)
  EST=$($X -n $H status --pin-root $ROOT --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["bridges"][0]["nat"]["events"]["established"])')
  E=$(run $D/port_ingress $WORK/eastwest.bin $WORK/ctx_port.bin); G=$(run $D/port_ingress $WORK/egress.bin $WORK/ctx_port.bin)
  echo "round $round $which published: uplink $(( (ut1-ut0)/(uc1-uc0) )) ns x $((uc1-uc0)) runs, port $(( (pt1-pt0)/(pc1-pc0) )) ns x $((pc1-pc0)) runs, $GBPS Gbit/s, established $EST | east-west [$E] | egress-no-connection [$G]"
  # Each sample must have taken the path it is labelled with: the stream through xbr's NAT
  # (connections established in its table), the east-west frame redirected (TC_ACT_REDIRECT),
  # the frame to the outside handed to the bridge (TC_ACT_OK).
  if [ "${EST:-0}" -lt 1 ] || [ "${E%% *}" != 7 ] || [ "${G%% *}" != 0 ]; then
    echo "round $round $which: a sample did not take its path; not a number" >&2; exit 1
  fi
  $X -n $H detach br0 --pin-root $ROOT >/dev/null
 done
done
