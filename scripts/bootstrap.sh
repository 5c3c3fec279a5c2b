#!/usr/bin/env bash
# Installs everything orama-stealth, its tests, the lab node and the benchmark need on a Debian 12
# machine: Debian packages, then this project and its Python dependencies into the current Python.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  coturn            # the TURN server the probes and the lab talk to
  nftables          # tests/deploy: the handover's redirect rules checked with nft -c
  haproxy wrk nginx-light   # benchmark baseline, load generator, TLS origin
  systemd-container mmdebstrap iproute2 openssh-client   # the lab node
  pebble            # the lab's ACME CA (with pebble-challtestsrv for its DNS answers)
  curl openssl ca-certificates
  chromium firefox-esr libnss3-tools nodejs   # tests/browser: real browsers, NSS certutil, node
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# Debian starts packaged daemons where systemd runs; the project starts its own instances.
for svc in coturn haproxy nginx; do
  if command -v systemctl >/dev/null && systemctl is-active -q "$svc" 2>/dev/null; then
    systemctl disable --now "$svc" >/dev/null 2>&1 || true
  fi
done

# Debian's nodejs comes without npm; a NodeSource nodejs carries its own.
if ! command -v npm >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends npm
fi
# puppeteer-core drives Debian's browsers; it must not try to download one (none exists here).
(cd tests/browser && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)

python3 -m pip install -q --disable-pip-version-check -e ".[dev]"
# The dev extra includes atheris (the fuzzer): check its native part loads, or the fuzz smoke
# tests would fail later with a less clear message.
python3 -c "import atheris" || { echo "bootstrap: atheris does not import" >&2; exit 1; }

# The deploy installs the router on nodes from uploaded wheels (many nodes reach no package
# index), so fetch the router's runtime wheels for the nodes' platform now, at install time.
python3 -m pip download -q --disable-pip-version-check --dest build/wheelhouse \
  --only-binary=:all: --implementation cp --python-version 3.11 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  'pyyaml>=6' 'uvloop>=0.19' pip
echo "bootstrap: done ($(python3 --version), caddy $(caddy version | cut -d' ' -f1))"
