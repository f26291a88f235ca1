#!/usr/bin/env bash
# Builds the s4serve image and proves it serves, on a machine that cannot pull any image:
#   1. uses the running Docker engine, or starts Debian's dockerd (and stops it again at the end);
#   2. builds a Debian bookworm + python3 base with debootstrap from the apt mirror and
#      `docker import`s it (cached: skipped when the tag exists);
#   3. builds a wheelhouse (the project + runtime deps, torch pinned to the CPU wheel);
#   4. builds the image with --build-arg BASE=<that base>, runs it, waits for /readyz and a
#      healthy HEALTHCHECK, checks that its S4D models stream with the native step (the
#      wheel's portable library, where the wheel holds one this CPU runs: the image has no
#      compiler), streams one session and one predict (smoke_client.py);
#   5. removes the container and image it made (the base image stays as the cache).
#
# Exit status: 0 ok, 1 failure, 77 when this machine cannot run a Docker engine at all.
# Environment: PYTHON (default .venv/bin/python), DOCKER (client), TORCH_SPEC,
#   S4SERVE_SMOKE_CACHE (default ~/.cache/s4serve-smoke), DEBIAN_MIRROR, BASE_IMAGE,
#   S4SERVE_SMOKE_DOCKERD=minimal to start dockerd without iptables/bridge/overlay at once.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
DOCKER=${DOCKER:-docker}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
CACHE=${S4SERVE_SMOKE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/s4serve-smoke}
BASE_IMAGE=${BASE_IMAGE:-s4serve-base:bookworm}
SUITE=bookworm
IMAGE=s4serve:smoke-$$
# The builder stage stays tagged between runs, so its torch layer is reused from the cache.
BUILDER_CACHE=s4serve-smoke:builder-cache
CONTAINER=s4serve-smoke-$$
WORK=$(mktemp -d /tmp/s4serve-smoke.XXXXXX)
STARTED_DOCKERD_PID=""
DANGLING_BEFORE=unknown
NETWORK_ARGS=()
HOST_NETWORK=no

log() { printf 'smoke: %s\n' "$*" >&2; }
elapsed() { echo "$((SECONDS - $1))s"; }

cleanup() {
  local status=$?
  set +e
  if "$DOCKER" info >/dev/null 2>&1; then
    if [ "$status" -ne 0 ] && "$DOCKER" container inspect "$CONTAINER" >/dev/null 2>&1; then
      log "container log (last 40 lines):"
      "$DOCKER" logs --tail 40 "$CONTAINER" >&2
    fi
    "$DOCKER" rm -f -v "$CONTAINER" >/dev/null 2>&1
    "$DOCKER" rmi -f "$IMAGE" >/dev/null 2>&1
    # Untagged images this run left behind (stages, the previous builder cache); nothing older.
    if [ "$DANGLING_BEFORE" != unknown ]; then
      comm -13 <(echo "$DANGLING_BEFORE") <(dangling_images) | xargs -r "$DOCKER" rmi >/dev/null 2>&1
    fi
  fi
  if [ -n "$STARTED_DOCKERD_PID" ]; then
    log "stopping the dockerd this script started (pid $STARTED_DOCKERD_PID)"
    kill "$STARTED_DOCKERD_PID" 2>/dev/null
    for _ in $(seq 1 30); do kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$STARTED_DOCKERD_PID" 2>/dev/null
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR

dangling_images() {
  "$DOCKER" images --quiet --no-trunc --filter dangling=true | sort -u
}

cannot_run_engine() {
  log "CANNOT RUN A DOCKER ENGINE ON THIS MACHINE: $*"
  exit 77
}

# Starts dockerd with its own socket; the data root lives in the cache so the base image
# survives between runs. $1: "default" or "minimal" (no iptables, no bridge, vfs storage).
start_dockerd() {
  local mode=$1 data_root="$CACHE/dockerd-$1"
  local -a flags=(--host "unix://$WORK/docker.sock" --data-root "$data_root"
                  --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid")
  [ "$mode" = minimal ] && flags+=(--iptables=false --ip6tables=false --bridge=none
                                    --storage-driver=vfs)
  mkdir -p "$data_root"
  dockerd "${flags[@]}" >"$WORK/dockerd-$mode.log" 2>&1 &
  STARTED_DOCKERD_PID=$!
  export DOCKER_HOST="unix://$WORK/docker.sock"
  for _ in $(seq 1 60); do
    "$DOCKER" info >/dev/null 2>&1 && return 0
    kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null || break
    sleep 0.5
  done
  log "dockerd ($mode) did not come up; its log ends with:"
  tail -n 5 "$WORK/dockerd-$mode.log" >&2
  kill "$STARTED_DOCKERD_PID" 2>/dev/null
  wait "$STARTED_DOCKERD_PID" 2>/dev/null || true
  STARTED_DOCKERD_PID=""
  unset DOCKER_HOST
  return 1
}

ensure_engine() {
  command -v "$DOCKER" >/dev/null || cannot_run_engine "no docker client ($DOCKER)"
  if "$DOCKER" info >/dev/null 2>&1; then
    log "using the running Docker engine"
    return
  fi
  command -v dockerd >/dev/null || cannot_run_engine "no engine runs and dockerd is not installed"
  [ "$(id -u)" -eq 0 ] || cannot_run_engine "no engine runs and starting dockerd needs root"
  if [ "${S4SERVE_SMOKE_DOCKERD:-default}" != minimal ] && start_dockerd default; then
    log "started dockerd (bridge network, default storage)"
    return
  fi
  if start_dockerd minimal; then
    log "started dockerd without iptables/bridge (vfs storage): containers use host networking"
    NETWORK_ARGS=(--network host)
    HOST_NETWORK=yes
    return
  fi
  cannot_run_engine "dockerd fails to start, even with --iptables=false --bridge=none vfs"
}

debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  # The mirror apt already uses here: the first Debian, non-security URI of its sources.
  {
    cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '$1 == "URIs:" {print $2}' || true
    cat /etc/apt/sources.list 2>/dev/null | sed -E 's/\[[^]]*\]//' | awk '$1 == "deb" {print $2}' || true
  } | awk 'tolower($0) ~ /debian/ && tolower($0) !~ /security/' | head -n 1
}

ensure_base_image() {
  if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base image $BASE_IMAGE cached"
    return
  fi
  command -v debootstrap >/dev/null || { log "debootstrap is not installed"; exit 1; }
  local mirror t0=$SECONDS
  mirror=$(debian_mirror)
  [ -n "$mirror" ] || { log "no Debian mirror found in apt sources; set DEBIAN_MIRROR"; exit 1; }
  log "debootstrap $SUITE from $mirror (about a minute)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 ||
    { tail -n 20 "$WORK/debootstrap.log" >&2; exit 1; }
  rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
  tar -C "$WORK/rootfs" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' - "$BASE_IMAGE" >/dev/null
  rm -rf "$WORK/rootfs"
  log "base image $BASE_IMAGE imported in $(elapsed "$t0")"
}

build_wheelhouse() {
  # The project wheel is built from a copy of the working tree (so no build/ or egg-info lands in
  # the checkout) every run; dependency wheels are cached.
  local t0=$SECONDS deps="$CACHE/wheels" src="$WORK/src"
  mkdir -p "$deps" "$src" "$WORK/context/wheelhouse"
  tar -C "$REPO" --exclude=__pycache__ --exclude='*.egg-info' -c pyproject.toml setup.py model server \
    client loadtest | tar -C "$src" -x
  if [ -f "$REPO/README.md" ]; then cp "$REPO/README.md" "$src/"; else : >"$src/README.md"; fi
  "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WORK/project" "$src" \
    >"$WORK/pip.log" 2>&1 || { tail -n 20 "$WORK/pip.log" >&2; exit 1; }
  "$PYTHON" -m pip wheel --quiet --find-links "$deps" -w "$deps" \
    "$WORK"/project/s4serve-*.whl "$TORCH_SPEC" >"$WORK/pip.log" 2>&1 ||
    { tail -n 20 "$WORK/pip.log" >&2; exit 1; }
  rm -f "$deps"/s4serve-*.whl
  cp "$deps"/*.whl "$WORK"/project/s4serve-*.whl "$WORK/context/wheelhouse/"
  log "wheelhouse ready in $(elapsed "$t0"): $(du -sh "$WORK/context/wheelhouse" | cut -f1)"
}

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Runs "$@" every second until it succeeds; gives up after $1 seconds or when the container exits.
poll_container() {
  local seconds=$1
  shift
  for _ in $(seq 1 "$seconds"); do
    "$@" && return 0
    [ "$("$DOCKER" inspect --format '{{.State.Running}}' "$CONTAINER")" = true ] ||
      { log "container exited"; return 1; }
    sleep 1
  done
  return 1
}

is_ready() {
  "$PYTHON" - "$1" <<'PY'
import sys, urllib.request
try:
    sys.exit(urllib.request.urlopen(sys.argv[1] + "/readyz", timeout=3).status != 200)
except OSError:
    sys.exit(1)
PY
}

is_healthy() {
  [ "$("$DOCKER" inspect --format '{{.State.Health.Status}}' "$CONTAINER")" = healthy ]
}

main() {
  local t_all=$SECONDS t0 port url uid
  # One run at a time per cache: two dockerds must never share a data root.
  mkdir -p "$CACHE"
  exec 9>"$CACHE/lock"
  flock 9
  ensure_engine
  ensure_base_image
  build_wheelhouse

  t0=$SECONDS
  cp "$REPO/.dockerignore" "$WORK/context/"
  DANGLING_BEFORE=$(dangling_images)
  # The legacy builder works with every engine version and needs no buildx plugin.
  local -a build=(build "${NETWORK_ARGS[@]}" --build-arg "BASE=$BASE_IMAGE"
                  --build-arg "TORCH_SPEC=$TORCH_SPEC" -f "$REPO/Dockerfile")
  { DOCKER_BUILDKIT=0 "$DOCKER" "${build[@]}" --target builder -t "$BUILDER_CACHE" \
      "$WORK/context" && DOCKER_BUILDKIT=0 "$DOCKER" "${build[@]}" -t "$IMAGE" "$WORK/context"
  } >"$WORK/build.log" 2>&1 || { tail -n 30 "$WORK/build.log" >&2; exit 1; }
  log "image $IMAGE built in $(elapsed "$t0"), size $("$DOCKER" image inspect --format \
    '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1 / 1e6}')"

  # The image's default command serves the shipped models (model/zoo); without any, a tiny
  # generated model is mounted instead, so the container machinery is still proven.
  local -a serve=(s4serve serve --host 0.0.0.0 --port 8000) mounts=()
  if ! compgen -G "$WORK/src/model/zoo/*/config.json" >/dev/null; then  # what the wheel holds
    log "WARNING: no shipped models in model/zoo; serving a generated test model instead"
    "$PYTHON" "$REPO/deploy/docker/make_test_model.py" "$WORK/models/smoke" >/dev/null
    chmod -R a+rX "$WORK/models"
    mounts=(-v "$WORK/models:/models:ro")
    serve+=(--model /models/smoke)
  fi
  port=$(free_port)
  t0=$SECONDS
  if [ "$HOST_NETWORK" = yes ]; then
    serve=("${serve[@]/#8000/$port}")
    serve=("${serve[@]/#0.0.0.0/127.0.0.1}")
  else
    NETWORK_ARGS=(-p "127.0.0.1:$port:8000")
  fi
  # Run as Kubernetes does (deploy/k8s): read-only root, no capabilities, writable volumes only.
  "$DOCKER" run -d --name "$CONTAINER" "${NETWORK_ARGS[@]}" "${mounts[@]}" --read-only \
    --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges -v /home/s4serve/var \
    "$IMAGE" "${serve[@]}" >/dev/null
  url="http://127.0.0.1:$port"
  uid=$("$DOCKER" exec "$CONTAINER" id -u)
  [ "$uid" != 0 ] || { log "the server runs as root"; exit 1; }
  log "container runs as uid $uid; waiting for $url/readyz"

  poll_container 180 is_ready "$url" || { log "/readyz never answered 200"; exit 1; }
  # No compiler in the image: where the wheel holds the portable library (model/native_build.py:
  # built when the wheel's builder has a compiler) and this CPU can run it, it must serve the S4D
  # streams, not the TorchScript fallback (~8x the cost per step).
  if "$PYTHON" - "$WORK"/project/s4serve-*.whl <<'PY'; then
import re, sys, zipfile
from model.native_build import PORTABLE_CPU_FLAGS, cpu_flags
names = zipfile.ZipFile(sys.argv[1]).namelist()
sys.exit(not (any(re.fullmatch(r"model/native_step-.*\.so", n) for n in names)
              and PORTABLE_CPU_FLAGS <= cpu_flags()))
PY
    # Not `docker logs | grep -q`: under pipefail grep's early exit can fail docker with SIGPIPE.
    container_log=$("$DOCKER" logs "$CONTAINER" 2>&1)
    if ! grep -q "streaming step compiled with native" <<<"$container_log"; then
      log "the image does not stream with the native step"; exit 1
    fi
    log "streams with the native step (the wheel's portable library)"
  else
    log "no portable native step in the wheel for this CPU: the image streams with TorchScript"
  fi
  log "ready after $(elapsed "$t0"); streaming one session and one predict"
  "$PYTHON" "$REPO/deploy/docker/smoke_client.py" --url "$url" --timeout 30
  if [ "$HOST_NETWORK" = no ]; then
    poll_container 60 is_healthy || { log "HEALTHCHECK never reported healthy"; exit 1; }
    log "HEALTHCHECK reports healthy"
  else
    log "HEALTHCHECK not checked: with host networking the server is not on port 8000"
  fi
  "$DOCKER" stop --time 30 "$CONTAINER" >/dev/null
  log "container stopped with exit code $("$DOCKER" inspect --format '{{.State.ExitCode}}' "$CONTAINER")"
  log "all good in $(elapsed "$t_all")"
}

# On one line: bash reads a script as it runs, so nothing after this may be read mid-run.
main "$@"; exit $?
