#!/usr/bin/env bash
# Installs the Debian 12 packages kemi-o365 needs, only those missing (idempotent), as root.
# --runtime: only what the SBC itself runs on (`make install`), not the lab's SIPp, tshark, baresip.
set -euo pipefail

PACKAGES=(
  kamailio kamailio-python3-modules kamailio-tls-modules kamailio-extra-modules
  rtpengine-daemon python3 python3-venv openssl iproute2 make
)
if [[ "${1:-}" != "--runtime" ]]; then
  PACKAGES+=(sip-tester tshark baresip)
fi

missing=()
for p in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "setup: Debian packages present (${#PACKAGES[@]} checked)"
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "setup: missing Debian packages: ${missing[*]}; run as root (apt-get install)" >&2
  exit 1
fi

echo "setup: installing ${missing[*]} ..."
# The packaged kamailio and rtpengine services would grab 5060/2223; the lab starts its own.
made_policy=0
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  made_policy=1
fi
trap '[[ $made_policy -eq 1 ]] && rm -f /usr/sbin/policy-rc.d' EXIT
export DEBIAN_FRONTEND=noninteractive
echo "setup: apt-get update (package lists; usually under a minute) ..."
apt-get update -qq
echo "setup: apt-get install ${#missing[@]} package(s) (a few minutes on a fresh machine) ..."
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: installed ${#missing[@]} Debian package(s)"
