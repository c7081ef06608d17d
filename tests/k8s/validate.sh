#!/usr/bin/env bash
# Validates rmem's Kubernetes manifests (deploy/k8s) offline: every document
# against the Kubernetes OpenAPI schemas in strict mode (unknown fields fail),
# the kustomizations' file lists, and the cross-object rules the schemas
# cannot express (see check_manifests.py). A self-check first requires
# deliberately broken manifests to be rejected. No cluster is needed.
#
#   bash tests/k8s/validate.sh
#
# The validator is the PyPI package kubernetes-validate, which bundles the
# schemas. It is installed once into a virtualenv outside the repository,
# ${RMEM_KIT_CACHE:-/var/cache/rmem-kit}/k8s-validate-<version>/, and reused;
# that first run needs PyPI, later runs need no network.
#
# Environment: RMEM_KIT_CACHE (cache root), PYTHON (interpreter for the
# virtualenv, default python3; the pinned packages need 3.11 or later),
# RMEM_K8S_VERSIONS (Kubernetes versions to validate against, default
# "1.30.0 1.37.0": the oldest supported here, gRPC probes being GA since
# 1.27, and the newest that the pinned validator bundles).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

validator_version=1.37.0
# The validator and its dependencies, pinned: the cache key is the
# validator's version, so a change here needs a new one (or a cache reset).
requirements=(
  "kubernetes-validate==$validator_version"
  "jsonschema==4.26.0"
  "jsonschema-specifications==2025.9.1"
  "referencing==0.37.0"
  "rpds-py==2026.9.1"
  "attrs==26.1.0"
  "PyYAML==6.0.4"
  "packaging==26.4"
  "importlib_resources==7.1.0"
  "typing_extensions==4.16.0"
)
k8s_versions=${RMEM_K8S_VERSIONS:-1.30.0 1.37.0}
cache=${RMEM_KIT_CACHE:-/var/cache/rmem-kit}
venv=$cache/k8s-validate-$validator_version
python=${PYTHON:-python3}

install_validator() {
  echo "installing kubernetes-validate $validator_version into $venv" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv" || {
    echo "cannot create a virtualenv with $python (Debian: apt-get install python3-venv)" >&2
    return 1
  }
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/python" -m pip install --quiet \
    --no-input "${requirements[@]}" >&2
  # The marker is written last: an interrupted install is redone next time.
  printf '%s\n' "${requirements[@]}" >"$venv/.installed"
}

mkdir -p "$cache"
if [[ ! -f $venv/.installed ]] ||
  [[ $(cat "$venv/.installed") != "$(printf '%s\n' "${requirements[@]}")" ]]; then
  # One installer at a time when several runs start together.
  exec 9>"$cache/k8s-validate.lock"
  flock 9
  if [[ ! -f $venv/.installed ]] ||
    [[ $(cat "$venv/.installed") != "$(printf '%s\n' "${requirements[@]}")" ]]; then
    install_validator
  fi
  flock -u 9
fi

version_args=()
for v in $k8s_versions; do
  version_args+=(--k8s-version "$v")
done

cd "$root"
# -I: only the virtualenv's packages, no user site or PYTHON* variables.
exec "$venv/bin/python" -I "$here/check_manifests.py" --self-check \
  "${version_args[@]}" --root "$root" deploy/k8s
