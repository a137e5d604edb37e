"""The MLflow tracking server, both variants: authentication on and configured in a form MLflow
reads, PostgreSQL backend, not exposed publicly, and every variable the start scripts use is
defined (Kubernetes expands `$(VAR)` only from variables defined earlier in the same list).
"""

from __future__ import annotations

import re
from pathlib import Path

import infra_lib as L
import pytest
import yaml

K8S = L.INFRA / "mlflow" / "k8s" / "mlflow.yaml"
COMPOSE = L.INFRA / "mlflow" / "compose" / "docker-compose.yaml"


def _containers():
    for path, _, doc in L.manifests():
        for p, value in L.walk(doc):
            if p and p[-1] == "containers":
                for c in value:
                    yield f"{path.name}:{L.object_name(doc)}:{c['name']}", c


def test_k8s_env_references_defined_earlier():
    """`$(VAR)` in env values, command and args must name a variable defined before it."""
    n = 0
    for where, c in _containers():
        names: list[str] = []
        for env in c.get("env", []):
            for ref in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", env.get("value", "")):
                assert ref in names, f"{where}: {env['name']} uses $({ref}) before it is defined"
                n += 1
            names.append(env["name"])
        for text in [*c.get("command", []), *c.get("args", [])]:
            for ref in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", text):
                assert ref in names, f"{where}: command uses $({ref}), not defined"
    assert n >= 2


def _k8s_mlflow_container() -> dict:
    for doc in yaml.safe_load_all(K8S.read_text()):
        if doc and doc["kind"] == "Deployment":
            return doc["spec"]["template"]["spec"]["containers"][0]
    raise AssertionError("no Deployment in mlflow.yaml")


def test_k8s_start_script_uses_only_defined_variables():
    c = _k8s_mlflow_container()
    defined = {e["name"] for e in c["env"]}
    script = "\n".join(c["args"])
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", script))
    assert used, script
    assert used <= defined, used - defined


def _render_printf(script: str, values: list[str]) -> str:
    fmt = re.search(r"printf '([^']*)'", script).group(1)
    text = fmt.replace("\\n", "\n")
    for v in values:
        text = text.replace("%s", v, 1)
    assert "%s" not in text
    return text


def _auth_module(name: str):
    """mlflow.server.auth.<name>, loaded on its own: the package's __init__ needs Flask-WTF
    (mlflow[auth], which the server image installs) and this environment does not have it."""
    import importlib.util

    import mlflow

    path = Path(mlflow.__file__).parent / "server" / "auth" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bitlm_mlflow_auth_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant", ["k8s", "compose"])
def test_auth_config_is_read_by_mlflow(variant, tmp_path, monkeypatch):
    """The basic-auth config the start scripts write is one MLflow's own reader accepts; the admin
    comes from MLFLOW_AUTH_ADMIN_* (Secrets / .env), the user store is PostgreSQL."""
    read_auth_config = _auth_module("config").read_auth_config
    all_permissions = _auth_module("permissions").ALL_PERMISSIONS

    if variant == "k8s":
        c = _k8s_mlflow_container()
        script = "\n".join(c["args"])
        env = {e["name"]: e for e in c["env"]}
    else:
        svc = yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]
        script = "\n".join(svc["command"])
        env = {k: {"name": k, "value": v} for k, v in svc["environment"].items()}
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in env
    assert "value" not in env["MLFLOW_AUTH_ADMIN_PASSWORD"] or str(
        env["MLFLOW_AUTH_ADMIN_PASSWORD"]["value"]
    ).startswith("${")
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(_render_printf(script, ["postgresql://mlflow:pw@db:5432/mlflow_auth"]))
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "x")
    cfg = read_auth_config()
    assert cfg.database_uri.startswith("postgresql://")
    assert cfg.default_permission in all_permissions
    assert cfg.admin_password == "x"
    assert "MLFLOW_AUTH_CONFIG_PATH" in script


# docker compose: interpolate like compose does, then check the structure.
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_]\w*)")


def interpolate(text: str, env: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        value = env.get(name)
        if op in (":?", "?") and not value:
            raise KeyError(f"{name} is required: {arg}")
        if op in (":-", "-") and not value:
            return arg
        return value or ""

    return _VAR.sub(sub, text)


REQUIRED = {
    "POSTGRES_PASSWORD": "p",
    "MLFLOW_ADMIN_PASSWORD": "a",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "k",
    "MLFLOW_ARTIFACTS_DESTINATION": "s3://b/p",
}

SERVICE_KEYS = {
    "image", "build", "restart", "depends_on", "ports", "environment", "entrypoint", "command",
    "volumes", "healthcheck", "env_file", "networks", "user", "working_dir", "expose",
}  # fmt: skip


def _compose(env: dict[str, str]) -> dict:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env))


def test_compose_requires_its_secrets():
    for missing in REQUIRED:
        env = {k: v for k, v in REQUIRED.items() if k != missing}
        with pytest.raises(KeyError, match=missing):
            _compose(env)


def test_compose_structure_and_loopback_only():
    c = _compose(REQUIRED)
    assert set(c) <= {"name", "services", "volumes", "networks", "configs", "secrets"}
    declared_volumes = set(c.get("volumes") or {})
    for name, svc in c["services"].items():
        assert set(svc) <= SERVICE_KEYS, (name, set(svc) - SERVICE_KEYS)
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (COMPOSE.parent / src).exists(), src
            else:
                assert src in declared_volumes, src
        for dep in svc.get("depends_on", {}):
            assert dep in c["services"]
        if "build" in svc:
            ctx = (COMPOSE.parent / svc["build"]["context"]).resolve()
            assert (ctx / svc["build"]["dockerfile"]).is_file()
    assert "ports" not in c["services"]["postgres"], "the database is never published"
    assert c["services"]["mlflow"]["ports"]


def test_compose_interpolation():
    assert interpolate("a $$b ${X:-d} ${Y}", {"Y": "y"}) == "a $b d y"
    with pytest.raises(KeyError):
        interpolate("${X:?need X}", {})


def test_server_image_has_auth_and_drivers():
    reqs = (L.INFRA / "mlflow" / "requirements.txt").read_text()
    assert re.search(r"^mlflow\[auth\]==", reqs, flags=re.M), "basic-auth needs mlflow[auth]"
    assert re.search(r"^psycopg2(-binary)?==", reqs, flags=re.M), "PostgreSQL driver"
    assert re.search(r"^boto3==", reqs, flags=re.M), "S3 artifact store"
