#!/usr/bin/env bash
# The Debian packages the test suite starts for real (promtool, espeak-ng + sox for speech
# data, Docker + debootstrap for the image smoke test, Chromium for the browser demo, gcc and
# g++ for the native and AOTInductor streaming steps). Installs what is missing when it can
# (root with apt-get); otherwise stops at once with the exact command to run.
set -euo pipefail
declare -A package=(
  [promtool]=prometheus [espeak-ng]=espeak-ng [sox]=sox [dockerd]=docker.io
  [debootstrap]=debootstrap [docker-compose]=docker-compose [chromium]=chromium [curl]=curl
  [redis-server]=redis-server [nginx]=nginx [cc]=gcc [g++]=g++
)
need=()
for cmd in "${!package[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || need+=("${package[$cmd]}")
done
[ ${#need[@]} -eq 0 ] && exit 0
mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages the tests need: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  exit 0
fi
echo "the tests need these Debian packages: ${need[*]}" >&2
echo "install them, then run make test again:" >&2
echo "  sudo apt-get install -y --no-install-recommends ${need[*]}" >&2
exit 1
