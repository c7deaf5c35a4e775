import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD_OUTPUTS = (".venv/", ".pytest_cache/")      # what `make test` itself creates
_TREE = pytest.StashKey[set | None]()


def _working_tree() -> set[str] | None:
    """Untracked, modified and ignored paths of the repository (ignored directories collapsed),
    or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return {line for line in out.stdout.splitlines()
            if not line[3:].startswith(BUILD_OUTPUTS) and "__pycache__" not in line
            and ".egg-info/" not in line}


def pytest_sessionstart(session):
    session.config.stash[_TREE] = _working_tree()


def pytest_sessionfinish(session, exitstatus):
    """No test leaves files in the repository's working tree: every test writes under its own
    temporary directory (fails the run, naming what appeared)."""
    before, after = session.config.stash.get(_TREE, None), _working_tree()
    if before is None or after is None or session.config.option.collectonly:
        return
    appeared = sorted(after - before)
    if appeared:
        session.config.get_terminal_writer().line(
            "error: the tests left files in the repository's working tree: " + ", ".join(appeared),
            red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3 server over HTTP on a free loopback port (a real server, real boto3)."""
    from moto.server import ThreadedMotoServer
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """Standard AWS settings pointing boto3 (and DVC) at the moto server."""
    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing-key-id",
           "AWS_SECRET_ACCESS_KEY": "very-secret-value-123", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env
