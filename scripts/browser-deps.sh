#!/usr/bin/env bash
# What the browser tests (tests/services/test_labeling_browser.py) need beyond the Python packages
# of the `test` extra: Debian's chromium and chromium-driver (installed with apt-get when missing;
# needs root, or sudo) and axe-core from the npm registry, unpacked into a cache directory outside
# the repository, keyed by its version (npm itself is installed with apt-get when missing).
# Prints the path of axe.min.js. No test tool downloads a browser of its own.
set -euo pipefail
AXE_VERSION=4.14.1
AXE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/rlhf/axe-core-$AXE_VERSION"

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ! -f "$AXE_DIR/axe.min.js" ] && ! command -v npm >/dev/null 2>&1; then missing+=(npm); fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then as_root=(); elif command -v sudo >/dev/null 2>&1; then as_root=(sudo); else
    echo "[browser] ${missing[*]} missing: install them with apt-get as root" >&2
    exit 1
  fi
  echo "[browser] installing ${missing[*]} (apt-get)" >&2
  "${as_root[@]}" apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

if [ ! -f "$AXE_DIR/axe.min.js" ]; then
  echo "[browser] fetching axe-core $AXE_VERSION (npm) into $AXE_DIR" >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "axe-core@$AXE_VERSION" >/dev/null && tar xzf "axe-core-$AXE_VERSION.tgz")
  mkdir -p "$AXE_DIR"
  cp "$tmp/package/axe.min.js" "$tmp/package/LICENSE" "$AXE_DIR/"
fi
echo "$AXE_DIR/axe.min.js"
