"""The Ray cluster launcher config validates as `ray up` would validate it, offline:
Ray's own autoscaler schema (ray/autoscaler/ray-schema.json, shipped in the pinned ray) after
Ray's own default-filling, each node_config against the EC2 RunInstances request shape that
boto3 sends, and each `ray start` command against ray's own CLI definition.
"""

from __future__ import annotations

import copy
import shlex

import infra_lib as L
import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIGS = L.CLUSTER_LAUNCHER_CONFIGS
IDS = [p.name for p in CONFIGS]


def _load(path):
    return yaml.safe_load(path.read_text())


def ray_up_validate(config: dict) -> dict:
    """What `ray up` runs before touching the cloud (commands._bootstrap_config)."""
    validate_config(copy.deepcopy(config))  # the file as written, against the raw schema
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_configs_found():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_validates_against_ray_schema(path):
    prepared = ray_up_validate(_load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c.__setitem__("max_worker", 3),
        lambda c: c["docker"].__setitem__("imagee", "x"),
        lambda c: next(iter(c["available_node_types"].values())).__setitem__("min_worker", 0),
        lambda c: next(iter(c["available_node_types"].values())).pop("resources"),
        lambda c: c.__setitem__("head_node_type", "nope"),
    ],
    ids=["top-level typo", "docker typo", "node type typo", "no resources", "bad head type"],
)
def test_ray_schema_rejects_broken_copies(path, breakage):
    config = _load(path)
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_up_validate(config)


def _shape_problems(value, shape, where: str) -> list[str]:
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            return [f"{where}: want a mapping"]
        out = []
        for key, sub in value.items():
            if key not in shape.members:
                out.append(f"{where}.{key}: not a {shape.name} field")
            else:
                out += _shape_problems(sub, shape.members[key], f"{where}.{key}")
        return out
    if kind == "list":
        if not isinstance(value, list):
            return [f"{where}: want a list"]
        return [
            p
            for i, v in enumerate(value)
            for p in _shape_problems(v, shape.member, f"{where}[{i}]")
        ]
    if kind == "map":
        return [] if isinstance(value, dict) else [f"{where}: want a mapping"]
    if kind in ("integer", "long"):
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{where}: want an integer"]
    if kind == "boolean":
        return [] if isinstance(value, bool) else [f"{where}: want a boolean"]
    if kind == "string":
        if not isinstance(value, str):
            return [f"{where}: want a string"]
        enum = shape.metadata.get("enum")
        return [f"{where}: {value!r} not in {enum}"] if enum and value not in enum else []
    return []


def _run_instances_shape():
    import botocore.session

    model = botocore.session.get_session().get_service_model("ec2")
    return model.operation_model("RunInstances").input_shape


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_node_configs_match_ec2_run_instances(path):
    config = _load(path)
    if config["provider"]["type"] != "aws":
        pytest.skip("only AWS node configs are checked against boto's request model")
    shape = _run_instances_shape()
    for name, node_type in config["available_node_types"].items():
        assert _shape_problems(node_type["node_config"], shape, name) == []


def test_ec2_shape_check_catches_typos():
    shape = _run_instances_shape()
    assert _shape_problems({"InstanceTyp": "m6i.large"}, shape, "x")
    assert _shape_problems({"InstanceMarketOptions": {"MarketType": "spots"}}, shape, "x")
    assert _shape_problems({"BlockDeviceMappings": [{"Ebs": {"VolumeSize": "200"}}]}, shape, "x")


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_layout(path):
    """CPU-only head, autoscaling spot GPU workers, a CPU worker group, docker image set."""
    config = _load(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["min_workers"] == head["max_workers"] == 0
    assert head["resources"].get("GPU", 0) == 0
    workers = [t for n, t in types.items() if n != config["head_node_type"]]
    gpu = [t for t in workers if t["resources"].get("GPU", 0) > 0]
    cpu = [t for t in workers if t["resources"].get("GPU", 0) == 0]
    assert gpu and cpu
    for t in gpu:
        assert t["min_workers"] < t["max_workers"], "the GPU group autoscales"
        assert t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert config["docker"]["image"]
    assert "RAY_AUTH_MODE=disabled" not in path.read_text(), "real clusters keep token auth"


def _ray_cli(words: list[str]) -> None:
    """Parse `ray <sub> ...` with ray's own click CLI, without running it."""
    from ray.scripts.scripts import cli

    assert words[0] == "ray", words
    sub = cli.commands[words[1]]
    sub.make_context(f"ray {words[1]}", list(words[2:]))


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_start_commands_parse_with_ray_cli(path):
    config = _load(path)
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    seen = 0
    for command in commands:
        for part in command.split("&&"):
            words = shlex.split(part)
            if words and words[0] == "ray":
                _ray_cli(words)
                seen += 1
    assert seen >= 3
    with pytest.raises(Exception):  # noqa: B017 - click raises its own usage errors
        _ray_cli(["ray", "start", "--head", "--dashbord-host=127.0.0.1"])


def test_kuberay_ray_start_params_are_ray_start_options():
    """KubeRay turns rayStartParams into `ray start --key=value`: every key must be an option."""
    n = 0
    for _, _, doc in L.manifests():
        for path, value in L.walk(doc):
            if path and path[-1] == "rayStartParams":
                args = [f"--{k}={v}" for k, v in value.items()]
                _ray_cli(["ray", "start", "--head", *args])
                n += 1
    assert n >= 3
