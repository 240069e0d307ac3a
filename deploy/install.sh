#!/usr/bin/env bash
# Install dedupd as a hardened systemd service. Idempotent: run it again after changing
# /etc/dedupd/dedupd.yaml to refresh the ReadWritePaths= drop-in and the sysctl note.
#   deploy/install.sh [--dry-run]
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
CATALOG_DIR="$DESTDIR/usr/lib/systemd/catalog"

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

# 1. A system user that owns the state; datasets stay owned by whoever owns them.
if [ -z "$DESTDIR" ] && ! getent passwd dedupd >/dev/null; then
  run useradd --system --home-dir /var/lib/dedupd --shell /usr/sbin/nologin dedupd
fi

# 2. The program in its own virtualenv.
if [ ! -x "$DESTDIR$PREFIX/venv/bin/dedupd" ]; then
  run python3 -m venv "$DESTDIR$PREFIX/venv"
fi
run "$DESTDIR$PREFIX/venv/bin/pip" install --quiet --upgrade "$SRC"
run install -m 0644 "$SRC/README.md" "$DESTDIR$PREFIX/README.md"

# 3. Configuration: never overwrite an operator's file.
if [ ! -e "$CONFIG" ]; then
  run install -D -m 0640 "$SRC/config/dedupd.yaml" "$CONFIG"
fi

# 4. Unit and message catalog.
run install -D -m 0644 "$SRC/deploy/dedupd.service" "$UNIT_DIR/dedupd.service"
run install -D -m 0644 "$SRC/deploy/dedupd.catalog" "$CATALOG_DIR/dedupd.catalog"

# 5. Drop-in with the paths the service may write, read from the config itself.
PY="${PYTHON:-$DESTDIR$PREFIX/venv/bin/python}"
cfg_src="$CONFIG"
[ -e "$cfg_src" ] || cfg_src="$SRC/config/dedupd.yaml"
mapfile -t facts < <(PYTHONPATH="$SRC" "$PY" - "$cfg_src" <<'PY'
import os, sys
from dedupd.config import load_config
c = load_config(sys.argv[1])
paths = [str(w.path) for w in c.watches] + [str(c.quarantine_dir)]
if c.rejected_dir:
    paths.append(str(c.rejected_dir))
dirs = 0
for w in c.watches:
    for _ in os.walk(w.path):
        dirs += 1
print(" ".join(f"-{p}" for p in paths))  # '-': a missing path is not fatal
print("network" if c.index.startswith(("postgresql://", "postgres://")) else "local")
print(dirs)
PY
)
if [ "${#facts[@]}" -ne 3 ]; then
  echo "install.sh: cannot read $cfg_src (check it with: dedupd --config $cfg_src validate)" >&2
  exit 2
fi
rw_paths="${facts[0]}"
network="${facts[1]}"
dirs="${facts[2]}"
{
  echo "# Written by deploy/install.sh from $CONFIG; rerun it after changing the roots."
  echo "[Service]"
  echo "ReadWritePaths=$rw_paths"
  if [ "$network" = network ]; then
    echo "# The index is PostgreSQL: allow IP sockets."
    echo "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"
    echo "IPAddressDeny="
  fi
} | write "$UNIT_DIR/dedupd.service.d/paths.conf" 0644

# 6. inotify needs one watch per directory under the roots (x2 for growth).
want=$(( dirs * 2 ))
[ "$want" -lt 524288 ] && want=524288
have="$(cat /proc/sys/fs/inotify/max_user_watches 2>/dev/null || echo 0)"
if [ "$have" -lt "$want" ]; then
  printf 'fs.inotify.max_user_watches = %s\n' "$want" \
    | write "$ETC/sysctl.d/60-dedupd.conf" 0644
  [ -z "$DESTDIR" ] && run sysctl --quiet --load "$ETC/sysctl.d/60-dedupd.conf"
fi

if [ -z "$DESTDIR" ]; then
  run journalctl --update-catalog
  run systemctl daemon-reload
  echo "installed; start with: systemctl enable --now dedupd"
fi
