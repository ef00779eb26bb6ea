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
import copy
import json
import os
import re
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

from helm_python import chart as helm
from helm_python.errors import HelmError

from invariants import TLS_DIR, always, lint, policy_passes, validate_schemas
from rendered import (
    ADMIN_TOKEN_SECRET,
    CHART,
    NAMESPACE,
    RELEASE,
    REPO,
    Failed,
    Objects,
    arg,
    check,
    container,
    find,
    one,
    render,
    token_of,
    workloads,
)

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
    check("--start-timeout" not in container(scaler)["args"], "a start timeout although none was given")
    check(container(scaler)["startupProbe"]["failureThreshold"] == 60, "the startup probe's default five minutes")
    # The images scripts/build-images makes: named squall, tagged with the crate's version.
    cargo = REPO / "Cargo.toml"
    if cargo.exists():
        version = re.search(r'^version = "([^"]+)"', cargo.read_text(), re.M)
        check(version is not None, "no version in Cargo.toml")
        for w in workloads(objects):
            image = container(w)["image"]
            check(image == f"squall:{version.group(1)}", f"{w['kind']} runs {image}")
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
    image = container(forkd)["image"]
    check(image.startswith("squall-forkd-vm:"), f"forkd runs {image}, not the image with QEMU")
    image = container(one(objects, "Deployment"))["image"]
    check(image.startswith("squall:"), f"squall up runs {image}")
    check("--no-vm-merge" not in container(forkd)["args"], "KSM merging is off by default")


def vm_without_merging(objects: Objects, squall: str | None) -> None:
    check("--no-vm-merge" in container(one(objects, "DaemonSet"))["args"], "forkd not told --no-vm-merge")


def vm_on_tcg(objects: Objects, squall: str | None) -> None:
    args = container(one(objects, "DaemonSet"))["args"]
    check(args[args.index("--vm-accel") + 1] == "tcg", f"forkd not told --vm-accel tcg: {args}")
    scaler = one(objects, "Deployment")
    check(arg(scaler, "--start-timeout") == "600", "the guest's start timeout is not passed on")
    # The startup probe outlasts the template's start: 600 s and a minute, in 5 s periods.
    check(container(scaler)["startupProbe"]["failureThreshold"] == 132, "the startup probe gives up first")


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
        "vm driver on TCG from the start, with a long start timeout",
        {"driver": "vm", "vm": {"accel": "tcg"}, "app": {"startTimeoutSeconds": 600}},
        vm_on_tcg,
    ),
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
    ({"app": {"startTimeoutSeconds": 0}}, 'app.startTimeoutSeconds must be a whole number of seconds from 1 to 600'),
    ({"app": {"startTimeoutSeconds": 601}}, 'app.startTimeoutSeconds must be a whole number of seconds from 1 to 600'),
    ({"app": {"startTimeoutSeconds": 1.5}}, '(got "1.5")'),
    ({"app": {"startTimeoutSeconds": "soon"}}, '(got "soon")'),
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
