"""Offline checks of rmem's Kubernetes manifests; tests/k8s/validate.sh runs
this with the kubernetes-validate package installed.

For every *.yaml / *.yml file under the given directories:
- every document parses; a duplicate key is an error (as for kubectl);
- a Kustomization: known fields only, every listed resource exists, every
  `images` entry names an image the resources use, its namespace is the one
  the objects carry; and every manifest is listed by some kustomization;
- every other document validates against the Kubernetes OpenAPI schemas
  bundled with kubernetes-validate, in strict mode (an unknown field is an
  error), for each --k8s-version; a kind without a schema is an error too;
- what the API server and kubelet check but the schemas cannot say:
  selectors match the pod template labels, mounts name volumes, $(VAR)
  references are defined, probe and Service ports exist, ConfigMap keys
  exist, privileged is not combined with allowPrivilegeEscalation: false,
  runAsNonRoot is not combined with uid 0, names are unique;
- rmem's sizing rule: a memory server's memory limit covers its --capacity
  plus 5%, and its pool volume the capacity plus the slot table.

One line per file ("ok     PATH" or "FAILED PATH" and the reasons), then
"N passed, M failed". --self-check first writes broken manifests to a
temporary directory and requires every one to be rejected for the expected
reason, so that the checks cannot pass vacuously.
"""

import argparse
import os
import re
import sys
import tempfile

import kubernetes_validate.utils as kv
import yaml

CLUSTER_SCOPED = {
    "Namespace", "Node", "PersistentVolume", "StorageClass", "ClusterRole",
    "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass",
    "RuntimeClass", "IngressClass", "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
KUSTOMIZE_API = "kustomize.config.k8s.io/v1beta1"
KUSTOMIZATION_FIELDS = {
    "apiVersion", "kind", "metadata", "namespace", "namePrefix", "nameSuffix",
    "resources", "components", "images", "labels", "commonLabels",
    "commonAnnotations", "patches", "patchesStrategicMerge",
    "patchesJson6902", "configMapGenerator", "secretGenerator",
    "generatorOptions", "replicas", "replacements", "crds", "openapi",
    "buildMetadata", "sortOptions", "helmCharts", "transformers",
    "generators", "validators", "configurations",
}
# $(VAR) not preceded by another $ ($$(VAR) is an escaped literal).
VAR_REF = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def short(msg, limit=300):
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


class UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader (YAML 1.1, as kubectl reads manifests) that refuses a
    key given twice in one mapping instead of keeping the last value."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_documents(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.load_all(f, Loader=UniqueKeyLoader) if d is not None]


# --- sizes -----------------------------------------------------------------

QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")
QUANTITY_UNITS = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30,
                  "Ti": 1 << 40, "Pi": 1 << 50, "k": 10**3, "M": 10**6,
                  "G": 10**9, "T": 10**12, "P": 10**15}
BYTESIZE_UNITS = {"": 1, "B": 1, "b": 1, "K": 1 << 10, "k": 1 << 10,
                  "KiB": 1 << 10, "Ki": 1 << 10, "kiB": 1 << 10,
                  "M": 1 << 20, "m": 1 << 20, "MiB": 1 << 20, "Mi": 1 << 20,
                  "G": 1 << 30, "g": 1 << 30, "GiB": 1 << 30, "Gi": 1 << 30,
                  "T": 1 << 40, "t": 1 << 40, "TiB": 1 << 40, "Ti": 1 << 40,
                  "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9,
                  "TB": 10**12}


def quantity_bytes(q):
    """A Kubernetes memory/storage quantity in bytes, or None."""
    m = QUANTITY.match(str(q))
    return None if not m else float(m.group(1)) * QUANTITY_UNITS[m.group(2)]


def bytesize(s):
    """An rmem size (rmem_common::ByteSize syntax) in bytes, or None."""
    m = re.match(r"^([0-9_]+(?:\.[0-9]+)?)\s*([A-Za-z]*)$", s.strip())
    if not m or m.group(2) not in BYTESIZE_UNITS:
        return None
    return float(m.group(1).replace("_", "")) * BYTESIZE_UNITS[m.group(2)]


def flag_value(args, flag):
    """The value of --flag=V or --flag V in an argument list, or None."""
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
        if a == flag and i + 1 < len(args):
            return args[i + 1]
    return None


# --- the objects -------------------------------------------------------------

class Doc:
    def __init__(self, path, index, obj):
        self.path, self.index, self.obj = path, index, obj

    @property
    def kind(self):
        return self.obj.get("kind")

    @property
    def name(self):
        return (self.obj.get("metadata") or {}).get("name")

    @property
    def namespace(self):
        return (self.obj.get("metadata") or {}).get("namespace")

    def label(self):
        return f"document {self.index + 1} ({self.kind}/{self.name})"


def pod_template(obj):
    """(template labels, pod spec) of a workload or Pod, else None."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind == "Pod":
        return (obj.get("metadata") or {}).get("labels") or {}, spec
    if kind == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
        kind = "Job"
    if kind in WORKLOADS:
        t = spec.get("template") or {}
        return (t.get("metadata") or {}).get("labels") or {}, t.get("spec") or {}
    return None


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


class World:
    """Every document of every file, for checks across objects."""

    def __init__(self, docs):
        self.docs = docs

    def find(self, kind, namespace, name):
        return [d for d in self.docs
                if d.kind == kind and d.namespace == namespace and d.name == name]

    def pods(self, namespace):
        for d in self.docs:
            t = pod_template(d.obj)
            if t and d.namespace == namespace:
                yield d, t[0], t[1]


def schema_errors(obj, versions):
    errors = []
    for version in versions:
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            where = ".".join(str(p) for p in e.path) or "(top)"
            errors.append(f"schema {e.version}: {where}: {short(e.message)}")
        except kv.SchemaNotFoundError as e:
            errors.append(f"no schema: {e.message}")
        except kv.VersionNotSupportedError as e:
            errors.append(f"kubernetes-validate does not support Kubernetes {e.version}")
    return errors


def check_container(c, pod_spec, env_sources, world, namespace):
    errors = []
    where = f"container {c.get('name')!r}"
    volumes = {v.get("name") for v in pod_spec.get("volumes") or []}
    volumes |= env_sources.get("claim_templates", set())
    paths = set()
    for m in c.get("volumeMounts") or []:
        if m.get("name") not in volumes:
            errors.append(f"{where}: volumeMount {m.get('name')!r} names no volume")
        if m.get("mountPath") in paths:
            errors.append(f"{where}: mountPath {m.get('mountPath')!r} mounted twice")
        paths.add(m.get("mountPath"))

    # Environment, in order: $(VAR) in a value sees only earlier variables.
    defined, opaque = set(), False
    for src in c.get("envFrom") or []:
        cm = (src.get("configMapRef") or {}).get("name")
        found = world.find("ConfigMap", namespace, cm) if cm else []
        if found:
            defined |= {src.get("prefix", "") + k for k in (found[0].obj.get("data") or {})}
        else:
            opaque = True  # a Secret or an outside ConfigMap: keys unknown
    for e in c.get("env") or []:
        for ref in VAR_REF.findall(str(e.get("value", ""))):
            if ref not in defined and not opaque:
                errors.append(f"{where}: env {e.get('name')}: $({ref}) is not defined before it")
        ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
        if ref and not ref.get("optional"):
            found = world.find("ConfigMap", namespace, ref.get("name"))
            if not found:
                errors.append(f"{where}: env {e.get('name')}: ConfigMap {ref.get('name')!r} is not defined")
            elif ref.get("key") not in (found[0].obj.get("data") or {}):
                errors.append(f"{where}: env {e.get('name')}: ConfigMap {ref.get('name')!r} has no key {ref.get('key')!r}")
        defined.add(e.get("name"))
    if not opaque:
        for field in ("command", "args"):
            for arg in c.get(field) or []:
                for ref in VAR_REF.findall(str(arg)):
                    if ref not in defined:
                        errors.append(f"{where}: {field}: $({ref}) is not an environment variable "
                                      "of the container (Kubernetes would pass it literally)")

    numbers = {p.get("containerPort") for p in c.get("ports") or []}
    names = {p.get("name") for p in c.get("ports") or [] if p.get("name")}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c.get(probe) or {}
        for handler in ("grpc", "httpGet", "tcpSocket"):
            port = (p.get(handler) or {}).get("port")
            if port is None:
                continue
            if port not in numbers and port not in names:
                errors.append(f"{where}: {probe}: port {port!r} is not a containerPort")

    psc = pod_spec.get("securityContext") or {}
    sc = c.get("securityContext") or {}
    if sc.get("privileged") and sc.get("allowPrivilegeEscalation") is False:
        errors.append(f"{where}: privileged with allowPrivilegeEscalation: false (the API refuses it)")
    non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
    uid = sc.get("runAsUser", psc.get("runAsUser"))
    if non_root and uid == 0:
        errors.append(f"{where}: runAsNonRoot with runAsUser 0 (the kubelet refuses to start it)")
    return errors


def check_rmem_sizing(doc, c):
    """A memory server's memory and volume must hold its --capacity."""
    args = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
    cap_arg = flag_value(args, "--capacity")
    if cap_arg is None:
        return []
    where = f"container {c.get('name')!r}"
    cap = bytesize(cap_arg)
    if cap is None:
        return [f"{where}: --capacity {cap_arg!r} is not a size"]
    errors = []
    res = c.get("resources") or {}
    limit = quantity_bytes((res.get("limits") or {}).get("memory", ""))
    if limit is None or limit < cap * 1.05:
        errors.append(f"{where}: memory limit must be at least --capacity ({cap_arg}) + 5%")
    request = quantity_bytes((res.get("requests") or {}).get("memory", ""))
    if request is None or request < cap:
        errors.append(f"{where}: memory request must be at least --capacity ({cap_arg})")
    pool = flag_value(args, "--pool-file")
    if pool and doc.kind == "StatefulSet":
        templates = {t["metadata"]["name"]: t for t in doc.obj["spec"].get("volumeClaimTemplates") or []}
        mounts = [m for m in c.get("volumeMounts") or []
                  if pool.startswith(m.get("mountPath", "").rstrip("/") + "/")]
        need = cap + cap / 4096 * 32
        for m in mounts:
            t = templates.get(m.get("name"))
            if t is None:
                continue
            size = quantity_bytes(t["spec"]["resources"]["requests"].get("storage", ""))
            if size is None or size < need:
                errors.append(f"{where}: volume {m['name']!r} must hold --capacity plus "
                              f"32 bytes per page ({need / (1 << 20):.0f} MiB)")
    return errors


def check_object(doc, world, namespaces):
    obj, errors = doc.obj, []
    kind, namespace = doc.kind, doc.namespace
    if kind not in CLUSTER_SCOPED:
        if not namespace:
            errors.append("metadata.namespace is missing")
        elif namespace not in namespaces:
            errors.append(f"namespace {namespace!r} is not defined by any manifest")
    spec = obj.get("spec") or {}

    template = pod_template(obj)
    if template:
        labels, pod_spec = template
        selector = (spec.get("selector") or {}).get("matchLabels")
        if kind in WORKLOADS - {"Job"} and not selects(selector, labels):
            errors.append("spec.selector.matchLabels does not match the template labels")
        sources = {"claim_templates": {(t.get("metadata") or {}).get("name")
                                       for t in spec.get("volumeClaimTemplates") or []}}
        containers = (pod_spec.get("initContainers") or []) + (pod_spec.get("containers") or [])
        for c in containers:
            errors += check_container(c, pod_spec, sources, world, namespace)
            errors += check_rmem_sizing(doc, c)
        for v in pod_spec.get("volumes") or []:
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and not world.find("PersistentVolumeClaim", namespace, claim):
                errors.append(f"volume {v.get('name')!r}: PersistentVolumeClaim {claim!r} is not defined")
            cm = (v.get("configMap") or {}).get("name")
            if cm and not v["configMap"].get("optional") and not world.find("ConfigMap", namespace, cm):
                errors.append(f"volume {v.get('name')!r}: ConfigMap {cm!r} is not defined")

    if kind == "StatefulSet":
        svc = world.find("Service", namespace, spec.get("serviceName"))
        if not svc:
            errors.append(f"serviceName {spec.get('serviceName')!r} names no Service")
        elif (svc[0].obj.get("spec") or {}).get("clusterIP") != "None":
            errors.append(f"Service {spec.get('serviceName')!r} is not headless (clusterIP: None)")

    if kind == "Service" and spec.get("selector"):
        backends = [(d, t) for d, labels, t in world.pods(namespace)
                    if selects(spec["selector"], labels)]
        if not backends:
            errors.append("spec.selector matches no pod template")
        for port in spec.get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            for d, pod_spec in backends:
                cports = [p for c in pod_spec.get("containers") or [] for p in c.get("ports") or []]
                if target not in {p.get("containerPort") for p in cports} | {p.get("name") for p in cports}:
                    errors.append(f"port {port.get('name')!r}: targetPort {target!r} "
                                  f"is not a port of {d.kind}/{d.name}")

    if kind == "PodDisruptionBudget":
        selector = (spec.get("selector") or {}).get("matchLabels")
        if not any(selects(selector, labels) for _, labels, _ in world.pods(namespace)):
            errors.append("spec.selector matches no pod template")
    return errors


def check_kustomization(path, obj, manifests_docs):
    """Kustomize's view: fields, listed files, image overrides, namespace."""
    errors = []
    if obj.get("apiVersion") != KUSTOMIZE_API:
        errors.append(f"apiVersion must be {KUSTOMIZE_API}")
    unknown = sorted(set(obj) - KUSTOMIZATION_FIELDS)
    if unknown:
        errors.append(f"unknown fields: {', '.join(unknown)}")
    base = os.path.dirname(path)
    listed = []
    resources = obj.get("resources")
    if not isinstance(resources, list) or not resources:
        errors.append("resources must be a non-empty list")
        resources = []
    for r in resources:
        if not isinstance(r, str):
            errors.append(f"resource {r!r} is not a path")
            continue
        target = os.path.normpath(os.path.join(base, r))
        if os.path.isdir(target):
            if not any(os.path.isfile(os.path.join(target, k)) for k in
                       ("kustomization.yaml", "kustomization.yml", "Kustomization")):
                errors.append(f"resource {r!r} is a directory without a kustomization")
        elif not os.path.isfile(target):
            errors.append(f"resource {r!r} does not exist")
        else:
            listed.append(target)
    images = set()
    for target in listed:
        for d in manifests_docs.get(target, []):
            t = pod_template(d.obj)
            pod_spec = t[1] if t else {}
            for c in (pod_spec.get("containers") or []) + (pod_spec.get("initContainers") or []):
                # kustomize matches the name without tag or digest
                images.add(re.sub(r"(@.*|:[^/:]*)$", "", str(c.get("image", ""))))
            ns = d.namespace
            if obj.get("namespace") and ns and ns != obj["namespace"]:
                errors.append(f"{os.path.relpath(target, base)}: {d.kind}/{d.name} is in "
                              f"{ns!r}, the kustomization sets {obj['namespace']!r}")
    for i in obj.get("images") or []:
        if not isinstance(i, dict) or "name" not in i:
            errors.append(f"images entry {i!r} has no name")
        elif i["name"] not in images:
            errors.append(f"images entry {i['name']!r} matches no image of the resources")
        elif not set(i) & {"newName", "newTag", "digest"}:
            errors.append(f"images entry {i['name']!r} changes nothing")
    return errors, listed


def is_kustomization(path):
    return os.path.basename(path) in ("kustomization.yaml", "kustomization.yml")


def find_yaml(roots):
    files = []
    for root in roots:
        if os.path.isfile(root):
            files.append(root)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            files += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if f.endswith((".yaml", ".yml"))]
    return [os.path.normpath(f) for f in files]


def check_tree(roots, versions, shown_from):
    """Checks every file under roots; returns {shown path: [errors]} in order."""
    files = find_yaml(roots)
    results = {f: [] for f in files}
    docs, per_file, kustomizations = [], {}, []
    for f in files:
        try:
            loaded = load_documents(f)
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
            results[f].append(f"cannot parse: {short(e)}")
            continue
        if not loaded:
            results[f].append("no YAML document")
        if is_kustomization(f):
            if len(loaded) != 1 or not isinstance(loaded[0], dict) or loaded[0].get("kind") != "Kustomization":
                results[f].append("a kustomization file holds exactly one Kustomization")
            else:
                kustomizations.append((f, loaded[0]))
            continue
        per_file[f] = []
        for i, obj in enumerate(loaded):
            d = Doc(f, i, obj if isinstance(obj, dict) else {})
            if not isinstance(obj, dict):
                results[f].append(f"document {i + 1} is not a mapping")
                continue
            missing = [k for k in ("apiVersion", "kind") if not isinstance(obj.get(k), str)]
            if not isinstance(d.name, str) or not d.name:
                missing.append("metadata.name")
            if missing:
                results[f].append(f"document {i + 1}: missing {', '.join(missing)}")
                continue
            docs.append(d)
            per_file[f].append(d)

    world = World(docs)
    namespaces = {d.name for d in docs if d.kind == "Namespace"}
    seen = {}
    for d in docs:
        key = (d.obj["apiVersion"].split("/")[0] if "/" in d.obj["apiVersion"] else "",
               d.kind, d.namespace, d.name)
        if key in seen:
            results[d.path].append(f"{d.label()}: defined twice (also in {seen[key]})")
        seen[key] = os.path.relpath(d.path, shown_from)
        for e in schema_errors(d.obj, versions) + check_object(d, world, namespaces):
            results[d.path].append(f"{d.label()}: {e}")

    listed = set()
    for f, k in kustomizations:
        errors, files_listed = check_kustomization(f, k, per_file)
        results[f] += errors
        listed |= set(files_listed)
    for f in per_file:
        if f not in listed:
            results[f].append("not listed in any kustomization.yaml")
    return {os.path.relpath(f, shown_from): e for f, e in results.items()}


# --- the self-check ------------------------------------------------------------

# Two documents: every broken variant is in the second one, so the
# self-check also shows that documents after the first are checked.
GOOD_DEPLOYMENT = """\
apiVersion: v1
kind: Namespace
metadata:
  name: selfcheck
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: app
  namespace: selfcheck
spec:
  replicas: 1
  selector:
    matchLabels: {app: a}
  template:
    metadata:
      labels: {app: a}
    spec:
      containers:
        - name: c
          image: example:1
          env:
            - {name: WHO, value: me}
          args: ["--who=$(WHO)"]
          securityContext:
            readOnlyRootFilesystem: true
"""
KUSTOMIZATION = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [app.yaml]
"""

# (what is broken, replacement in GOOD_DEPLOYMENT or a whole file set,
#  a fragment the rejection must mention)
SELF_CHECKS = [
    ("the unbroken control case", {}, None),
    ("a misspelled field (replica)", {"  replicas: 1": "  replica: 1"}, "'replica' was unexpected"),
    ("a wrong type (replicas: \"one\")", {"  replicas: 1": "  replicas: \"one\""}, "is not of type"),
    ("a nested unknown field (readOnlyRootFileSystem)",
     {"readOnlyRootFilesystem": "readOnlyRootFileSystem"}, "'readOnlyRootFileSystem' was unexpected"),
    ("an unknown kind (Deploymnet)", {"kind: Deployment": "kind: Deploymnet"}, "no schema"),
    ("an undefined $(VAR) in args", {"--who=$(WHO)": "--who=$(WHOM)"}, "$(WHOM) is not an environment variable"),
    ("a selector not matching the template", {"matchLabels: {app: a}": "matchLabels: {app: b}"},
     "does not match the template labels"),
    ("a duplicate key", {"  replicas: 1": "  replicas: 1\n  replicas: 2"}, "duplicate key"),
    ("a kustomization listing a missing file", {"KUSTOMIZATION": "resources: [app.yaml, gone.yaml]"},
     "'gone.yaml' does not exist"),
]


def self_check(versions):
    """Each broken variant must fail for its reason; the control must pass."""
    outcomes = []
    for what, edits, expect in SELF_CHECKS:
        deployment, kustomization = GOOD_DEPLOYMENT, KUSTOMIZATION
        for old, new in edits.items():
            if old == "KUSTOMIZATION":
                kustomization = kustomization.replace("resources: [app.yaml]", new)
                continue
            assert old in deployment, old
            deployment = deployment.replace(old, new, 1)
        with tempfile.TemporaryDirectory(prefix="rmem-k8s-selfcheck-") as tmp:
            with open(os.path.join(tmp, "app.yaml"), "w") as f:
                f.write(deployment)
            with open(os.path.join(tmp, "kustomization.yaml"), "w") as f:
                f.write(kustomization)
            errors = [e for es in check_tree([tmp], versions, tmp).values() for e in es]
        if expect is None:
            ok = not errors
            detail = errors
        else:
            ok = any(expect in e for e in errors)
            detail = errors or ["accepted"]
            if errors and not ok:
                detail = [f"rejected, but not for {expect!r}:"] + errors
        verb = "must accept" if expect is None else "must reject"
        outcomes.append((f"self-check: {verb} {what}", [] if ok else detail))
    return outcomes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k8s-version", action="append", required=True,
                    help="Kubernetes version to validate against (repeatable)")
    ap.add_argument("--self-check", action="store_true",
                    help="first require deliberately broken manifests to be rejected")
    ap.add_argument("--root", default=".", help="paths are shown relative to this")
    ap.add_argument("paths", nargs="+", help="manifest files or directories")
    args = ap.parse_args()

    outcomes = self_check(args.k8s_version) if args.self_check else []
    results = check_tree([os.path.join(args.root, p) for p in args.paths],
                         args.k8s_version, args.root)
    if not results:
        outcomes.append(("no manifest found under " + " ".join(args.paths), ["nothing to check"]))
    outcomes += list(results.items())

    passed = failed = 0
    for name, errors in outcomes:
        if errors:
            failed += 1
            print(f"FAILED {name}")
            for e in errors:
                print(f"         {e}")
        else:
            passed += 1
            print(f"ok     {name}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
