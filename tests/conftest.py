import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD_OUTPUTS = (".venv/", ".pytest_cache/")      # what `make test` itself creates
_TREE = pytest.StashKey[set | None]()
WORKER_MEMORY_GIB = 6       # memory per worker: the whole machine peaked at 5.9 GiB in use with 2
                            # workers (tests/README.md), its idle use included

# `make test` runs the files on pytest-xdist workers (one per CPU, as memory allows). Each worker
# gets a Prefect home of its own: two temporary Prefect servers on one SQLite file lock each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    # the CPUs shared out between the workers: torch's OpenMP threads spin while they wait, and
    # two workers' tests each running as many threads as the machine has CPUs were measured 5-10x
    # slower (the 20-epoch digits classifier beside one busy process: 71 s with two threads, 13 s
    # with one). Subprocesses and Ray workers inherit it.
    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(_threads)
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"prefect-{os.environ['PYTEST_XDIST_WORKER']}-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
else:
    # the hardware probes' and the dataset caches (diffusion/hardware.py, flows/datasets.py): one
    # for the test run, shared by its workers (they take turns through its file locks); what
    # probes measure while tests load the machine never reaches the user's own cache
    os.environ["DDPM_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddpm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DDPM_CACHE_DIR"], ignore_errors=True)


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per CPU this process may use, no more than memory holds."""
    cpus = len(os.sched_getaffinity(0))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return max(1, min(cpus, int(memory // WORKER_MEMORY_GIB)))


def pytest_collection_modifyitems(config, items):
    """The files in order of their expected length, longest first: with the files handed out
    whole to the workers (``--dist loadfile``), the long ones start at once and the short ones
    fill in at the end. A test marked ``slow`` counts its ``minutes`` (an ordering hint, not a
    limit), half a minute without; the others count nothing."""
    cost: Counter = Counter()
    for item in items:
        mark = item.get_closest_marker("slow")
        if mark is not None:
            cost[item.path] += mark.kwargs.get("minutes", 0.5)
    items.sort(key=lambda item: -cost[item.path])        # stable: a file's tests stay together


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


def _controller(config) -> bool:
    return not hasattr(config, "workerinput")      # not one of pytest-xdist's workers


def pytest_sessionstart(session):
    if _controller(session.config):
        session.config.stash[_TREE] = _working_tree()


def pytest_sessionfinish(session, exitstatus):
    """No test leaves files in the repository's working tree: every test writes under its own
    temporary directory (fails the run, naming what appeared)."""
    if not _controller(session.config):          # the controller checks once every worker is done
        return
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
