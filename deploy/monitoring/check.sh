#!/usr/bin/env bash
# Checks the monitoring kit in deploy/monitoring, offline:
#
#   bash deploy/monitoring/check.sh
#
# - the alert rules load (promtool check rules) and pass their unit tests
#   (promtool test rules);
# - every alert's runbook annotation names a section of docs/OPERATIONS.md;
# - prometheus.yml is a valid configuration (syntax only: the certificate
#   files it names exist only on a Prometheus host);
# - the Grafana dashboard is valid JSON and each of its queries parses as
#   PromQL;
# - servicemonitor.yaml is valid YAML holding the expected objects (needs
#   python3's yaml module; skipped without it).
#
# Prints one line per check and exits 1 if any failed. Needs promtool
# (Prometheus 2.x; Debian: apt-get install prometheus) or PROMTOOL=path, and
# python3.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
promtool=${PROMTOOL:-promtool}
failed=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# check NAME CMD...: runs CMD, prints "ok NAME" or "FAIL NAME" and its output.
check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then
    printf 'ok    %s\n' "$name"
  else
    printf 'FAIL  %s\n' "$name"
    printf '%s\n' "$out" | sed 's/^/      /'
    failed=1
  fi
}

skip() {
  printf 'skip  %s\n' "$1"
}

if ! command -v "$promtool" >/dev/null 2>&1; then
  echo "FAIL  promtool not found (install Prometheus' promtool or set PROMTOOL)"
  exit 1
fi
if ! command -v python3 >/dev/null 2>&1; then
  echo "FAIL  python3 not found"
  exit 1
fi

check "promtool check rules rmem-alerts.yml" \
  "$promtool" check rules "$here/rmem-alerts.yml"

check "promtool test rules rmem-alerts.test.yml" \
  "$promtool" test rules "$here/rmem-alerts.test.yml"

# Each runbook annotation points at a heading of docs/OPERATIONS.md (GitHub's
# anchors: the heading in lower case, punctuation dropped, spaces as -).
runbooks() {
  python3 - "$here/rmem-alerts.yml" "$root/docs/OPERATIONS.md" <<'EOF'
import re, sys
rules, doc = sys.argv[1], sys.argv[2]
links = re.findall(r'^\s*runbook:\s*["\']?docs/OPERATIONS\.md#([^"\'\s]+)', open(rules).read(), re.M)
alerts = re.findall(r'^\s*-\s*alert:\s*(\S+)', open(rules).read(), re.M)
anchors = set()
for line in open(doc):
    m = re.match(r'^#{1,6}\s+(.*?)\s*#*\s*$', line)
    if m:
        text = re.sub(r'[`*_]', '', m.group(1)).lower()
        anchors.add(re.sub(r'\s', '-', re.sub(r'[^\w\s-]', '', text)))
bad = [l for l in links if l not in anchors]
if len(links) != len(alerts):
    sys.exit(f"{len(alerts)} alerts but {len(links)} runbook annotations")
if bad:
    sys.exit("no such section in docs/OPERATIONS.md: " + ", ".join("#" + b for b in bad))
EOF
}
check "runbook links resolve in docs/OPERATIONS.md" runbooks

check "promtool check config --syntax-only prometheus.yml" \
  "$promtool" check config --syntax-only "$here/prometheus.yml"

check "grafana-dashboard.json is valid JSON" \
  python3 -m json.tool "$here/grafana-dashboard.json" /dev/null

# The dashboard's queries, with Grafana's variables replaced, as recording
# rules that promtool parses.
dashboard_queries() {
  python3 - "$here/grafana-dashboard.json" "$tmp/dashboard-rules.yml" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
exprs = []
def walk(panels):
    for p in panels:
        exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
        walk(p.get("panels", []))
walk(d["panels"])
if not exprs:
    sys.exit("no queries found")
with open(sys.argv[2], "w") as f:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, e in enumerate(exprs):
        e = e.replace("$__rate_interval", "5m").replace("$instance", ".*")
        f.write(f"      - record: dashboard_query_{i}\n        expr: {json.dumps(e)}\n")
EOF
  "$promtool" check rules "$tmp/dashboard-rules.yml"
}
check "grafana-dashboard.json queries parse" dashboard_queries

# Every rmem metric the rules and the dashboard read is one the daemons
# export, as docs/OPERATIONS.md lists them (tests/tests/metrics.rs checks
# that the daemons' expositions match that list).
documented() {
  python3 - "$here/rmem-alerts.yml" "$here/grafana-dashboard.json" "$root/docs/OPERATIONS.md" <<'EOF'
import re, sys
doc = open(sys.argv[3]).read()
listed = set(re.findall(r'^\|\s*`(rmem_[a-z0-9_]+)`', doc, re.M))
used = set()
for f in sys.argv[1:3]:
    for name in re.findall(r'\b(rmem_[a-z0-9_]+)', open(f).read()):
        used.add(re.sub(r'_(bucket|count|sum)$', '', name) if name.endswith(('_bucket', '_count', '_sum')) and re.sub(r'_(bucket|count|sum)$', '', name) in listed else name)
missing = sorted(u for u in used if u not in listed)
if not listed:
    sys.exit("no metric table found in docs/OPERATIONS.md")
if missing:
    sys.exit("not in docs/OPERATIONS.md's metric tables: " + ", ".join(missing))
EOF
}
check "every metric the rules and the dashboard use is documented" documented

if python3 -c 'import yaml' 2>/dev/null; then
  monitors() {
    python3 - "$here/servicemonitor.yaml" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
jobs = {}
for d in docs:
    for k in ("apiVersion", "kind", "metadata", "spec"):
        if k not in d:
            sys.exit(f"a document lacks {k}")
    if d["metadata"].get("namespace") != "rmem":
        sys.exit(f"{d['kind']} {d['metadata'].get('name')}: not in namespace rmem")
    if d["kind"] != "PodMonitor":
        continue
    for ep in d["spec"]["podMetricsEndpoints"]:
        if ep.get("port") != "metrics" or ep.get("scheme") != "https":
            sys.exit(f"{d['metadata']['name']}: port must be metrics, scheme https")
        tls = ep["tlsConfig"]
        names = {tls["ca"]["secret"]["name"], tls["cert"]["secret"]["name"], tls["keySecret"]["name"]}
        if names != {"rmem-monitor-tls"}:
            sys.exit(f"{d['metadata']['name']}: TLS must come from the secret rmem-monitor-tls")
        for r in ep.get("relabelings", []):
            if r.get("targetLabel") == "job":
                jobs[r["replacement"]] = d["metadata"]["name"]
want = {"rmem-server", "rmem-coordinator", "rmem-agent"}
if set(jobs) != want:
    sys.exit(f"jobs {sorted(jobs)}, expected {sorted(want)}")
EOF
  }
  check "servicemonitor.yaml: PodMonitors for the three jobs" monitors
else
  skip "servicemonitor.yaml (python3 has no yaml module)"
fi

exit "$failed"
