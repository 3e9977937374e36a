#!/usr/bin/env bash
# Deploys one model: the kustomize overlay deployment/overlays/<overlay> (or deployment/kserve).
#
#   deployment/deploy_model.sh <overlay> [--dry-run] [-n NAMESPACE]
#
# --dry-run prints the manifests instead of applying them. kubectl (with its built-in kustomize)
# or oc must be on PATH; the current context is used.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

usage() {
  echo "usage: $0 <overlay> [--dry-run] [-n NAMESPACE]" >&2
  echo "overlays: $(cd "$here/overlays" && echo */ | tr -d /) (or kserve)" >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
overlay=$1
shift
dry_run=false
namespace=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry_run=true ;;
    -n | --namespace)
      [[ $# -ge 2 ]] || usage
      namespace=(--namespace "$2")
      shift
      ;;
    *) usage ;;
  esac
  shift
done

if [[ $overlay == kserve ]]; then
  dir=$here/kserve
else
  dir=$here/overlays/$overlay
fi
[[ -f $dir/kustomization.yaml ]] || { echo "no overlay named '$overlay'" >&2; usage; }

client=$(command -v kubectl || command -v oc) || { echo "needs kubectl or oc on PATH" >&2; exit 1; }
if $dry_run; then
  "$client" kustomize "$dir"
else
  "$client" apply "${namespace[@]}" -k "$dir"
fi
