"""The S3 source through real boto3 calls to moto's HTTP server."""

import json
import uuid

import boto3
import numpy as np
import pytest

from diffusion.config import load_config
from diffusion.prepare import DataError, folder_records, prepare
from flows.s3 import list_keys, s3_records, safe_relative_key
from flows.stages import main as stages_main
from tests.data.test_prepare import make_folder


@pytest.fixture
def bucket(s3_env):
    name = f"b-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def upload_folder(bucket, root, prefix):
    s3 = boto3.client("s3")
    for path in sorted(root.rglob("*")):
        if path.is_file():
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(root).as_posix()}",
                          Body=path.read_bytes())


def test_s3_prefix_matches_the_same_folder(tmp_path, bucket, capsys):
    root = make_folder(tmp_path / "imgs", n_per_class=6)
    upload_folder(bucket, root, "train/v1")
    boto3.client("s3").put_object(Bucket=bucket, Key="other/x.png", Body=b"outside the prefix")
    calls = []
    client = boto3.client("s3")
    client.meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: calls.append(1))
    keys = list_keys(f"s3://{bucket}/train/v1", client, page_size=5)
    assert len(keys) == 12 and len(calls) == 3                   # 12 keys in pages of 5
    via_s3 = prepare(s3_records(f"s3://{bucket}/train/v1", workers=4, page_size=5), tmp_path / "s3",
                     resolution=8, channels=3, heldout_fraction=0.3)
    via_folder = prepare(folder_records(root), tmp_path / "folder", resolution=8, channels=3,
                         heldout_fraction=0.3)
    assert via_s3.classes == via_folder.classes == ["cat", "dog"]
    assert via_s3.counts == via_folder.counts
    for name in ("train-00000.npy", "heldout-00000.npy"):        # same pixels, same split
        assert np.array_equal(np.load(tmp_path / "s3" / name), np.load(tmp_path / "folder" / name))


def test_stage_reads_s3_from_params_without_leaking_credentials(tmp_path, bucket, s3_env, capsys):
    upload_folder(bucket, make_folder(tmp_path / "imgs", n_per_class=4), "p")
    out = tmp_path / "prepared"
    rc = stages_main(["prepare", "--params", "params.yaml", "data.source=s3", f"data.path=s3://{bucket}/p",
                      "data.resolution=8", "data.channels=3", f"data.prepared_dir={out}", "model.preset=tiny",
                      "model.num_classes=2"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    summary = json.loads(printed.out)
    assert summary["counts"]["train"] + summary["counts"]["heldout"] == 8
    everything = printed.out + printed.err + "".join(p.read_text() for p in out.glob("*.csv")) + \
        (out / "stats.json").read_text()
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in everything
    assert s3_env["AWS_ACCESS_KEY_ID"] not in everything
    stats = json.loads((out / "stats.json").read_text())
    assert stats["source"] == "s3" and bucket not in json.dumps(stats)   # the data, not its location


def test_missing_bucket_and_empty_prefix(tmp_path, bucket):
    with pytest.raises(DataError, match=r"s3://no-such-bucket-xyz/a: bucket does not exist"):
        list(s3_records("s3://no-such-bucket-xyz/a"))
    with pytest.raises(DataError, match="no PNG or JPEG objects under this prefix"):
        list(s3_records(f"s3://{bucket}/nothing-here"))
    with pytest.raises(DataError, match="expected s3://bucket/prefix"):
        list(s3_records("http://example/x"))


def test_escaping_keys_are_refused(tmp_path, bucket):
    s3 = boto3.client("s3")
    good = (make_folder(tmp_path / "imgs", n_per_class=2) / "cat" / "000.png").read_bytes()
    s3.put_object(Bucket=bucket, Key="d/cat/ok.png", Body=good)
    s3.put_object(Bucket=bucket, Key="d/cat/../../evil.png", Body=good)
    s3.put_object(Bucket=bucket, Key="d//abs.png", Body=good)
    with pytest.raises(DataError, match=r"(evil|abs).png: key would escape the target directory"):
        prepare(s3_records(f"s3://{bucket}/d"), tmp_path / "out", resolution=8, channels=3,
                heldout_fraction=0.5)
    s3.put_object(Bucket=bucket, Key="d/cat/corrupt.png", Body=b"\x89PNG\r\n\x1a\nnot a png")
    result = prepare(s3_records(f"s3://{bucket}/d"), tmp_path / "out", resolution=8, channels=3,
                     heldout_fraction=0.5, bad_files="skip")
    assert result.rejects == 3 and sum(result.counts.values()) == 1
    # each reject row keeps the object's whole key (an s3:// URI has a colon of its own)
    rows = (tmp_path / "out" / "rejects.csv").read_text().splitlines()
    keys = sorted(row.split(",", 1)[0] for row in rows[1:])
    assert keys == sorted([f"s3://{bucket}/d//abs.png", f"s3://{bucket}/d/cat/../../evil.png",
                           f"s3://{bucket}/d/cat/corrupt.png"])
    assert "0x" not in "".join(rows)
    assert safe_relative_key("p/a/b.png", "p") == "a/b.png"
    assert safe_relative_key("p/../b.png", "p") is None and safe_relative_key("p//b.png", "p") is None
    assert safe_relative_key("pq/b.png", "p") is None and safe_relative_key("p/b.png", "p/") == "b.png"


def test_config_requires_an_s3_uri():
    from diffusion.config import ConfigError
    with pytest.raises(ConfigError, match=r"data.path = '': data.source = 's3' needs a path"):
        load_config(None, ["data.source=s3"])
    with pytest.raises(ConfigError, match=r"data.path = 'bucket/x': expected s3://bucket/prefix"):
        load_config(None, ["data.source=s3", "data.path=bucket/x"])


def test_access_denied_is_named(tmp_path, monkeypatch):
    """A second moto server with authentication on: unknown credentials get a real 403."""
    import os
    import subprocess
    import sys
    import time

    from tests.conftest import free_port
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                import urllib.request
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
                break
            except Exception as exc:  # noqa: BLE001 - waiting for the port
                if "HTTP Error" in str(exc):
                    break
                time.sleep(0.3)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-real-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-456")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        with pytest.raises(DataError, match=r"s3://locked/data: access denied \(InvalidAccessKeyId\)") as err:
            list(s3_records("s3://locked/data"))
        assert "wrong-secret-456" not in str(err.value)
    finally:
        server.terminate()
        server.wait(timeout=10)
