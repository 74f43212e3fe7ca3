#!/usr/bin/env bash
# Regenerates the policy reader's fixtures as this machine's tools print them (nft 1.0.6,
# iptables 1.8.9): each FILE.nft (loaded with nft) or FILE.iptables (loaded with
# iptables-nft-restore) goes into a scratch network namespace, then FILE.json is
# `nft -j list ruleset`, and for iptables files FILE.save is `iptables-nft-save`. Run as root.
set -euo pipefail
cd "$(dirname "$0")"
ns="xbr-capture-$$"
trap 'ip netns del "$ns" 2>/dev/null || true' EXIT
for source in *.nft *.iptables; do
  ip netns add "$ns"
  case "$source" in
    *.nft) nsenter --net="/run/netns/$ns" nft -f "$source" ;;
    *.iptables)
      nsenter --net="/run/netns/$ns" iptables-nft-restore < "$source"
      nsenter --net="/run/netns/$ns" iptables-nft-save | grep -v '^#' > "${source%.*}.save" ;;
  esac
  nsenter --net="/run/netns/$ns" nft -j list ruleset | python3 -m json.tool > "${source%.*}.json"
  ip netns del "$ns"
done
