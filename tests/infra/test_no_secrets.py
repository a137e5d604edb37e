"""No secret, password or key literal in any file of infra/: credentials are provided at run time
(Kubernetes Secrets created by the user's commands, IRSA / instance profiles, an uncommitted .env)
and files only name where they come from. The scanner is tested on planted secrets too.
"""

from __future__ import annotations

import re
from pathlib import Path

import infra_lib as L
import pytest

# Values that are references, not literals: environment / Kubernetes / compose expansions,
# placeholders, paths, booleans, empty values, flow mappings (`secretKeyRef: {name: ...}`).
_REFERENCE = re.compile(
    r"""^(?:
        \$ | < | \{ | \[ | ~?/ | \.{0,2}/ | %s
      | (?:true|false|null|none|yes|no|required|optional)$
      | (?:your|change|changeme|example|placeholder|xxx|\*+)\b
    )""",
    re.I | re.X,
)

RULES: list[tuple[str, re.Pattern[str]]] = [
    (
        "AWS access key id",
        re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b"),
    ),
    ("private key block", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----")),
    ("GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b")),
    ("GitLab token", re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}\b")),
    ("Slack token", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}")),
    ("Hugging Face token", re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")),
    ("OpenAI-style key", re.compile(r"\bsk-[A-Za-z0-9_-]{20,}")),
    ("JSON web token", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.")),
    ("Google API key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b")),
    ("base64 of a private key", re.compile(r"LS0tLS1CRUdJTi[A-Za-z0-9+/=]*")),
]

# URL with inline credentials: scheme://user:PASSWORD@host, the password not a reference.
_URL_CREDENTIALS = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@]+:(?P<v>[^\s@/]+)@")

# key = value / key: value / --key=value / "key": "value" where the key names a secret.
_ASSIGNMENT = re.compile(
    r"""(?P<k>[A-Za-z0-9_.-]*(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key
        |private[_-]?key)[A-Za-z0-9_.-]*)
        ["']?[ \t]*(?:=|:(?!//))[ \t]*(?P<v>[^\s#,;]+)""",
    re.I | re.X,
)


# A code expression (`password=os.environ["X"]`, `password=input(...)`) is not a literal.
_EXPRESSION = re.compile(r"^[A-Za-z_][\w.]*[\[(]")


def _literal(value: str) -> bool:
    if _EXPRESSION.match(value):
        return False
    v = value.strip().strip("\"'`")
    return bool(v) and not _REFERENCE.match(v)


def scan_text(text: str) -> list[tuple[int, str]]:
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for name, rule in RULES:
            if rule.search(line):
                found.append((n, name))
        for m in _URL_CREDENTIALS.finditer(line):
            if _literal(m.group("v")):
                found.append((n, "credentials in a URL"))
        for m in _ASSIGNMENT.finditer(line):
            if m.group("k").upper() == "NOPASSWD":  # sudoers tag, not a password
                continue
            if _literal(m.group("v")):
                found.append((n, f"literal value for {m.group('k')}"))
    return found


def infra_files() -> list[Path]:
    return sorted(p for p in L.INFRA.rglob("*") if p.is_file())


def test_scans_every_file():
    files = infra_files()
    assert any(p.name == "README.md" for p in files)
    assert any(p.name.startswith("Dockerfile") for p in files)
    assert not any(p.name == ".env" for p in files), "a .env file must never be in infra/"


@pytest.mark.parametrize("path", infra_files(), ids=lambda p: str(p.relative_to(L.INFRA)))
def test_no_secret_literals(path):
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        pytest.fail(f"{path}: binary file in infra/")
    assert scan_text(text) == [], path


# Fake credentials assembled at run time, so that this file holds no secret-looking literal.
_AWS_ID = "AKIA" + "Q" * 16
_AWS_SECRET = "wJalrXUtnFEMI" + "K7MDENG" + "bPxRfiCYEXAMPLEKEY0"
PLANTED = {
    "aws.yaml": f"provider:\n  aws_access_key_id: {_AWS_ID}\n",
    "aws-secret.env": f"AWS_SECRET_ACCESS_KEY={_AWS_SECRET}\n",
    "compose.yaml": "environment:\n  POSTGRES_PASSWORD: hunter2hunter2\n",
    "k8s.yaml": "stringData:\n  password: s3cr3t-value\n",
    "secret.yaml": "data:\n  token: dG9wc2VjcmV0\n",
    "uri.yaml": "value: postgresql://mlflow:pl41nt3xt@db:5432/mlflow\n",
    "key.pem": "-----BEGIN " + "RSA PRIVATE KEY-----\nMIIB\n",
    "README.md": "export MLFLOW_TRACKING_PASSWORD=letmein123\n",
    "json.json": '{"api_key": "abcdef0123456789"}\n',
    "cli.sh": "mlflow server --flask-secret-key=abc123def456\n",
    "python.py": "client.create_user(username='bob', password='Tr0ub4dor')\n",
    "gh.txt": "token ghp_" + "a1" * 18 + "\n",
    "b64key.yaml": "tls.key: LS0tLS1CRUdJTiBQUklWQVRFIEtFWS0tLS0t\n",
}


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_scanner_catches_planted_secret(tmp_path, name):
    path = tmp_path / "infra" / name
    path.parent.mkdir(parents=True)
    path.write_text(PLANTED[name])
    assert scan_text(path.read_text()), f"missed the secret planted in {name}"


@pytest.mark.parametrize(
    "line",
    [
        "              value: postgresql://mlflow:$(POSTGRES_PASSWORD)@mlflow-postgres:5432/mlflow",
        "      POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}",
        "                  secretKeyRef: {name: mlflow-postgres, key: password}",
        'kubectl create secret generic x --from-literal=admin-password="$(openssl rand -hex 24)"',
        "    ~/.ray/auth_token: ~/.ray/auth_token",
        '      - {name: TOKENIZERS_PARALLELISM, value: "false"}',
        "export MLFLOW_TRACKING_PASSWORD=<the password you chose>",
        "--set storage_path=s3://your-bucket/bitlm/runs",
    ],
)
def test_scanner_allows_references(line):
    assert scan_text(line) == []
