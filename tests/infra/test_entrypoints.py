"""The commands in infra/ refer to entry points and recipes that exist, and the recipes (with the
commands' --set overrides) load with the config class of their entry point. Server commands
(`mlflow server`) parse with the tool's own CLI definition.
"""

from __future__ import annotations

import importlib
import re
import shlex

import infra_lib as L
import pytest
import yaml

JOB = re.compile(r"\bpython3?\s+(jobs/[\w.-]+\.py)((?:[ \t]+[^\s;&|`)]+)*)")


def job_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, args) for every `python jobs/<x>.py ...` in infra/: manifest fields
    (parsed, so folded YAML is one line), other YAML, the Dockerfiles and the README."""
    texts: dict[str, str] = {}
    for path in L.all_yaml_files():
        rel = str(path.relative_to(L.REPO))
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        docs += [sub for d in docs if isinstance(d, dict) for _, sub in L.embedded(d)]
        strings = [v for d in docs for _, v in L.walk(d) if isinstance(v, str)]
        texts[rel] = "\n".join(strings)
    for path in [*L.DOCKERFILES, L.INFRA / "README.md"]:
        if path.exists():
            texts[str(path.relative_to(L.REPO))] = path.read_text()
    out = []
    for where, text in texts.items():
        text = text.replace("\\\n", " ")
        for m in JOB.finditer(text):
            out.append((where, m.group(1), shlex.split(m.group(2))))
    return out


def parse_job_args(args: list[str]) -> tuple[str | None, list[str]]:
    """--config PATH, repeated --set k=v and --name RUN (the recipe's `name`): the only flags
    infra/ passes to jobs/*.py. Returns the config path and the overrides."""
    config, sets, i = None, [], 0
    flags = ("--config", "--set", "--name")
    while i < len(args):
        arg = args[i]
        if arg in flags:
            assert i + 1 < len(args), f"{arg} without a value"
            value, i = args[i + 1], i + 2
        elif arg.startswith(tuple(f + "=" for f in flags)):
            arg, value = arg.split("=", 1)
            i += 1
        else:
            raise AssertionError(f"unexpected argument {arg!r} (only {', '.join(flags)})")
        if arg == "--config":
            config = value
        elif arg == "--name":
            sets.append(f"name={value}")
        else:
            sets.append(value)
    return config, sets


COMMANDS = job_commands()
IDS = [f"{w}:{s}:{(parse_job_args(a)[0] or '-')}" for w, s, a in COMMANDS]


def test_commands_found():
    scripts = {(s, parse_job_args(a)[0]) for _, s, a in COMMANDS}
    # The RayJob and the nightly RayCronJob, at least.
    assert ("jobs/pretrain.py", "recipes/pretrain/gpu-125m-8x.yaml") in scripts
    assert ("jobs/preprocess.py", "recipes/preprocess/nightly-s3.yaml") in scripts


@pytest.mark.parametrize(("where", "script", "args"), COMMANDS, ids=IDS)
def test_entry_point_and_recipe_exist_and_validate(where, script, args):
    assert (L.REPO / script).is_file(), f"{where}: {script} does not exist"
    assert script in L.ENTRY_POINT_CONFIGS, f"{where}: no config class known for {script}"
    config, sets = parse_job_args(args)
    assert config, f"{where}: {script} without --config"
    assert config.startswith("recipes/"), config
    assert (L.REPO / config).is_file(), f"{where}: {config} does not exist"
    module, _, cls_name = L.ENTRY_POINT_CONFIGS[script].partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    from bitlm.recipe import load_recipe

    load_recipe(cls, L.REPO / config, sets)


def test_bad_override_would_fail():
    """The check above has teeth: an unknown key in a --set is an error."""
    from bitlm.recipe import RecipeError, load_recipe
    from bitlm.train.config import TrainRecipe

    with pytest.raises(RecipeError):
        load_recipe(TrainRecipe, None, ["storage_pth=s3://x"])


def test_job_args_parser():
    assert parse_job_args(["--config", "recipes/a.yaml", "--set", "a=1", "--set=b=2"]) == (
        "recipes/a.yaml",
        ["a=1", "b=2"],
    )
    assert parse_job_args(["--config=recipes/b.yaml", "--name", "r1"]) == (
        "recipes/b.yaml",
        ["name=r1"],
    )
    with pytest.raises(AssertionError):
        parse_job_args(["--confg", "x"])


def _mlflow_server_commands() -> list[tuple[str, list[str]]]:
    out = []
    for path in L.all_yaml_files():
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        for doc in docs:
            for _, value in L.walk(doc):
                if isinstance(value, str) and "mlflow server" in value:
                    text = value.replace("\\\n", " ")
                    line = text[text.index("mlflow server") :].split("\n")[0]
                    out.append((str(path.relative_to(L.REPO)), shlex.split(line)[2:]))
    return out


MLFLOW = _mlflow_server_commands()


def test_mlflow_commands_found():
    where = {w for w, _ in MLFLOW}
    assert "infra/mlflow/k8s/mlflow.yaml" in where
    assert "infra/mlflow/compose/docker-compose.yaml" in where


@pytest.mark.parametrize(("where", "args"), MLFLOW, ids=[w for w, _ in MLFLOW])
def test_mlflow_server_command(where, args):
    """Parses with mlflow's own CLI; auth on, PostgreSQL backend, S3 artifacts, one port."""
    from mlflow.cli import server

    ctx = server.make_context("mlflow server", list(args))
    p = ctx.params
    assert p["app_name"] == "basic-auth"
    assert (
        "postgresql://" in p["backend_store_uri"] or "BACKEND_STORE_URI" in p["backend_store_uri"]
    )
    assert p["serve_artifacts"] is True
    assert p["artifacts_destination"].startswith(("s3://", "$"))
    assert p["port"] == 5000


def test_mlflow_parse_rejects_typos():
    from mlflow.cli import server

    with pytest.raises(Exception):  # noqa: B017 - click usage error
        server.make_context("mlflow server", ["--app-name", "basic_auth"])


# The training recipes must fit the clusters that run them: Ray Train places num_workers workers,
# each {CPU: cpus_per_worker, GPU: 1 if use_gpu}; a recipe that does not fit waits forever.
def _quantity(q) -> float:
    s = str(q)
    if s.endswith("m"):
        return float(s[:-1]) / 1000
    return float(s)


def _kuberay_worker_nodes(cluster_spec: dict) -> list[tuple[int, float, float]]:
    """(max nodes, CPUs, GPUs) per worker group, as KubeRay advertises them to Ray."""
    out = []
    for group in cluster_spec.get("workerGroupSpecs", []):
        container = group["template"]["spec"]["containers"][0]
        limits = container["resources"].get("limits", {})
        params = group.get("rayStartParams", {})
        cpus = float(params.get("num-cpus", _quantity(limits.get("cpu", 0))))
        gpus = float(params.get("num-gpus", _quantity(limits.get("nvidia.com/gpu", 0))))
        nodes = group["maxReplicas"] * group.get("numOfHosts", 1)
        out.append((nodes, cpus, gpus))
    return out


def _launcher_worker_nodes(config: dict) -> list[tuple[int, float, float]]:
    out = []
    for name, t in config["available_node_types"].items():
        if name != config["head_node_type"]:
            res = t["resources"]
            out.append((t["max_workers"], float(res.get("CPU", 0)), float(res.get("GPU", 0))))
    return out


def _fits(recipe, nodes: list[tuple[int, float, float]]) -> bool:
    per_worker_gpu = 1.0 if recipe.use_gpu else 0.0
    placed = 0
    for count, cpus, gpus in nodes:
        by_cpu = int(cpus // recipe.cpus_per_worker)
        by_gpu = int(gpus // per_worker_gpu) if per_worker_gpu else by_cpu
        placed += count * min(by_cpu, by_gpu)
    return placed >= recipe.num_workers


GPU_RECIPES = ["recipes/pretrain/gpu-125m-8x.yaml", "recipes/pretrain/gpu-1b-8x.yaml"]


def _train_recipe(path: str):
    from bitlm.recipe import load_recipe
    from bitlm.train.config import TrainRecipe

    return load_recipe(TrainRecipe, L.REPO / path, [])


@pytest.mark.parametrize("recipe_path", GPU_RECIPES)
def test_gpu_recipes_fit_the_clusters(recipe_path):
    recipe = _train_recipe(recipe_path)
    assert recipe.use_gpu
    clusters = {}
    for path, _, doc in L.manifests():
        if doc["kind"] == "RayJob" and "jobs/pretrain.py" in doc["spec"]["entrypoint"]:
            clusters[path.name] = _kuberay_worker_nodes(doc["spec"]["rayClusterSpec"])
        if doc["kind"] == "RayCluster":
            clusters[path.name] = _kuberay_worker_nodes(doc["spec"])
    for path in L.CLUSTER_LAUNCHER_CONFIGS:
        clusters[path.name] = _launcher_worker_nodes(yaml.safe_load(path.read_text()))
    assert len(clusters) >= 3
    for name, nodes in clusters.items():
        assert _fits(recipe, nodes), f"{recipe_path} does not fit {name}: {nodes}"


def test_fit_check_has_teeth():
    recipe = _train_recipe(GPU_RECIPES[0])
    assert not _fits(recipe, [(1, 88.0, 4.0)])  # 4 GPUs for 8 workers
    assert not _fits(recipe, [(1, 32.0, 8.0)])  # too few CPUs for 8 x cpus_per_worker
