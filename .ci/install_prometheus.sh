#!/usr/bin/env bash
# Install the Prometheus server and promtool (Debian package `prometheus`) for
# tests/test_observability.py, and docker-compose v1 (Debian `docker-compose`)
# for validating docker-compose.yml. Idempotent: nothing is installed when the
# tools are already on PATH. The Debian service unit is never started: the
# tests run the prometheus binary themselves with a temporary config.
set -euo pipefail

need=()
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  need+=(prometheus)
fi
if [ "${MGG_SKIP_COMPOSE_INSTALL:-0}" != "1" ] && ! command -v docker-compose >/dev/null 2>&1; then
  need+=(docker-compose)
fi
if [ "${#need[@]}" -eq 0 ]; then
  echo "install_prometheus: prometheus, promtool and docker-compose already present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d keeps the Debian maintainer scripts from starting prometheus.service
# (in containers without systemd invoke-rc.d would otherwise try and fail noisily).
created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  created_policy=1
fi
trap '[ "$created_policy" = 1 ] && $SUDO rm -f /usr/sbin/policy-rc.d' EXIT

echo "install_prometheus: apt-get install ${need[*]}"
$SUDO apt-get update -qq
# docker-compose is best effort: the observability test only needs prometheus.
if ! $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"; then
  $SUDO apt-get install -y -qq --no-install-recommends prometheus
fi
command -v prometheus >/dev/null && command -v promtool >/dev/null
prometheus --version 2>&1 | head -1
command -v docker-compose >/dev/null && docker-compose version --short || true
