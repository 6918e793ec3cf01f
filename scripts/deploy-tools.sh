#!/usr/bin/env bash
# Tools that validate deploy/: kubernetes-validate (PyPI) and promtool
# (Debian's prometheus package). Idempotent.
set -euo pipefail
python3 -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null \
  || python3 -m pip install -q --disable-pip-version-check kubernetes-validate
if ! command -v promtool >/dev/null 2>&1; then
  [ -n "${HERALD_APT_UPDATED:-}" ] || apt-get update -qq >/dev/null
  # Only the promtool binary is needed; the package's server is not started here.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
