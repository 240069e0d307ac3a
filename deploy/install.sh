#!/usr/bin/env bash
# Install dedupd as a hardened systemd service. Idempotent: run it again after editing
# /etc/dedupd/dedupd.yaml; it refreshes the paths drop-in and checks the dedupd user can
# work on the configured roots, printing the exact commands to run when it cannot.
#   deploy/install.sh [--dry-run]
# Exit: 0 ready to start; 1 installed, but the configured paths are not usable yet (it says
# what to run); 2 cannot install; 78 the configuration is invalid.
# Environment: DESTDIR (default empty: the real system), PREFIX (default /opt/dedupd),
# PYTHON (the interpreter that reads the config; default: the installed venv's).
set -euo pipefail

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
SRC="$(cd "$(dirname "$0")/.." && pwd)"
DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/opt/dedupd}"
ETC="$DESTDIR/etc"
CONFIG="$ETC/dedupd/dedupd.yaml"
UNIT_DIR="$ETC/systemd/system"
LIB="$DESTDIR/usr/lib"
LIVE=0  # acting on this machine (not DESTDIR, not a dry run)
[ -z "$DESTDIR" ] && [ "$DRY" = 0 ] && LIVE=1

run() {  # print, and run unless --dry-run; arguments are never re-parsed by a shell
  printf '+'; printf ' %q' "$@"; printf '\n'
  [ "$DRY" = 1 ] || "$@"
}

write() {  # write stdin to a file (mode $2) unless --dry-run
  local path="$1" mode="$2" content
  content="$(cat)"
  printf '+ write %q (mode %s)\n' "$path" "$mode"
  [ "$DRY" = 1 ] && { printf '%s\n' "$content" | sed 's/^/    /'; return; }
  mkdir -p "$(dirname "$path")"
  printf '%s\n' "$content" > "$path.tmp"
  chmod "$mode" "$path.tmp"
  mv -f "$path.tmp" "$path"
}

say() { printf 'install.sh: %s\n' "$*" >&2; }

if [ "$LIVE" = 1 ] && [ "$(id -u)" != 0 ]; then
  say "run me as root (sudo $0)"; exit 2
fi

# 0. What building the venv and checking ACLs need (Debian package names).
if [ "$LIVE" = 1 ] && command -v dpkg-query >/dev/null; then
  missing=()
  for pkg in python3-venv python3-dev gcc pkg-config libsystemd-dev acl; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    run apt-get update -q
    DEBIAN_FRONTEND=noninteractive run apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
fi

# 1. The system user and group (sysusers.d), the config directory's ownership (tmpfiles.d).
run install -D -m 0644 "$SRC/deploy/dedupd.sysusers" "$LIB/sysusers.d/dedupd.conf"
run install -D -m 0644 "$SRC/deploy/dedupd.tmpfiles" "$LIB/tmpfiles.d/dedupd.conf"
[ -z "$DESTDIR" ] && run systemd-sysusers dedupd.conf

# 2. The program in its own virtualenv.
if [ ! -x "$DESTDIR$PREFIX/venv/bin/dedupd" ]; then
  run python3 -m venv "$DESTDIR$PREFIX/venv"
fi
run "$DESTDIR$PREFIX/venv/bin/pip" install --quiet --upgrade "$SRC"
run install -m 0644 "$SRC/README.md" "$DESTDIR$PREFIX/README.md"

# 3. Configuration: never overwrite an operator's file; root writes it, dedupd reads it.
if [ ! -e "$CONFIG" ]; then
  run install -D -m 0640 "$SRC/config/dedupd.yaml" "$CONFIG"
fi
[ -z "$DESTDIR" ] && run systemd-tmpfiles --create dedupd.conf

# 4. Unit and message catalog.
run install -D -m 0644 "$SRC/deploy/dedupd.service" "$UNIT_DIR/dedupd.service"
run install -D -m 0644 "$SRC/deploy/dedupd.catalog" "$LIB/systemd/catalog/dedupd.catalog"

# 5. What the config asks for: one writable tree for roots + quarantine, network or not.
PY="${PYTHON:-$DESTDIR$PREFIX/venv/bin/python}"
[ -x "$PY" ] || PY=python3  # a dry run before the venv exists (needs python3-yaml)
cfg_src="$CONFIG"
[ -e "$cfg_src" ] || cfg_src="$SRC/config/dedupd.yaml"
status=0
facts="$(PYTHONPATH="$SRC" "$PY" -m dedupd.deployment facts "$cfg_src")" || status=$?
if [ "$status" != 0 ]; then
  say "fix $CONFIG (check it with: $PREFIX/venv/bin/dedupd --config $CONFIG validate), then run me again"
  exit "$status"
fi
fact() { printf '%s\n' "$facts" | sed -n "s/^$1=//p"; }
{
  echo "# Written by deploy/install.sh from $CONFIG; run it again after changing the paths."
  echo "# One tree for every root and the quarantine: moves between them stay atomic renames"
  echo "# (separate ReadWritePaths= entries are separate mounts: rename across them is EXDEV)."
  echo "[Service]"
  echo "ReadWritePaths=$(fact parent)"
  if [ -n "$(fact textfile_dir)" ]; then
    echo "# metrics.textfile: node_exporter's collector directory."
    echo "ReadWritePaths=$(fact textfile_dir)"
  fi
  if [ "$(fact home)" = yes ]; then
    echo "ProtectHome=read-only"
  fi
  if [ "$(fact network)" = yes ] || [ "$(fact listen)" != no ]; then
    echo "# The index is PostgreSQL, or metrics.listen serves HTTP: allow IP sockets."
    echo "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"
  fi
  if [ "$(fact network)" = yes ] || [ "$(fact listen)" = any ]; then
    echo "IPAddressDeny="
  elif [ "$(fact listen)" = loopback ]; then
    echo "IPAddressAllow=localhost"
  fi
} | write "$UNIT_DIR/dedupd.service.d/paths.conf" 0644
# The quarantine and rejected directories belong to the service (tmpfiles.d).
for d in $(fact state_dirs); do printf 'd %s 0750 dedupd dedupd -\n' "$d"; done \
  | write "$ETC/tmpfiles.d/dedupd-paths.conf" 0644
[ -z "$DESTDIR" ] && run systemd-tmpfiles --create "$ETC/tmpfiles.d/dedupd-paths.conf"
[ "$(fact one_fs)" = yes ] || say "note: the roots and the quarantine are on different" \
  "file systems: duplicates there are copied (fsync'd), not renamed"

# 6. inotify needs one watch per directory under the roots: ask for twice as many.
want=$(( $(fact dirs) * 2 ))
have="$(cat /proc/sys/fs/inotify/max_user_watches 2>/dev/null || echo 0)"
if [ "$have" -lt "$want" ]; then
  printf 'fs.inotify.max_user_watches = %s\n' "$want" | write "$ETC/sysctl.d/60-dedupd.conf" 0644
  if [ -z "$DESTDIR" ] && ! run sysctl --quiet --load "$ETC/sysctl.d/60-dedupd.conf"; then
    say "cannot raise fs.inotify.max_user_watches here (read-only /proc/sys, e.g. in a" \
      "container): on the host run: sysctl -w fs.inotify.max_user_watches=$want"
  fi
fi

[ -z "$DESTDIR" ] || exit 0
run journalctl --update-catalog
run systemctl daemon-reload

# 7. Can the dedupd user do its work there? (As that user, so permissions are real.)
[ "$DRY" = 1 ] && exit 0
if ! report="$(runuser -u dedupd -- "$PY" -m dedupd.deployment check "$CONFIG")"; then
  say "the dedupd user cannot use the configured paths yet:"
  printf '%s\n' "$report" >&2
  say "then run me again"
  exit 1
fi
if systemctl is-active --quiet dedupd; then
  echo "installed; apply the changes with: systemctl restart dedupd"
else
  echo "installed; start with: systemctl enable --now dedupd"
fi
