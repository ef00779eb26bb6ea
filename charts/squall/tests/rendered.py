"""Rendering the chart with Helm's own engine and looking things up in what was rendered:
shared by check.py and invariants.py."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import yaml
from helm_python import chart as helm

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
