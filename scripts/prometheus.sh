#!/usr/bin/env bash
# Make sure Prometheus and promtool are installed, for the tests that check the alert rules
# (promtool check/test rules) and run every dashboard query against a real Prometheus.
#
#   scripts/prometheus.sh install   # idempotent; Debian's `prometheus` package with apt-get (as root)
#   scripts/prometheus.sh bin-dir   # prints the directory holding both (exit 1 when missing)
#
# The tests start their own Prometheus (a temporary config and data directory, a free port) and
# stop it; nothing here runs a server. RLHF_TEST_INFRA=none installs nothing.
set -euo pipefail

log() { echo "[prometheus] $*" >&2; }
die() { echo "[prometheus] error: $*" >&2; exit 1; }

bin_dir() {
  local p t
  p="$(command -v prometheus 2>/dev/null)" || return 1
  t="$(command -v promtool 2>/dev/null)" || return 1
  [ "$(dirname "$p")" = "$(dirname "$t")" ] || return 1
  dirname "$p"
}

case "${1:-}" in
  install)
    if bin_dir >/dev/null; then
      exit 0
    fi
    if [ "${RLHF_TEST_INFRA:-}" = "none" ]; then
      log "RLHF_TEST_INFRA=none: not installing Prometheus"
      exit 0
    fi
    [ "$(id -u)" -eq 0 ] || die "Prometheus is not installed (sudo apt-get install -y prometheus)"
    command -v apt-get >/dev/null || die "Prometheus is not installed and apt-get is missing: install prometheus and promtool"
    log "installing Prometheus with apt-get (Debian's prometheus package: the server and promtool)"
    export DEBIAN_FRONTEND=noninteractive
    # the package's service is not wanted (the tests start their own): forbid starting services
    # while it installs, when nothing else already decides that
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      policy=/usr/sbin/policy-rc.d
      printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
    fi
    rc=0
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; } >&2 || rc=$?
    [ -n "$policy" ] && rm -f "$policy"
    [ "$rc" -eq 0 ] || die "apt-get install prometheus failed"
    bin_dir >/dev/null || die "prometheus/promtool not on PATH after the install"
    ;;
  bin-dir)
    bin_dir || { echo "[prometheus] not installed: run scripts/prometheus.sh install" >&2; exit 1; }
    ;;
  *)
    echo "usage: $0 install|bin-dir" >&2
    exit 2
    ;;
esac
