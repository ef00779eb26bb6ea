#!/usr/bin/env python3
"""Renders charts/squall the way a user would install it and checks what comes out.

For the default values and for several sets of values a user would give (the vm driver, an
external Prometheus, a policy of their own, an existing token Secret, TLS from a Secret, the
admin listener's token generated, given or from an existing Secret with /metrics protected or
open, forkd on chosen nodes),
it renders the chart with Helm's own engine (helm-python-sdk, no helm binary, no cluster),
runs Helm's lint, validates every rendered object against the Kubernetes schemas of one fixed
version (kubernetes-validate, strict: unknown fields are errors), and asserts what a user
would look for: the forkd Service is headless, /dev/kvm is mounted only for the vm driver, no
container is privileged, the tokens never appear in the environment, the probes need no
token, the ServiceMonitor scrapes a protected /metrics with the admin token, the arguments and the
Services point at things that exist, and the policy passes `squall policy check`. Values that
cannot work must fail the render with a message that names them.

Usage: check.py [--squall PATH/TO/squall] [--kube-version 1.30]
It needs the virtualenv that scripts/install-deps makes (see charts/squall/README.md).
Without --squall (or $SQUALL_BIN) the policy check is skipped, and says so.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import kubernetes_validate
import yaml
from helm_python import chart as helm
from helm_python.errors import HelmError

CHART = Path(__file__).resolve().parent.parent
REPO = CHART.parent.parent
RELEASE = "squall"
NAMESPACE = "apps"
# Kinds that come from CRDs: the core schemas do not know them, so they are checked here
# structurally instead (by the assertions of the cases that render them).
CRD_GROUPS = {"monitoring.coreos.com/v1"}

Objects = list[dict[str, Any]]


class Failed(Exception):
    """One assertion of one case did not hold."""


def check(condition: Any, message: str) -> None:
    if not condition:
        raise Failed(message)


# ---------------------------------------------------------------------------------------------
# Rendering and looking things up in what was rendered.


def render(values: dict[str, Any], chart_dir: Path = CHART) -> Objects:
    """Renders the chart and returns every object, in a stable order."""
    with helm.Chart.load(str(chart_dir)) as loaded:
        manifests = loaded.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path in sorted(manifests):
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for document in yaml.safe_load_all(manifests[path]):
            if document:
                document["__source"] = path
                objects.append(document)
    return objects


def find(objects: Objects, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        o
        for o in objects
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objects: Objects, kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(objects, kind, name)
    check(len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def workloads(objects: Objects) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Deployment", "DaemonSet")]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    check(len(containers) == 1, f"{workload['metadata']['name']}: expected one container")
    return containers[0]


def arg(workload: dict[str, Any], flag: str) -> str:
    args = container(workload)["args"]
    check(flag in args, f"{workload['metadata']['name']}: no {flag} in {args}")
    return args[args.index(flag) + 1]


def mounted_file(workload: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The volume a file path lies in, and the path inside that volume."""
    pod = workload["spec"]["template"]["spec"]
    for mount in container(workload).get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            volume = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            check(volume, f"mount {mount['name']} has no volume")
            return volume[0], path[len(prefix) :]
    raise Failed(f"{workload['metadata']['name']}: nothing is mounted at {path}")


FORKD_TOKEN_SECRET = f"{RELEASE}-forkd-token"
ADMIN_TOKEN_SECRET = f"{RELEASE}-admin-token"


def token_of(objects: Objects, secret: str = FORKD_TOKEN_SECRET) -> str | None:
    """The token in the chart's Secret `secret`, when the chart made one."""
    secrets = find(objects, "Secret", secret)
    if not secrets:
        return None
    return base64.b64decode(one(objects, "Secret", secret)["data"]["token"]).decode()


# ---------------------------------------------------------------------------------------------
# What must hold for every set of values.


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


# ---------------------------------------------------------------------------------------------
# The cases: the values a user would give, and what they would check on top.


def defaults(objects: Objects, squall: str | None) -> None:
    check(not find(objects, "ServiceMonitor"), "a ServiceMonitor without asking")
    check(not find(objects, "PodDisruptionBudget"), "a PodDisruptionBudget without asking")
    shipped = REPO / "policies" / "default.yaml"
    if shipped.exists():
        check(
            (CHART / "files" / "policy.yaml").read_text() == shipped.read_text(),
            "charts/squall/files/policy.yaml differs from policies/default.yaml: copy it again",
        )
    scaler = one(objects, "Deployment")
    args = container(scaler)["args"]
    check(args[0] == "up", f"the Deployment runs {args[:1]}")
    check(args[args.index("--") + 1 :] == ["/usr/local/bin/squall", "warm-app"], f"app: {args}")
    check(arg(scaler, "--driver") == "fork", "default driver")
    check(arg(scaler, "--worker-protocol") == "http1", "default worker protocol")
    for w in workloads(objects):
        annotations = w["spec"]["template"]["metadata"]["annotations"]
        check(annotations.get("prometheus.io/scrape") == "true", f"{w['kind']}: not scraped")
        port = annotations.get("prometheus.io/port")
        check(
            any(str(p["containerPort"]) == port for p in container(w)["ports"]),
            f"{w['kind']}: scrape port {port} is not a container port",
        )


def vm(objects: Objects, squall: str | None) -> None:
    forkd = one(objects, "DaemonSet")
    pod = forkd["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in container(forkd)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    check(volumes[mounts["/dev/kvm"]]["hostPath"]["type"] == "CharDevice", "/dev/kvm is no char device")
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    check(shm.get("medium") == "Memory" and shm.get("sizeLimit"), f"/dev/shm: {shm}")
    check("/tmp" in mounts, "QEMU has no writable /tmp")
    check(pod["securityContext"].get("supplementalGroups") == [108], "the kvm group is not added")
    limits = container(forkd)["resources"].get("limits", {})
    check(limits.get("devices.kubevirt.io/kvm") == 1, f"no KVM device requested: {limits}")
    check(arg(one(objects, "Deployment"), "--driver") == "vm", "squall up not told --driver vm")
    check("--no-vm-merge" not in container(forkd)["args"], "KSM merging is off by default")


def vm_without_merging(objects: Objects, squall: str | None) -> None:
    check("--no-vm-merge" in container(one(objects, "DaemonSet"))["args"], "forkd not told --no-vm-merge")


def external_prometheus(objects: Objects, squall: str | None) -> None:
    monitors = find(objects, "ServiceMonitor")
    check(len(monitors) == 2, f"{len(monitors)} ServiceMonitors (expected the scaler's and forkd's)")
    covered = set()
    for m in monitors:
        check(m["apiVersion"] == "monitoring.coreos.com/v1", f"ServiceMonitor {m['apiVersion']}")
        check(m["metadata"]["labels"].get("release") == "prometheus", "the release label is missing")
        check(m["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE], "wrong namespace")
        selector = m["spec"]["selector"]["matchLabels"]
        for endpoint in m["spec"]["endpoints"]:
            check(endpoint["path"] == "/metrics" and endpoint["interval"] == "30s", f"{endpoint}")
            for s in find(objects, "Service"):
                if selector.items() <= s["metadata"]["labels"].items():
                    if endpoint["port"] in {p["name"] for p in s["spec"]["ports"]}:
                        covered.add(s["metadata"]["name"])
    check(covered == {f"{RELEASE}-admin", f"{RELEASE}-forkd"}, f"scraped Services: {covered}")


def custom_policy(objects: Objects, squall: str | None) -> None:
    policy = policy_passes(objects, squall)
    check(policy.strip() == EXAMPLE_POLICY.strip(), "the ConfigMap does not hold the given policy")
    check(arg(one(objects, "Deployment"), "--max-concurrency") == "4", "--max-concurrency")


def existing_secret(objects: Objects, squall: str | None) -> None:
    check(not find(objects, "Secret"), "the chart made a Secret although one exists")
    for w in workloads(objects):
        check(
            "checksum/token" not in w["spec"]["template"]["metadata"]["annotations"],
            "a checksum of a token the chart does not know",
        )


def given_token(objects: Objects, squall: str | None) -> None:
    check(token_of(objects) == "a-token-of-the-users-own-choosing-0123456789", "the Secret ignores forkd.token.value")


def forkd_on_chosen_nodes(objects: Objects, squall: str | None) -> None:
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    check(pod["nodeSelector"] == {"squall/workers": "true"}, f"nodeSelector {pod.get('nodeSelector')}")
    check(pod["tolerations"][0]["key"] == "squall/workers", f"tolerations {pod.get('tolerations')}")
    check(arg(one(objects, "DaemonSet"), "--max-clones") == "200", "--max-clones")
    check(not one(objects, "Deployment")["spec"]["template"]["spec"].get("nodeSelector"), "scaler pinned too")
    pdb = one(objects, "PodDisruptionBudget")
    check(pdb["spec"]["selector"]["matchLabels"].items() <= one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"].items(), "the PDB selects nothing")


def grpc_app(objects: Objects, squall: str | None) -> None:
    scaler = one(objects, "Deployment")
    check(arg(scaler, "--worker-protocol") == "h2c", "squall up not told --worker-protocol h2c")
    check(arg(scaler, "--driver") == "spawn", "squall up not told --driver spawn")


def tls_on(objects: Objects, squall: str | None) -> None:
    check(arg(one(objects, "Deployment"), "--tls-cert") == f"{TLS_DIR}/tls.crt", "--tls-cert")
    check(one(objects, "Service", RELEASE)["spec"]["ports"][0]["port"] == 443, "service.port")


def admin_token_scraped(objects: Objects, squall: str | None) -> None:
    check(find(objects, "Secret", ADMIN_TOKEN_SECRET), "no admin token Secret")
    monitor = one(objects, "ServiceMonitor", RELEASE)
    check("authorization" in monitor["spec"]["endpoints"][0], "the scaler's ServiceMonitor sends no token")
    forkd = one(objects, "ServiceMonitor", f"{RELEASE}-forkd")
    check("authorization" not in forkd["spec"]["endpoints"][0], "forkd's open /metrics is sent the admin token")


def admin_token_existing(objects: Objects, squall: str | None) -> None:
    check(not find(objects, "Secret", ADMIN_TOKEN_SECRET), "the chart made an admin Secret although one exists")
    endpoint = one(objects, "ServiceMonitor", RELEASE)["spec"]["endpoints"][0]
    check(endpoint.get("authorization", {}).get("credentials", {}).get("key") == "bearer", f"{endpoint}")


def admin_token_given_metrics_open(objects: Objects, squall: str | None) -> None:
    check(token_of(objects, ADMIN_TOKEN_SECRET) == "an-admin-token-of-the-users-own-0123456789", "the Secret ignores admin.token.value")
    check("--admin-metrics-open" in container(one(objects, "Deployment"))["args"], "--admin-metrics-open")
    check("authorization" not in one(objects, "ServiceMonitor", RELEASE)["spec"]["endpoints"][0], "a token for an open /metrics")


EXAMPLE_POLICY = (REPO / "policies" / "examples" / "latency-slo.yaml").read_text()

CASES: list[tuple[str, dict[str, Any], Callable[[Objects, str | None], None]]] = [
    ("default values", {}, defaults),
    (
        "vm driver with KVM",
        {
            "driver": "vm",
            "vm": {"kvm": {"resourceName": "devices.kubevirt.io/kvm", "supplementalGroups": [108]}},
        },
        vm,
    ),
    ("vm driver, clones kept out of KSM", {"driver": "vm", "vm": {"mergeMemory": False}}, vm_without_merging),
    (
        "external Prometheus (ServiceMonitor)",
        {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}, "interval": "30s"}}},
        external_prometheus,
    ),
    # Given as a values file, the way a user writes a policy into it.
    (
        "custom policy from a values file",
        helm.values_from_yaml(
            "policy:\n  inline: |\n"
            + "".join(f"    {line}\n" for line in EXAMPLE_POLICY.splitlines())
            + "app:\n  maxConcurrency: 4\n"
        ),
        custom_policy,
    ),
    (
        "existing token Secret",
        {"forkd": {"token": {"existingSecret": "my-forkd-token", "existingSecretKey": "bearer"}}},
        existing_secret,
    ),
    (
        "a gRPC app (h2c workers, spawned)",
        {"driver": "spawn", "app": {"protocol": "h2c", "command": ["/app/greeter_server"]}},
        grpc_app,
    ),
    ("TLS from a kubernetes.io/tls Secret", {"tls": {"secretName": "squall-tls"}, "service": {"port": 443}}, tls_on),
    ("token given in values", {"forkd": {"token": {"value": "a-token-of-the-users-own-choosing-0123456789"}}}, given_token),
    (
        "admin token generated, /metrics scraped with it",
        {"admin": {"token": {"enabled": True}}, "metrics": {"serviceMonitor": {"enabled": True}}},
        admin_token_scraped,
    ),
    (
        "admin token from an existing Secret, /metrics scraped with it",
        {
            "admin": {"token": {"enabled": True, "existingSecret": "my-admin", "existingSecretKey": "bearer"}},
            "metrics": {"serviceMonitor": {"enabled": True}},
        },
        admin_token_existing,
    ),
    (
        "admin token given in values, /metrics open",
        {
            "admin": {"token": {"enabled": True, "value": "an-admin-token-of-the-users-own-0123456789"}, "metricsOpen": True},
            "metrics": {"serviceMonitor": {"enabled": True}},
        },
        admin_token_given_metrics_open,
    ),
    (
        "forkd on dedicated nodes",
        {
            "forkd": {
                "maxClones": 200,
                "nodeSelector": {"squall/workers": "true"},
                "tolerations": [{"key": "squall/workers", "operator": "Exists", "effect": "NoSchedule"}],
            },
            "podDisruptionBudget": {"enabled": True},
        },
        forkd_on_chosen_nodes,
    ),
]

# Values that cannot work, and the words the failure must contain.
BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"driver": "bogus"}, 'driver must be one of fork, spawn or vm (got "bogus")'),
    ({"replicas": 2}, "replicas must be 1 (or 0), got 2"),
    ({"app": {"command": []}}, "app.command must be a non-empty list"),
    ({"app": {"protocol": "h3"}}, 'app.protocol must be http1 or h2c (got "h3")'),
    (
        {"driver": "vm", "app": {"protocol": "h2c", "command": ["/app/greeter_server"]}},
        "app.protocol h2c needs driver fork or spawn",
    ),
    (
        {"forkd": {"token": {"value": "x" * 40, "existingSecret": "mine"}}},
        "forkd.token.value and forkd.token.existingSecret are both set",
    ),
    ({"driver": "vm", "app": {"command": ["my-app"]}}, "app.command[0] must be an absolute path"),
    ({"admin": {"metricsOpen": True}}, "admin.metricsOpen needs admin.token.enabled"),
    (
        {"admin": {"token": {"existingSecret": "mine"}}},
        "admin.token.value or admin.token.existingSecret is set but admin.token.enabled is false",
    ),
    (
        {"admin": {"token": {"enabled": True, "value": "x" * 40, "existingSecret": "mine"}}},
        "admin.token.value and admin.token.existingSecret are both set",
    ),
    (
        {"admin": {"token": {"enabled": True, "value": "two words"}}},
        "admin.token.value must be printable ASCII without spaces",
    ),
]


# Values documented as a whole object (their fields are Kubernetes' own).
WHOLE_OBJECTS = {
    "resources",
    "podSecurityContext",
    "securityContext",
    "forkd.resources",
    "forkd.updateStrategy",
}


def values_documented() -> None:
    """Every value in values.yaml has a comment just above it and a row in README.md."""
    readme = (CHART / "README.md").read_text()
    stack: list[tuple[int, str]] = []
    comment = False
    for number, line in enumerate((CHART / "values.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            comment = False
            continue
        if stripped.startswith("#"):
            comment = True
            continue
        if stripped.startswith("-") or ":" not in stripped:
            continue  # an item of a list, or a continued value
        indent = len(line) - len(line.lstrip())
        key, _, rest = stripped.partition(":")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        if any(path.startswith(whole + ".") for whole in WHOLE_OBJECTS):
            continue
        is_leaf = rest.strip() != "" or path in WHOLE_OBJECTS
        if is_leaf:
            check(comment, f"values.yaml:{number}: {path} has no comment above it")
            check(f"| `{path}` |" in readme, f"README.md has no row for {path}")
        comment = False


def without_dashboards() -> None:
    """Before the dashboard JSON exists, the chart still renders, just without its ConfigMap."""
    with tempfile.TemporaryDirectory() as scratch:
        copy_dir = Path(scratch) / "squall"
        shutil.copytree(CHART, copy_dir, ignore=shutil.ignore_patterns("tests", "dashboards"))
        objects = render({}, copy_dir)
        check(not find(objects, "ConfigMap", f"{RELEASE}-dashboards"), "an empty dashboard ConfigMap")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--squall", default=os.environ.get("SQUALL_BIN"), help="the squall binary")
    parser.add_argument("--kube-version", default="1.30", help="Kubernetes schemas to validate against")
    args = parser.parse_args()
    if not args.squall:
        print("note: no --squall binary given: the policy is not checked with squall policy check")

    failures = []

    def run(name: str, body: Callable[[], None]) -> None:
        try:
            body()
            print(f"ok    {name}")
        except Failed as e:
            failures.append(name)
            print(f"FAIL  {name}: {e}")
        except Exception:  # an unexpected error is a failure of this case, not of the run
            failures.append(name)
            print(f"FAIL  {name}:\n{traceback.format_exc()}")

    for name, values, extra in CASES:

        def case(values: dict[str, Any] = values, extra: Any = extra) -> None:
            lint(values, args.kube_version)
            objects = render(copy.deepcopy(values))
            validate_schemas(objects, args.kube_version)
            always(objects, values, args.squall)
            extra(objects, args.squall)

        run(name, case)

    for values, words in BAD_VALUES:

        def refused(values: dict[str, Any] = values, words: str = words) -> None:
            try:
                render(values)
            except HelmError as e:
                check(words in str(e), f"the render failed, but not saying {words!r}: {e}")
                return
            raise Failed("the render succeeded")

        run(f"refuses {json.dumps(values)}", refused)

    run("renders before the dashboard exists", without_dashboards)
    run("every value is documented", values_documented)

    total = len(CASES) + len(BAD_VALUES) + 2
    if failures:
        print(f"chart check: {len(failures)} of {total} cases failed")
        return 1
    print(f"chart check: all {total} cases passed (Kubernetes {args.kube_version} schemas)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
