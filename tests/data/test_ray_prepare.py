"""The Ray Data prepare engine (data.engine: ray) on a real local Ray cluster against the local
engine: byte-identical output for a folder and an S3 prefix (moto's server), the same rejects
under 'skip' and the same error under 'fail'."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
from PIL import Image

from flows.stages import main as stages_main
from tests.data.test_prepare import make_folder
from tests.data.test_s3_source import upload_folder
from tests.helpers import REPO

# One driver, one Ray cluster, several stage runs: each case's exit status and stderr come back.
DRIVER = """
import contextlib, io, json, sys
from flows.stages import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    results.append({"rc": rc, "err": err.getvalue()})
print("RESULTS " + json.dumps(results))
"""


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _source(tmp_path: Path) -> Path:
    """Colour and grey images of several sizes in three classes, a corrupt file, and a link that
    leaves the folder."""
    root = make_folder(tmp_path / "imgs", n_per_class=7, classes=("cat", "dog", "owl"), size=(20, 14))
    Image.new("L", (9, 9), 77).save(root / "owl" / "grey.png")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "outside.png").write_bytes((root / "cat" / "000.png").read_bytes())
    os.symlink(tmp_path / "outside.png", root / "cat" / "zz-link.png")
    return root


def _args(source: str, path: str, out: Path, policy: str, engine: str) -> list[str]:
    return ["prepare", "--params", str(REPO / "params.yaml"), f"data.source={source}", f"data.path={path}",
            "data.resolution=12", "data.channels=3", f"data.bad_files={policy}", f"data.engine={engine}",
            "data.ray_workers=2", f"data.prepared_dir={out}", "model.preset=tiny"]


@pytest.mark.slow
def test_ray_engine_matches_the_local_engine(tmp_path, s3_env, capsys):
    root = _source(tmp_path)
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    upload_folder(bucket, make_folder(tmp_path / "s3imgs", n_per_class=6), "p")
    s3.put_object(Bucket=bucket, Key="p/cat/bad.jpg", Body=b"not a jpeg")
    s3.put_object(Bucket=bucket, Key="p/../escape.png", Body=(root / "cat" / "000.png").read_bytes())
    cases = {"folder-skip": ("folder", str(root), "skip"), "folder-fail": ("folder", str(root), "fail"),
             "s3-skip": ("s3", f"s3://{bucket}/p", "skip"), "s3-fail": ("s3", f"s3://{bucket}/p", "fail")}

    local = {}
    for name, (source, path, policy) in cases.items():
        rc = stages_main(_args(source, path, tmp_path / "local" / name, policy, "local"))
        local[name] = {"rc": rc, "err": capsys.readouterr().err}

    argvs = [_args(source, path, tmp_path / "ray" / name, policy, "ray")
             for name, (source, path, policy) in cases.items()]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULTS ")]
    assert out.returncode == 0 and lines, out.stdout[-2000:] + out.stderr[-3000:]
    ray = dict(zip(cases, json.loads(lines[-1][len("RESULTS "):])))

    for name in ("folder-skip", "s3-skip"):
        assert local[name]["rc"] == ray[name]["rc"] == 0, (local[name], ray[name])
        a, b = _tree(tmp_path / "local" / name), _tree(tmp_path / "ray" / name)
        assert a == b and "manifest.csv" in a and "train-00000.npy" in a
    rejects = (tmp_path / "ray" / "folder-skip" / "rejects.csv").read_text()
    assert "dog/broken.png" in rejects and "cat/zz-link.png" in rejects and "symlink out" in rejects
    rejects = (tmp_path / "ray" / "s3-skip" / "rejects.csv").read_text()
    assert "cat/bad.jpg" in rejects and "escape the target directory" in rejects
    for name in ("folder-fail", "s3-fail"):          # the same first bad file, the same message
        assert local[name]["rc"] == ray[name]["rc"] == 2
        errors = [[x for x in r[name]["err"].splitlines() if x.startswith("error:")] for r in (local, ray)]
        assert errors[0] == errors[1] and len(errors[0]) == 1
        assert "data.bad_files = 'fail'" in ray[name]["err"]
        assert not (tmp_path / "ray" / name).exists()


def test_a_task_decoding_with_other_code_or_libraries_is_refused(tmp_path):
    import io

    import numpy as np

    from flows.ray_prepare import DecoderMismatch, _decode_batch, check_decoders, decoder_version
    png = io.BytesIO()
    Image.new("RGB", (10, 10), (9, 99, 199)).save(png, format="PNG")
    batch = {"pos": np.array([0]), "key": np.array(["cat/a.png"], dtype=object),
             "label": np.array(["cat"], dtype=object), "payload": np.array([png.getvalue()], dtype=object)}
    out = _decode_batch(batch, resolution=8, channels=3)
    assert out["reason"][0] == "" and len(out["pixels"][0]) == 3 * 8 * 8
    check_decoders(set(out["version"]), decoder_version())          # this process: accepted
    other = {**json.loads(out["version"][0]), "pillow": "9.0.0", "node": "node-b"}
    with pytest.raises(DecoderMismatch, match=r"node node-b decodes with code \w+, Pillow 9.0.0"):
        check_decoders({json.dumps(other)}, decoder_version())
