#!/usr/bin/env bash
# What `make test` needs from the system, installed with apt-get when missing (root on
# Debian), else named so the user can install it. Tests start their own redis-server and
# prometheus (never the machine's shared ones); Debian's prometheus package also ships
# promtool; docker-compose validates docker-compose.yml (no Docker engine needed); kubectl
# renders deploy/k8s. A package's postinst may start a daemon where an init system allows
# it: the tests never use one and leave it alone.
set -euo pipefail

apt_updated=""

# ensure PACKAGE COMMAND...: install PACKAGE unless every COMMAND is on the PATH.
ensure() {
  local package=$1; shift
  local missing=""
  for command in "$@"; do command -v "$command" >/dev/null || missing=1; done
  [ -z "$missing" ] && return 0
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package" >/dev/null \
      && return 0
  fi
  echo "$* needed by the tests: install $package (e.g. apt-get install $package)" >&2
  return 1
}

ensure redis-server redis-server
ensure prometheus prometheus promtool
ensure docker-compose docker-compose
# Debian has `kubectl` only from the Kubernetes apt repository; its own kubernetes-client
# (bookworm: 1.20) bundles kustomize v2, too old for the overlays: check it renders.
ensure kubectl kubectl 2>/dev/null || ensure kubernetes-client kubectl || true
if ! kubectl kustomize deploy/k8s/overlays/dev >/dev/null 2>&1; then
  echo "kubectl 1.21 or newer (kustomize v4+) is needed to render deploy/k8s; found:" \
    "$(kubectl version --client 2>/dev/null | head -1 || echo none)." >&2
  echo "Install it from the Kubernetes apt repository" \
    "(https://kubernetes.io/docs/tasks/tools/install-kubectl-linux/)." >&2
  exit 1
fi
command -v node >/dev/null || { echo "node (>= 18) is needed by the tests" >&2; exit 1; }
