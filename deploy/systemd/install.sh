#!/bin/sh
# Install fdbroker's systemd units on this host (docs/deploy.md, "Under systemd").
#
#   deploy/systemd/install.sh                 # as root, after `pip install fdbroker` (into a venv or not)
#   DESTDIR=/srv/image deploy/systemd/install.sh   # into another root (an image being built; nothing is run
#                                                  # there except systemd-sysusers --root)
#
# Environment:
#   FDBROKER  the installed fdbroker program (default: `command -v fdbroker`; with DESTDIR, a path inside it).
#             The units run /usr/local/bin/fdbroker; unless that is FDBROKER already, it becomes a symbolic
#             link to FDBROKER. A venv's console script runs its venv's Python from anywhere, so link that.
#   DESTDIR   the root to install into (default: /).
#
# What it does: /usr/local/bin/fdbroker (link), the unit files in /etc/systemd/system, the system user and
# group fdbroker (/etc/sysusers.d/fdbroker.conf, created with systemd-sysusers), /etc/fdbroker/policy.toml
# (the example, only if there is none) and /etc/fdbroker/put/. On a running systemd (no DESTDIR) it then runs
# `systemctl daemon-reload`. It enables and starts nothing: `systemctl enable --now fdbroker.service`.
# Running it again upgrades the units and keeps your policy.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
etc=$(dirname "$here")/etc
root=${DESTDIR:-}
bin=/usr/local/bin/fdbroker

die() {
	echo "install.sh: $*" >&2
	exit 1
}

exe=${FDBROKER:-$(command -v fdbroker || true)}
[ -n "$exe" ] || die "no fdbroker on PATH; install it first (python3 -m venv /opt/fdbroker && /opt/fdbroker/bin/pip install fdbroker) or set FDBROKER=/path/to/fdbroker"
case $exe in /*) ;; *) die "FDBROKER must be an absolute path, not $exe" ;; esac
[ -x "$root$exe" ] || die "$root$exe is not an executable"
"$root$exe" --help >/dev/null 2>&1 || [ -n "$root" ] || die "$exe --help fails: is it fdbroker?"

if [ "$exe" != "$bin" ]; then
	# Replace our own link, never a program someone installed there (pip as root puts its script there).
	if [ -e "$root$bin" ] && [ ! -L "$root$bin" ]; then
		die "$root$bin exists and is not a link (installed by pip?); run with FDBROKER=$bin, or remove it"
	fi
	install -d -m 0755 "$root/usr/local/bin"
	ln -sfn "$exe" "$root$bin"
fi

install -d -m 0755 "$root/etc/systemd/system" "$root/etc/sysusers.d" "$root/etc/fdbroker" "$root/etc/fdbroker/put"
for unit in fdbroker.service fdbroker-put@.service fdbroker-put@.socket fdbroker-hold@.service; do
	install -m 0644 "$here/$unit" "$root/etc/systemd/system/$unit"
done
install -m 0644 "$here/fdbroker.sysusers.conf" "$root/etc/sysusers.d/fdbroker.conf"
[ -e "$root/etc/fdbroker/policy.toml" ] || install -m 0644 "$etc/fdbroker/policy.toml" "$root/etc/fdbroker/policy.toml"

if [ -n "$root" ]; then
	systemd-sysusers --root="$root" "$root/etc/sysusers.d/fdbroker.conf"
else
	systemd-sysusers /etc/sysusers.d/fdbroker.conf
	if [ -d /run/systemd/system ]; then
		systemctl daemon-reload
	fi
fi
echo "installed; start the broker with: systemctl enable --now fdbroker.service"
