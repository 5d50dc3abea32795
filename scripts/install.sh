#!/usr/bin/env bash
# `make install`: kemi-o365 as two systemd services. Reads DESTDIR, PREFIX, SYSCONFDIR, SYSTEMDDIR.
# Never starts or enables anything; runs `systemctl daemon-reload` only when systemd is running.
set -euo pipefail
cd "$(dirname "$0")/.."

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/kemi-o365}
SYSCONFDIR=${SYSCONFDIR:-/etc/kemi-o365}
SYSTEMDDIR=${SYSTEMDDIR:-/etc/systemd/system}
root="$DESTDIR$PREFIX"

echo "install: venv $root/venv from /usr/bin/python3 (Kamailio embeds it) ..."
/usr/bin/python3 -m venv --clear "$root/venv"
echo "install: kemi-o365 and its runtime dependencies into it (pip; up to a minute) ..."
"$root/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-warn-script-location . 2>&1 \
  | grep -v "^WARNING: Location .* is ignored" || true
"$root/venv/bin/python" -c 'import kemi_o365.cli' # fails the install if pip did not install it
if [[ -n "$DESTDIR" ]]; then
  # The venv is staged under DESTDIR; its scripts must name where it will live.
  grep -lIr --null "$DESTDIR" "$root/venv/bin" | xargs -0 -r sed -i "s|$DESTDIR$PREFIX|$PREFIX|g"
fi
install -d "$root/kamailio"
install -m 0644 kamailio/kamailio.cfg kamailio/sbc.py "$root/kamailio/"
install -m 0644 README.md "$root/README.md"

echo "install: systemd units into $DESTDIR$SYSTEMDDIR"
install -d "$DESTDIR$SYSTEMDDIR"
for unit in packaging/systemd/*.service; do
  sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@SYSCONFDIR@|$SYSCONFDIR|g" "$unit" > "$DESTDIR$SYSTEMDDIR/$(basename "$unit")"
  chmod 0644 "$DESTDIR$SYSTEMDDIR/$(basename "$unit")"
done

install -d -m 0755 "$DESTDIR$SYSCONFDIR"
if [[ -e "$DESTDIR$SYSCONFDIR/policy.yaml" ]]; then
  echo "install: $SYSCONFDIR/policy.yaml exists, left as it is"
else
  install -m 0644 examples/teams.yaml "$DESTDIR$SYSCONFDIR/policy.yaml"
  echo "install: example policy $SYSCONFDIR/policy.yaml (Teams Direct Routing): edit it for this site"
fi

if [[ -z "$DESTDIR" && -d /run/systemd/system ]]; then
  systemctl daemon-reload
  # Debian's packaged services would take 5060 and rtpengine's control port at boot.
  systemctl disable --now kamailio.service rtpengine-daemon.service 2>/dev/null || true
  echo "install: done. Next: edit $SYSCONFDIR/policy.yaml, then"
  echo "  systemctl enable --now kemi-o365.service    (starts kemi-o365-rtpengine.service too)"
else
  echo "install: done; systemd is not running here${DESTDIR:+ (staged under $DESTDIR)}. On the target, after editing"
  echo "  $SYSCONFDIR/policy.yaml: systemctl daemon-reload && systemctl enable --now kemi-o365.service"
fi
