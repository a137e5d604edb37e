"""One set of versions: ray, torch, deepspeed (and mlflow, python) in the images, the manifests'
rayVersion and image tags, the cluster launcher, docker compose and scripts/ agree with the pins
in pyproject.toml, the single source of truth. A drifted copy must fail (tested on edited copies).
"""

from __future__ import annotations

import re
from pathlib import Path

import infra_lib as L
import pytest
import yaml

# Image tag convention: <project version>-ray<ray>-torch<torch>-ds<deepspeed>-<cu128|cpu>
TAG = re.compile(
    r"bitlm:(?P<project>[0-9][^-\s]*)-ray(?P<ray>[0-9][^-\s]*)-torch(?P<torch>[0-9][^-\s]*)"
    r"-ds(?P<deepspeed>[0-9][^-\s]*)-(?P<flavour>cu[0-9]+|cpu)\b"
)
MLFLOW_TAG = re.compile(r"bitlm-mlflow:(?P<mlflow>[0-9][^\s\"']*)")


def want() -> dict[str, str]:
    p = L.pins()
    return {k: p[k] for k in ("ray", "torch", "deepspeed", "mlflow")}


def project_version() -> str:
    import tomllib

    return tomllib.loads((L.REPO / "pyproject.toml").read_text())["project"]["version"]


def python_version() -> str:
    """X.Y from requires-python (">=3.11,<3.12"): the one minor version the project supports."""
    import tomllib

    spec = tomllib.loads((L.REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)\s*,\s*<\s*(\d+)\.(\d+)", spec.strip())
    assert m, f"requires-python {spec!r}: expected '>=X.Y,<X.Y+1'"
    major, minor, major2, minor2 = map(int, m.groups())
    assert (major2, minor2) == (major, minor + 1), spec
    return f"{major}.{minor}"


def dockerfile_problems(text: str, name: str, pins: dict[str, str]) -> list[str]:
    args = dict(re.findall(r"^ARG\s+([A-Z_]+)=(\S+)", text, flags=re.M))
    problems = []
    for key, pin in (
        ("RAY_VERSION", "ray"),
        ("TORCH_VERSION", "torch"),
        ("DEEPSPEED_VERSION", "deepspeed"),
        ("MLFLOW_VERSION", "mlflow"),
    ):
        if key in args and args[key] != pins[pin]:
            problems.append(f"{name}: ARG {key}={args[key]}, pyproject pins {pin}=={pins[pin]}")
    py = python_version()
    if "PYTHON_VERSION" in args and args["PYTHON_VERSION"] != py:
        problems.append(f"{name}: PYTHON_VERSION={args['PYTHON_VERSION']}, project needs {py}")
    for base in re.findall(r"^FROM\s+python:(\S+)", text, flags=re.M):
        if not re.match(rf"{re.escape(py)}(\D|$)", base):
            problems.append(f"{name}: FROM python:{base}, project needs {py}")
    return problems


def tag_problems(text: str, name: str, pins: dict[str, str], version: str) -> list[str]:
    problems = []
    for m in TAG.finditer(text):
        for key in ("ray", "torch", "deepspeed"):
            if m.group(key) != pins[key]:
                problems.append(f"{name}: image {m.group(0)} has {key} {m.group(key)}")
        if m.group("project") != version:
            problems.append(f"{name}: image {m.group(0)} has project {m.group('project')}")
    for m in MLFLOW_TAG.finditer(text):
        if m.group("mlflow") != pins["mlflow"]:
            problems.append(f"{name}: image {m.group(0)} has mlflow {m.group('mlflow')}")
    return problems


def ray_version_problems(docs: list, name: str, pins: dict[str, str]) -> list[str]:
    problems = []
    docs = [*docs, *(sub for d in docs if isinstance(d, dict) for _, sub in L.embedded(d))]
    for doc in docs:
        for path, value in L.walk(doc):
            if not path or path[-1] != "rayVersion" or isinstance(value, dict):
                continue  # (a schema's definition of the field, not a value)
            if str(value) != pins["ray"]:
                problems.append(f"{name}: rayVersion {value} at {'.'.join(map(str, path))}")
    return problems


def requirement_problems(text: str, name: str, pins: dict[str, str]) -> list[str]:
    problems = []
    for pkg, ver in re.findall(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", text, flags=re.M):
        if pkg.lower() in pins and pins[pkg.lower()] != ver:
            problems.append(f"{name}: {pkg}=={ver}, pyproject pins {pins[pkg.lower()]}")
    return problems


def all_problems(files: dict[str, str], pins: dict[str, str], version: str) -> list[str]:
    problems = []
    for name, text in files.items():
        problems += tag_problems(text, name, pins, version)
        if Path(name).name.startswith("Dockerfile"):
            problems += dockerfile_problems(text, name, pins)
        if name.endswith((".yaml", ".yml")):
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
            problems += ray_version_problems(docs, name, pins)
        if name.endswith(".txt"):
            problems += requirement_problems(text, name, pins)
    return problems


def infra_files() -> dict[str, str]:
    paths = [
        *L.DOCKERFILES,
        *L.all_yaml_files(),
        *(L.INFRA.rglob("*.txt")),
        L.INFRA / "README.md",
        L.REPO / "scripts" / "constraints.txt",
    ]
    return {str(p.relative_to(L.REPO)): p.read_text() for p in paths if p.exists()}


def test_pins_exist():
    p = want()
    assert all(p.values()), p


def test_everything_agrees_with_pyproject():
    assert all_problems(infra_files(), want(), project_version()) == []


def test_every_image_reference_is_checked():
    """Every BitLM image named anywhere follows the tag convention (so the check above sees it)."""
    files = infra_files()
    n_tags = 0
    for name, text in files.items():
        for ref in re.findall(r"\S*/bitlm(?:-mlflow)?:[^\s\"'`]+", text):
            assert TAG.search(ref) or MLFLOW_TAG.search(ref), f"{name}: {ref}"
            n_tags += 1
    assert n_tags >= 8


def test_images_carry_the_pins():
    files = infra_files()
    gpu = files["infra/docker/Dockerfile.gpu"]
    cpu = files["infra/docker/Dockerfile.cpu"]
    for text in (gpu, cpu):
        for arg in ("TORCH_VERSION", "RAY_VERSION", "DEEPSPEED_VERSION"):
            assert re.search(rf"^ARG {arg}=", text, flags=re.M), arg
    assert re.search(r"^FROM nvidia/cuda:\S+", gpu, flags=re.M)
    assert "MLFLOW_VERSION" in files["infra/docker/Dockerfile.mlflow"]
    flavours = {m.group("flavour") for t in files.values() for m in TAG.finditer(t)}
    assert "cpu" in flavours and any(f.startswith("cu") for f in flavours)
    # KubeRay rayVersion is present in every RayCluster spec.
    n = sum(1 for _, _, d in L.manifests() for p, _ in L.walk(d) if p and p[-1] == "rayVersion")
    assert n >= 3


def test_install_order_matches_setup_sh():
    """torch first and alone (the CUDA build in the GPU image), then the project under the torch
    constraint, as scripts/setup.sh does."""
    setup = (L.REPO / "scripts" / "setup.sh").read_text()
    assert setup.index("torch==") < setup.index("-c scripts/constraints.txt")
    for name in ("Dockerfile.gpu", "Dockerfile.cpu"):
        text = (L.INFRA / "docker" / name).read_text()
        i_torch = text.index('pip install "torch==${TORCH_VERSION}" --index-url')
        i_rest = text.index("pip install -c scripts/constraints.txt .")
        assert i_torch < i_rest, name
    assert "download.pytorch.org/whl/cu" in (L.INFRA / "docker" / "Dockerfile.gpu").read_text()


@pytest.mark.parametrize(
    ("file", "old", "new"),
    [
        ("infra/docker/Dockerfile.gpu", "ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.59.0"),
        ("infra/docker/Dockerfile.cpu", "ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.12.0"),
        (
            "infra/docker/Dockerfile.gpu",
            "ARG DEEPSPEED_VERSION=0.19.8",
            "ARG DEEPSPEED_VERSION=0.19",
        ),
        ("infra/kuberay/rayjob-pretrain.yaml", 'rayVersion: "2.60.0"', 'rayVersion: "2.61.0"'),
        (
            "infra/kuberay/cronjob-preprocess-fallback.yaml",
            'rayVersion: "2.60.0"',
            'rayVersion: "2.6"',
        ),
        ("infra/kuberay/raycronjob-preprocess.yaml", "-ray2.60.0-", "-ray2.6.0-"),
        ("infra/ray-cluster/aws.yaml", "-torch2.13.0-", "-torch2.13.1-"),
        ("infra/mlflow/requirements.txt", "mlflow[auth]==3.17.2", "mlflow[auth]==3.18.0"),
        ("infra/mlflow/k8s/mlflow.yaml", "bitlm-mlflow:3.17.2", "bitlm-mlflow:3.17.1"),
        ("infra/mlflow/compose/docker-compose.yaml", "bitlm-mlflow:3.17.2", "bitlm-mlflow:3.1"),
        ("scripts/constraints.txt", "torch==2.13.0", "torch==2.14.0"),
        ("infra/docker/Dockerfile.gpu", "ARG PYTHON_VERSION=3.11", "ARG PYTHON_VERSION=3.12"),
        ("infra/docker/Dockerfile.mlflow", "FROM python:3.11-slim", "FROM python:3.12-slim"),
    ],
)
def test_drift_is_caught(file, old, new):
    files = infra_files()
    assert old in files[file], (file, old)
    files[file] = files[file].replace(old, new, 1)
    assert all_problems(files, want(), project_version())


def test_pin_drift_in_pyproject_is_caught():
    pins = dict(want(), ray="2.61.0")
    assert all_problems(infra_files(), pins, project_version())
