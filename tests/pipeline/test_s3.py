"""The end-to-end run against s3:// on a local moto server (issue 3, point 6), and the one-line
errors for a missing bucket and missing credentials."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import decode_dataset, run_preprocess, verify

pytestmark = [pytest.mark.s3, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]


def s3fs_client(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(
        key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint}
    )


def test_s3_end_to_end(ray_local, s3_env, corpus, make_config, pp, monkeypatch) -> None:
    """Also: the credentials reach the Ray tasks through runtime_env only, never inside a task's
    spec (issue 12.5); Ray was started before they were set, so the tasks must get them."""
    import uuid

    import pipeline.driver as driver

    key, secret = f"AKIA{uuid.uuid4().hex[:16]}", f"secret-{uuid.uuid4().hex}"  # moto takes any
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    sent: list[str] = []
    real_map = driver._ray_map

    def capture(cfg, specs, *args, **kw):
        sent.extend(json.dumps(spec) for spec in specs)
        return real_map(cfg, specs, *args, **kw)

    monkeypatch.setattr(driver, "_ray_map", capture)
    fs = s3fs_client(s3_env)
    fs.mkdir("corpus-in")
    fs.mkdir("datasets")
    for p in sorted(corpus.root.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"corpus-in/c/{p.relative_to(corpus.root)}")
    out = "s3://datasets/e2e"
    cfg = make_config(corpus.inputs("s3://corpus-in/c"), out)
    s = run_preprocess(cfg)
    assert s["work_done"] and s["files_new"] == 8
    assert sent and not [spec for spec in sent if secret in spec or key in spec]
    m = json.loads(fs.cat_file("datasets/e2e/manifest.json"))
    assert all(r["path"].startswith("s3://corpus-in/c/") for r in m["inputs"])
    assert not fs.exists("datasets/e2e/_work")
    report = verify(out, sample_units=100)
    assert report["ok"], report["errors"]
    want = pp.split_docs(corpus.expected(), 0.2)
    assert decode_dataset(out, "train") == want["train"]
    assert decode_dataset(out, "val") == want["val"]
    assert run_preprocess(cfg)["work_done"] is False
    # the CLI verify works on the s3:// dataset too
    r = subprocess.run(
        [sys.executable, "jobs/preprocess.py", "verify", out],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["ok"]


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "jobs/preprocess.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_missing_bucket_and_credentials_are_one_line_errors(
    s3_env, corpus, pp, tmp_path: Path
) -> None:
    import os

    y = tmp_path / "r.yaml"
    import yaml

    y.write_text(yaml.safe_dump(pp.recipe(corpus.inputs(), "s3://no-such-bucket/ds")))
    env = dict(os.environ)
    r = _cli(["--config", str(y)], env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: S3 bucket 'no-such-bucket'")
    assert "Traceback" not in r.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=s3_env,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE="/nonexistent",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
    )
    r = _cli(["--config", str(y)], env)
    assert r.returncode == 1
    assert "credentials" in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr
