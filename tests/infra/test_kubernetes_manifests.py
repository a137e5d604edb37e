"""Every Kubernetes manifest in infra/ validates, offline and strictly:
- built-in kinds against the Kubernetes OpenAPI schemas of K8S_VERSION shipped by
  kubernetes-validate (strict: an unknown field is an error, as with kubectl --validate=strict);
- KubeRay kinds against the KubeRay CRD schema checked into infra/kuberay/crd/ (a hand-transcribed
  subset of KubeRay v1.6.0, stricter than the real CRD), whose pod templates refer to the same
  strict Kubernetes schemas.
"""

from __future__ import annotations

import copy
import re

import infra_lib as L
import jsonschema
import kubernetes_validate
import pytest

MANIFESTS = list(L.manifests())
IDS = [f"{p.relative_to(L.INFRA)}#{i}:{d['kind']}" for p, i, d in MANIFESTS]


def _validate(doc: dict) -> None:
    if doc["kind"] in L.KUBERAY_KINDS:
        assert doc["apiVersion"] == "ray.io/v1", doc["apiVersion"]
        L.kuberay_validator(doc["kind"]).validate(doc)
    else:
        kubernetes_validate.validate(doc, L.K8S_VERSION, strict=True)


def test_manifests_found():
    kinds = {d["kind"] for _, _, d in MANIFESTS}
    # The deliverables of infra/: a RayCluster, a RayJob, a scheduled RayCronJob, and MLflow.
    assert {"RayCluster", "RayJob", "RayCronJob", "Deployment", "Service"} <= kinds, kinds


@pytest.mark.parametrize(("path", "index", "doc"), MANIFESTS, ids=IDS)
def test_manifest_validates(path, index, doc):
    meta = doc.get("metadata", {})
    assert isinstance(meta.get("name") or meta.get("generateName"), str), "objects need names"
    _validate(doc)


def test_kuberay_schema_is_a_valid_schema_and_states_its_version():
    schema = L.kuberay_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    text = L.KUBERAY_SCHEMA.read_text()
    assert f"KubeRay v{L.KUBERAY_VERSION}" in text
    assert "hand-transcribed" in text
    for kind in L.KUBERAY_KINDS:
        assert kind in schema["$defs"]


def test_kubernetes_version_is_shipped():
    assert L.K8S_VERSION in {
        ".".join(v.split(".")[:2]) for v in kubernetes_validate.utils.all_versions()
    }


# The validators must reject what the real API server would: prove it on broken copies.
def _first(kind: str) -> dict:
    for _, _, d in MANIFESTS:
        if d["kind"] == kind:
            return copy.deepcopy(d)
    raise AssertionError(f"no {kind} manifest")


def _cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    if doc["kind"] == "RayCronJob":
        spec = spec["jobTemplate"]
    return spec if doc["kind"] == "RayCluster" else spec["rayClusterSpec"]


BREAKAGES = {
    "unknown top-level spec field": lambda d: d["spec"].__setitem__("replicaz", 1),
    "unknown field in head group": lambda d: _cluster_spec(d)["headGroupSpec"].__setitem__(
        "replicas", 1
    ),
    "unknown field in a container": lambda d: _cluster_spec(d)["headGroupSpec"]["template"]["spec"][
        "containers"
    ][0].__setitem__("gpu", 1),
    "container without image name": lambda d: _cluster_spec(d)["headGroupSpec"]["template"]["spec"][
        "containers"
    ][0].pop("name"),
    "rayStartParams value not a string": lambda d: _cluster_spec(d)["headGroupSpec"][
        "rayStartParams"
    ].__setitem__("num-cpus", 0),
    "negative maxReplicas": lambda d: _cluster_spec(d)["workerGroupSpecs"][0].__setitem__(
        "maxReplicas", -1
    ),
    "worker group without groupName": lambda d: _cluster_spec(d)["workerGroupSpecs"][0].pop(
        "groupName"
    ),
    "bad auth mode": lambda d: _cluster_spec(d).__setitem__("authOptions", {"mode": "tokens"}),
    "rayVersion not x.y.z": lambda d: _cluster_spec(d).__setitem__("rayVersion", "latest"),
}


@pytest.mark.parametrize("kind", L.KUBERAY_KINDS)
@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_kuberay_schema_rejects_broken_manifests(kind, breakage):
    doc = _first(kind)
    L.kuberay_validator(kind).validate(doc)
    BREAKAGES[breakage](doc)
    with pytest.raises(jsonschema.ValidationError):
        L.kuberay_validator(kind).validate(doc)


@pytest.mark.parametrize(
    "change",
    [
        {"submissionMode": "K8sMode"},
        {"backoffLimit": -1},
        {"activeDeadlineSeconds": 0},
        {"clusterSelector": {"ray.io/cluster": "other"}},  # with rayClusterSpec: not both
        {"entrypoint": ""},
        {"deletionStrategy": {"onSuccess": {"policy": "DeleteCluster"}}},  # onFailure missing
    ],
    ids=lambda c: next(iter(c)),
)
def test_rayjob_rules(change):
    doc = _first("RayJob")
    doc["spec"].update(change)
    with pytest.raises(jsonschema.ValidationError):
        L.kuberay_validator("RayJob").validate(doc)


def test_builtin_schema_rejects_unknown_field():
    for _, _, doc in MANIFESTS:
        if doc["kind"] == "Deployment":
            doc = copy.deepcopy(doc)
            doc["spec"]["template"]["spec"]["containers"][0]["envfrom"] = []
            with pytest.raises(kubernetes_validate.ValidationError):
                kubernetes_validate.validate(doc, L.K8S_VERSION, strict=True)
            return
    raise AssertionError("no Deployment")


# Cron: RayCronJob takes a standard 5-field schedule (robfig/cron's standard parser).
_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
_NAMES = {
    3: ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"],
    4: ["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
}


def cron_problems(expr: str) -> list[str]:
    if expr.startswith("@"):
        ok = expr in {
            "@yearly",
            "@annually",
            "@monthly",
            "@weekly",
            "@daily",
            "@midnight",
            "@hourly",
        }
        return [] if ok else [f"unknown descriptor {expr}"]
    fields = expr.split()
    if len(fields) != 5:
        return [f"{len(fields)} fields, want 5"]
    problems = []
    for i, (field, (lo, hi)) in enumerate(zip(fields, _CRON_RANGES, strict=True)):
        for part in field.split(","):
            base, _, step = part.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                problems.append(f"field {i}: bad step {part}")
            if base in ("*", "?"):
                continue
            bounds = base.split("-")
            if len(bounds) > 2:
                problems.append(f"field {i}: bad range {part}")
                continue
            for b in bounds:
                names = _NAMES.get(i, [])
                if b.lower() in names:
                    continue
                if not b.isdigit() or not lo <= int(b) <= hi:
                    problems.append(f"field {i}: {b} outside {lo}-{hi}")
    return problems


def test_cron_schedules():
    scheduled = [d for _, _, d in MANIFESTS if d["kind"] in ("RayCronJob", "CronJob")]
    assert scheduled
    for doc in scheduled:
        assert cron_problems(doc["spec"]["schedule"]) == [], doc["spec"]["schedule"]
    # nightly by default
    cron = _first("RayCronJob")["spec"]["schedule"]
    assert re.fullmatch(r"\d+ \d+ \* \* \*", cron), cron


@pytest.mark.parametrize("bad", ["0 2 * *", "61 2 * * *", "0 24 * * *", "0 2 * * 8", "@nightly"])
def test_cron_checker_rejects(bad):
    assert cron_problems(bad)


def test_kuberay_versions_and_services_private():
    for _, _, doc in MANIFESTS:
        if doc["kind"] in L.KUBERAY_KINDS:
            spec = _cluster_spec(doc)
            # Ray 2.60 needs a token by default; the manifests keep it on.
            assert spec.get("authOptions", {}).get("mode") == "token", L.object_name(doc)
            assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", L.object_name(doc)
        if doc["kind"] == "RayJob":
            assert doc["spec"].get("backoffLimit", 0) >= 1, "a retry policy"
            assert doc["spec"].get("shutdownAfterJobFinishes") or doc["spec"].get(
                "deletionStrategy"
            ), "a cleanup policy"


def test_every_secret_referenced_is_created_in_the_readme():
    """Secrets are created by the user's commands (infra/README.md), never stored in files."""
    readme = (L.INFRA / "README.md").read_text()
    created = set(re.findall(r"kubectl(?: -n \S+)? create secret generic (\S+)", readme))
    referenced = set()
    for _, _, doc in MANIFESTS:
        assert doc["kind"] != "Secret", "Secrets are never checked in"
        for path, value in L.walk(doc):
            if path and path[-1] in ("secretKeyRef", "secretRef") and isinstance(value, dict):
                referenced.add(value["name"])
    assert referenced
    assert referenced <= created, referenced - created


def test_fallback_cronjob_creates_the_same_rayjob():
    """cronjob-preprocess-fallback.yaml (plain CronJob) and raycronjob-preprocess.yaml run the
    same RayJob on the same schedule: no drift between the two ways of scheduling."""
    cron = _first("RayCronJob")
    fallback = [d for p, i, d in MANIFESTS if p.name == "cronjob-preprocess-fallback.yaml"]
    rayjobs = [d for d in fallback if d["kind"] == "RayJob"]
    cronjobs = [d for d in fallback if d["kind"] == "CronJob"]
    assert len(rayjobs) == 1 and len(cronjobs) == 1
    assert rayjobs[0]["spec"] == cron["spec"]["jobTemplate"]
    assert cronjobs[0]["spec"]["schedule"] == cron["spec"]["schedule"]
    # The scheduler may create RayJobs and nothing else.
    role = next(d for d in fallback if d["kind"] == "Role")
    assert role["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}
    ]
