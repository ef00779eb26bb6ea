"""What must hold for every set of values the chart check renders (`always`): schemas and
lint, least privilege, the tokens kept secret, names and ports that resolve, forkd found,
one scaler, /dev/kvm only for the vm driver, the policy, the dashboards, TLS and the admin
token as asked."""

from __future__ import annotations

import json
import subprocess
import tempfile
from typing import Any

import kubernetes_validate
from helm_python import chart as helm

from rendered import (
    ADMIN_TOKEN_SECRET,
    CHART,
    CRD_GROUPS,
    FORKD_TOKEN_SECRET,
    NAMESPACE,
    RELEASE,
    Failed,
    Objects,
    arg,
    check,
    container,
    find,
    mounted_file,
    one,
    token_of,
    workloads,
)


def validate_schemas(objects: Objects, kube_version: str) -> None:
    for o in objects:
        document = {k: v for k, v in o.items() if k != "__source"}
        where = f"{o['__source']}: {o['kind']}/{o['metadata']['name']}"
        if o["apiVersion"] in CRD_GROUPS:
            continue
        try:
            kubernetes_validate.validate(document, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            raise Failed(f"{where} is not valid Kubernetes {kube_version}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            raise Failed(f"{where}: {e.message}")


def lint(values: dict[str, Any], kube_version: str) -> None:
    """Helm's lint, warnings counted as errors. (Helm 4's lint only logs a template's `fail`:
    bad values are caught by rendering, in BAD_VALUES.)"""
    report = helm.lint(
        str(CHART), values, namespace=NAMESPACE, strict=True, kube_version=f"v{kube_version}.0"
    )
    check(not report["errors"], f"helm lint: {report['errors']}")
    errors = [m for m in report["messages"] if m["severity"] >= 3]
    check(not errors, f"helm lint: {errors}")


def no_duplicates(objects: Objects) -> None:
    seen = set()
    for o in objects:
        key = (o["kind"], o["metadata"]["name"])
        check(key not in seen, f"two objects are {key}")
        seen.add(key)
        check(
            o["metadata"].get("namespace") == NAMESPACE,
            f"{key} is not in the release's namespace",
        )


def locked_down(objects: Objects) -> None:
    """Least privilege: nothing privileged, no capability, nothing from the host but /dev/kvm."""
    for w in workloads(objects):
        name = w["metadata"]["name"]
        pod = w["spec"]["template"]["spec"]
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            check(not pod.get(host), f"{name}: {host}")
        check(pod["securityContext"].get("runAsNonRoot") is True, f"{name}: may run as root")
        check(
            pod["securityContext"].get("seccompProfile", {}).get("type") == "RuntimeDefault",
            f"{name}: seccomp is not RuntimeDefault",
        )
        check(pod.get("automountServiceAccountToken") is False, f"{name}: gets an API token")
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c.get("securityContext", {})
            check(not sc.get("privileged"), f"{name}/{c['name']} is privileged")
            check(sc.get("allowPrivilegeEscalation") is False, f"{name}/{c['name']}: escalation")
            check(sc.get("readOnlyRootFilesystem") is True, f"{name}/{c['name']}: writable root")
            caps = sc.get("capabilities", {})
            check(caps.get("drop") == ["ALL"], f"{name}/{c['name']}: capabilities not dropped")
            check(not caps.get("add"), f"{name}/{c['name']}: adds capabilities {caps.get('add')}")
        for v in pod.get("volumes", []):
            if "hostPath" in v:
                check(
                    v["hostPath"] == {"path": "/dev/kvm", "type": "CharDevice"},
                    f"{name}: mounts the host's {v['hostPath']}",
                )


def token_stays_secret(objects: Objects, values: dict[str, Any]) -> None:
    """The token reaches the pods as a file from the Secret, never through env or args."""
    token = token_of(objects)
    existing = values.get("forkd", {}).get("token", {}).get("existingSecret")
    if existing:
        check(token is None, "a Secret is rendered although existingSecret is given")
        secret_name = existing
    else:
        check(token and len(token) >= 32, "the chart's token is missing or short")
        secret_name = one(objects, "Secret", FORKD_TOKEN_SECRET)["metadata"]["name"]
    for o in objects:
        if o["kind"] == "Secret":
            continue
        text = json.dumps(o)
        check(token is None or token not in text, f"{o['kind']}/{o['metadata']['name']} holds the token")
    for w in workloads(objects):
        name = w["metadata"]["name"]
        c = container(w)
        for env in c.get("env", []):
            check("secretKeyRef" not in env.get("valueFrom", {}), f"{name}: env {env['name']} from a Secret")
        check(not c.get("envFrom"), f"{name}: envFrom")
        flag = "--forkd-token-file" if w["kind"] == "Deployment" else "--token-file"
        volume, key = mounted_file(w, arg(w, flag))
        check("secret" in volume, f"{name}: the token file is not from a Secret")
        check(volume["secret"]["secretName"] == secret_name, f"{name}: token from {volume['secret']}")
        keys = [item["key"] for item in volume["secret"].get("items", [])] or [key]
        check(key in keys, f"{name}: the token file {key} is not a key of the Secret")


def mounts_resolve(objects: Objects) -> None:
    for w in workloads(objects):
        pod = w["spec"]["template"]["spec"]
        names = {v["name"] for v in pod.get("volumes", [])}
        for m in container(w).get("volumeMounts", []):
            check(m["name"] in names, f"{w['metadata']['name']}: mount {m['name']} has no volume")
        for v in pod.get("volumes", []):
            if "configMap" in v:
                one(objects, "ConfigMap", v["configMap"]["name"])


def services_reach_pods(objects: Objects) -> None:
    """Each Service selects one workload's pods, on a port its container declares."""
    for s in find(objects, "Service"):
        selector = s["spec"]["selector"]
        targets = [
            w
            for w in workloads(objects)
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        check(len(targets) == 1, f"Service {s['metadata']['name']} selects {len(targets)} workloads")
        ports = {p["name"] for p in container(targets[0])["ports"]}
        for p in s["spec"]["ports"]:
            check(p["targetPort"] in ports, f"Service {s['metadata']['name']}: no port {p['targetPort']}")


def forkd_is_found_and_reachable(objects: Objects) -> None:
    forkd = one(objects, "DaemonSet")
    scaler = one(objects, "Deployment")
    svc = one(objects, "Service", forkd["metadata"]["name"])
    check(svc["spec"].get("clusterIP") == "None", "the forkd Service is not headless")
    check(svc["spec"].get("publishNotReadyAddresses") is False, "unready forkd pods are published")
    port = svc["spec"]["ports"][0]["port"]
    check(
        arg(scaler, "--forkd-dns") == f"{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port}",
        f"squall up looks for forkd at {arg(scaler, '--forkd-dns')}",
    )
    # Clones listen on the pod's IP, which the downward API gives.
    check(arg(forkd, "--clone-ip") == "$(POD_IP)", "forkd's --clone-ip is not the pod IP")
    env = {e["name"]: e for e in container(forkd).get("env", [])}
    check(
        env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP",
        "POD_IP does not come from status.podIP",
    )
    check(arg(forkd, "--listen") == f"0.0.0.0:{port}", f"forkd listens on {arg(forkd, '--listen')}")
    for w, path, port_name in ((forkd, "/healthz", "api"), (scaler, "/healthz", "admin")):
        for probe in ("readinessProbe", "livenessProbe"):
            get = container(w)[probe]["httpGet"]
            check(get == {"path": path, "port": port_name}, f"{w['kind']} {probe}: {get}")


def one_scaler(objects: Objects) -> None:
    scaler = one(objects, "Deployment")
    check(scaler["spec"]["replicas"] == 1, "more than one scaler")
    check(scaler["spec"]["strategy"]["type"] == "Recreate", "two scalers may overlap in a rollout")


def kvm_only_for_vm(objects: Objects, values: dict[str, Any]) -> None:
    forkd = one(objects, "DaemonSet")
    pod = forkd["spec"]["template"]["spec"]
    kvm = [v for v in pod["volumes"] if v.get("hostPath", {}).get("path") == "/dev/kvm"]
    shm = [m for m in container(forkd)["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    vm = values.get("driver") == "vm"
    check(bool(kvm) == vm, f"/dev/kvm {'not ' if vm else ''}mounted with driver {values.get('driver', 'fork')}")
    check(bool(shm) == vm, f"/dev/shm {'not ' if vm else ''}mounted with driver {values.get('driver', 'fork')}")
    check(
        not any("/dev/kvm" in json.dumps(w) for w in workloads(objects) if w["kind"] == "Deployment"),
        "the scaler gets /dev/kvm",
    )


def policy_passes(objects: Objects, squall: str | None) -> str:
    scaler = one(objects, "Deployment")
    volume, key = mounted_file(scaler, arg(scaler, "--policy"))
    check("configMap" in volume, "the policy is not from a ConfigMap")
    policy = one(objects, "ConfigMap", volume["configMap"]["name"])["data"][key]
    if squall:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(policy)
            f.flush()
            out = subprocess.run([squall, "policy", "check", f.name], capture_output=True, text=True)
        check(out.returncode == 0, f"squall policy check refuses the chart's policy:\n{out.stderr}")
    return policy


def dashboards_labelled(objects: Objects, values: dict[str, Any]) -> None:
    if not list((CHART / "dashboards").glob("*.json")):
        return
    label = values.get("dashboards", {}).get("label", "grafana_dashboard")
    board = one(objects, "ConfigMap", f"{RELEASE}-dashboards")
    check(board["metadata"]["labels"].get(label) == "1", f"the dashboards lack the {label} label")
    check(board["data"], "no dashboard in the ConfigMap")
    for name, text in board["data"].items():
        check(json.loads(text).get("title"), f"dashboard {name} has no title")


TLS_DIR = "/etc/squall/tls"


def tls_as_asked(objects: Objects, values: dict[str, Any]) -> None:
    """With tls.secretName, squall up gets --tls-cert/--tls-key at files of that Secret, mounted
    read-only as a directory (so a renewal reaches the pod); without it, nothing of TLS."""
    scaler = one(objects, "Deployment")
    args = container(scaler)["args"]
    secret = values.get("tls", {}).get("secretName")
    mounts = [m for m in container(scaler).get("volumeMounts", []) if m["mountPath"] == TLS_DIR]
    if not secret:
        check("--tls-cert" not in args and "--tls-key" not in args, f"TLS flags without TLS: {args}")
        check(not mounts, "a TLS volume without TLS")
        return
    check(args.index("--tls-cert") < args.index("--"), "--tls-cert is given to the app, not squall up")
    for flag, key in (("--tls-cert", "tls.crt"), ("--tls-key", "tls.key")):
        volume, path = mounted_file(scaler, arg(scaler, flag))
        check(volume.get("secret", {}).get("secretName") == secret, f"{flag} is not from Secret {secret}: {volume}")
        items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])}
        check(items.get(path, path) == key, f"{flag} reads key {items.get(path, path)}, not {key}")
    check(len(mounts) == 1 and mounts[0].get("readOnly") is True, f"the TLS mount is not read-only: {mounts}")
    check("subPath" not in mounts[0], "a subPath mount never sees a renewed certificate")
    check(not find(objects, "Secret", secret), "the chart renders the user's TLS Secret")


ADMIN_TOKEN_DIR = "/etc/squall/admin-token"


def admin_token_as_asked(objects: Objects, values: dict[str, Any]) -> None:
    """With admin.token.enabled, squall up gets --admin-token-file at a file of the admin
    Secret (the chart's or the user's), mounted read-only as a directory so a rotation reaches
    the pod, the token never anywhere but in that Secret, and Prometheus scrapes /metrics with
    it unless admin.metricsOpen; without it, nothing of an admin token anywhere."""
    scaler = one(objects, "Deployment")
    args = container(scaler)["args"]
    admin = values.get("admin", {})
    token_values = admin.get("token", {})
    mounts = [m for m in container(scaler).get("volumeMounts", []) if m["mountPath"] == ADMIN_TOKEN_DIR]
    monitors = find(objects, "ServiceMonitor", RELEASE)
    endpoints = [e for m in monitors for e in m["spec"]["endpoints"]]
    if not token_values.get("enabled"):
        check("--admin-token-file" not in args and "--admin-metrics-open" not in args, f"admin flags: {args}")
        check(not mounts, "an admin token volume without a token")
        check(not find(objects, "Secret", ADMIN_TOKEN_SECRET), "an admin token Secret without a token")
        check(all("authorization" not in e for e in endpoints), "the ServiceMonitor sends a token")
        return
    check(args.index("--admin-token-file") < args.index("--"), "--admin-token-file is given to the app")
    secret = token_values.get("existingSecret") or ADMIN_TOKEN_SECRET
    key = token_values.get("existingSecretKey", "token") if token_values.get("existingSecret") else "token"
    volume, path = mounted_file(scaler, arg(scaler, "--admin-token-file"))
    check(volume.get("secret", {}).get("secretName") == secret, f"the admin token is not from Secret {secret}: {volume}")
    items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])}
    check(items.get(path, path) == key, f"--admin-token-file reads key {items.get(path, path)}, not {key}")
    check(len(mounts) == 1 and mounts[0].get("readOnly") is True, f"the admin token mount: {mounts}")
    check("subPath" not in mounts[0], "a subPath mount never sees a rotated token")
    if token_values.get("existingSecret"):
        check(not find(objects, "Secret", ADMIN_TOKEN_SECRET), "the chart made an admin Secret although one exists")
    else:
        token = token_of(objects, ADMIN_TOKEN_SECRET)
        check(token and len(token) >= 32 and token.isprintable() and " " not in token, "the admin token is missing or weak")
        check(token != token_of(objects), "the admin token is forkd's")
        for o in objects:
            check(o["kind"] == "Secret" or token not in json.dumps(o), f"{o['kind']}/{o['metadata']['name']} holds the admin token")
    metrics_open = bool(admin.get("metricsOpen"))
    check(("--admin-metrics-open" in args) == metrics_open, f"--admin-metrics-open with metricsOpen={metrics_open}: {args}")
    for endpoint in endpoints:
        if metrics_open:
            check("authorization" not in endpoint, "the ServiceMonitor sends a token to an open /metrics")
        else:
            check(
                endpoint.get("authorization")
                == {"type": "Bearer", "credentials": {"name": secret, "key": key}},
                f"the ServiceMonitor does not scrape with the admin token: {endpoint}",
            )


def always(objects: Objects, values: dict[str, Any], squall: str | None) -> None:
    no_duplicates(objects)
    locked_down(objects)
    token_stays_secret(objects, values)
    mounts_resolve(objects)
    services_reach_pods(objects)
    forkd_is_found_and_reachable(objects)
    one_scaler(objects)
    kvm_only_for_vm(objects, values)
    policy_passes(objects, squall)
    dashboards_labelled(objects, values)
    tls_as_asked(objects, values)
    admin_token_as_asked(objects, values)
