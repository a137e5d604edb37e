"""Helpers shared by the tests of infra/: where things are, the pins, the manifests, the schemas.

Everything here is offline: the Kubernetes schemas come from the kubernetes-validate package,
the KubeRay schema is checked into infra/kuberay/crd/, Ray's autoscaler schema ships in ray.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"

# The Kubernetes version the manifests are validated for (kubernetes-validate's strict schemas:
# unknown fields are errors, as with `kubectl apply --validate=strict`).
K8S_VERSION = "1.34"

KUBERAY_VERSION = "1.6.0"
KUBERAY_SCHEMA = (
    INFRA / "kuberay" / "crd" / f"kuberay-v{KUBERAY_VERSION}-ray.io-v1.subset.schema.yaml"
)
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayCronJob")

CLUSTER_LAUNCHER_CONFIGS = sorted((INFRA / "ray-cluster").glob("*.yaml"))
COMPOSE_FILES = sorted((INFRA / "mlflow" / "compose").glob("docker-compose*.yaml"))
DOCKERFILES = sorted(
    p for p in (INFRA / "docker").glob("Dockerfile*") if not p.name.endswith(".dockerignore")
)

# Entry point -> the config class its --config recipe is loaded with.
ENTRY_POINT_CONFIGS = {
    "jobs/preprocess.py": "pipeline.config:PreprocessConfig",
    "jobs/pretrain.py": "bitlm.train.config:TrainRecipe",
}


def pins() -> dict[str, str]:
    """Exact pins (name -> version) from pyproject.toml's dependencies."""
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    out: dict[str, str] = {}
    for dep in data["project"]["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][0-9A-Za-z.+-]*)", dep.strip())
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def k8s_manifest_files() -> list[Path]:
    """Every YAML file under infra/ that holds Kubernetes objects (apiVersion + kind)."""
    skip = {KUBERAY_SCHEMA, *CLUSTER_LAUNCHER_CONFIGS, *COMPOSE_FILES}
    out = []
    for path in sorted(INFRA.rglob("*.y*ml")):
        if path in skip:
            continue
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        if docs and all(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in docs):
            out.append(path)
    return out


def embedded(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Kubernetes objects carried as YAML text inside a ConfigMap (e.g. the RayJob that a CronJob
    creates): (key, object) for each."""
    out = []
    if doc.get("kind") == "ConfigMap":
        for key, text in (doc.get("data") or {}).items():
            if key.endswith((".yaml", ".yml")):
                for sub in yaml.safe_load_all(text):
                    if isinstance(sub, dict) and "apiVersion" in sub and "kind" in sub:
                        out.append((key, sub))
    return out


def manifests() -> Iterator[tuple[Path, int | str, dict[str, Any]]]:
    """(file, index, object) for every Kubernetes object in infra/, including objects embedded
    in ConfigMaps (index "<i>/<key>")."""
    for path in k8s_manifest_files():
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        for i, doc in enumerate(docs):
            yield path, i, doc
            for key, sub in embedded(doc):
                yield path, f"{i}/{key}", sub


def object_name(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata", {})
    return meta.get("name") or meta.get("generateName", "")


def all_yaml_files() -> list[Path]:
    return sorted(INFRA.rglob("*.y*ml"))


@functools.cache
def k8s_definitions() -> dict[str, Any]:
    folder = f"v{K8S_VERSION}.0-local-strict"
    ref = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / folder
    return json.loads((ref / "_definitions.json").read_text())


@functools.cache
def kuberay_schema() -> dict[str, Any]:
    return yaml.safe_load(KUBERAY_SCHEMA.read_text())


def kuberay_validator(kind: str):
    """A validator for one KubeRay kind: the checked-in CRD subset, whose pod templates and
    metadata refer to the strict Kubernetes schemas of K8S_VERSION."""
    import jsonschema
    from referencing import Registry, Resource

    defs, crd = k8s_definitions(), kuberay_schema()
    registry = Registry().with_resources(
        [(defs["$id"], Resource.from_contents(defs)), (crd["$id"], Resource.from_contents(crd))]
    )
    return jsonschema.Draft202012Validator(
        {"$ref": f"{crd['$id']}#/$defs/{kind}"}, registry=registry
    )


def walk(obj: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """Every (path, value) in a nested dict/list."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from walk(v, (*path, i))
