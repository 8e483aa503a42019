#!/usr/bin/env bash
# Install what Neti's tests and lab need on a fresh Debian machine. Idempotent: installs only
# what is missing, so a second run costs a few dpkg queries.
set -euo pipefail

# wireguard-tools (wg) drives WireGuard interfaces; wireguard-go is the userspace
# implementation used where the kernel has no WireGuard module (this lab's kernel among them);
# tcpdump shows what crosses the lab's links.
PKGS=(zookeeper libnetty-java default-jre-headless iptables ipset nftables conntrack iproute2 kmod procps
      ruby docker-compose gcc make wireguard-tools wireguard-go tcpdump)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
