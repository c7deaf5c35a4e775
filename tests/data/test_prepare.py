"""Prepare: sources, conversion rules, determinism and every bad-input path."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from diffusion.prepare import (BadFile, DataError, Record, conform, dataset_version, decode, folder_records,
                               packaged_records, prepare, split_of)


def png(arr, mode=None, **save):
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG", **save)
    return buf.getvalue()


def make_folder(root, n_per_class=6, classes=("cat", "dog"), size=(10, 12)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            ext = "png" if i % 2 == 0 else "jpg"
            Image.fromarray(arr).save(root / c / f"{i:03d}.{ext}")
    return root


def prep(records, out, **kw):
    kw = {"resolution": 8, "channels": 1, "heldout_fraction": 0.3, **kw}
    return prepare(records, out, **kw)


def test_packaged_sources_are_real_digits():
    mnist = list(packaged_records("mnist"))
    assert len(mnist) == 5000 and mnist[0].payload.shape == (28, 28)
    assert {r.label for r in mnist} == {str(i) for i in range(10)}
    digits = list(packaged_records("digits"))
    assert len(digits) == 1797
    assert max(int(r.payload.max()) for r in digits) == 255              # 16 grey levels -> 0..255
    with pytest.raises(DataError, match="data.source = 'cifar': not a packaged dataset"):
        list(packaged_records("cifar"))


def test_prepare_is_byte_identical_and_versioned(tmp_path):
    a = prep(packaged_records("digits"), tmp_path / "a")
    b = prep(packaged_records("digits"), tmp_path / "b")
    assert a.version == b.version
    for name in os.listdir(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a.counts["train"] + a.counts["heldout"] == 1797
    assert 0.25 < a.counts["heldout"] / 1797 < 0.35
    # the same input in another order gives the same bytes
    c = prep(reversed(list(packaged_records("digits"))), tmp_path / "c")
    assert c.version == a.version
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert stats["counts"] == a.counts and stats["classes"] == [str(i) for i in range(10)]


def test_split_follows_the_content_hash():
    assert split_of("00000000" + "0" * 56, 0.1) == "heldout"
    assert split_of("ffffffff" + "0" * 56, 0.1) == "train"
    assert split_of("19999999" + "0" * 56, 0.1) == "heldout"     # 0x19999999 / 2^32 < 0.1
    assert split_of("1999999a" + "0" * 56, 0.1) == "train"


def test_conversion_rules_closed_form():
    # centre crop of the shorter side: a 4x6 image keeps columns 1..4
    arr = np.arange(24, dtype=np.uint8).reshape(4, 6, 1)
    out = conform(arr, 4, 1)
    assert out.shape == (1, 4, 4) and (out[0] == arr[:, 1:5, 0]).all()
    # RGB -> grey uses ITU-R 601 luma (Pillow's L conversion): L = (299 R + 587 G + 114 B) / 1000
    rgb = np.array([[[200, 100, 50]]], dtype=np.uint8)
    assert conform(rgb, 1, 1)[0, 0, 0] == round((299 * 200 + 587 * 100 + 114 * 50) / 1000)
    # grey -> RGB repeats the channel; uniform images stay uniform through resizing
    assert (conform(np.full((5, 5, 1), 77, np.uint8), 3, 3) == 77).all()


def test_mode_conversions(tmp_path):
    grey = np.full((6, 6), 128, np.uint8)
    assert decode(Record("g.png", png(grey))).shape == (6, 6, 1)
    opaque = np.dstack([np.full((6, 6, 3), 9, np.uint8), np.full((6, 6), 255, np.uint8)])
    assert decode(Record("o.png", png(opaque, "RGBA"))).shape == (6, 6, 3)   # opaque alpha dropped
    pal = Image.fromarray(np.full((6, 6, 3), 40, np.uint8)).convert("P")
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    # palette without transparency -> the palette's RGB colours
    assert (decode(Record("p.png", buf.getvalue())) == np.asarray(pal.convert("RGB"))).all()


@pytest.mark.parametrize("name, payload, reason", [
    ("corrupt.png", b"\x89PNG\r\n\x1a\nthis is not a png", "not a readable image"),
    ("sixteen.png", png(np.full((4, 4), 40000, np.uint16)), "16/32-bit or float"),
    ("alpha.png", png(np.dstack([np.zeros((4, 4, 3), np.uint8), np.full((4, 4), 10, np.uint8)]), "RGBA"),
     "has transparency"),
])
def test_bad_images_are_named(name, payload, reason):
    with pytest.raises(DataError, match=f"{name}: .*{reason}"):
        decode(Record(name, payload))


def test_truncated_and_palette_alpha(tmp_path):
    whole = png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    with pytest.raises(DataError, match="cut.png: not a readable image"):
        decode(Record("cut.png", whole[: len(whole) // 2]))
    img = Image.fromarray(np.zeros((4, 4, 3), np.uint8)).convert("P")
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    with pytest.raises(DataError, match="pa.png: has transparency"):
        decode(Record("pa.png", buf.getvalue()))


def test_folder_source_labels_from_subfolders(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "notes.txt").write_text("not an image")
    result = prep(folder_records(root), tmp_path / "out", channels=3)
    assert result.classes == ["cat", "dog"] and sum(result.counts.values()) == 12
    manifest = (tmp_path / "out" / "manifest.csv").read_text().splitlines()
    assert manifest[0] == "id,source_key,sha256,label,height,width,channels,split,shard,index"
    keys = sorted(line.split(",")[1] for line in manifest[1:])
    assert keys[0] == "cat/000.png" and keys[-1] == "dog/005.jpg"
    shard = np.load(tmp_path / "out" / "train-00000.npy")
    assert shard.dtype == np.uint8 and shard.shape[1:] == (3, 8, 8)


def test_bad_files_fail_or_skip(tmp_path):
    root = make_folder(tmp_path / "imgs", n_per_class=3)
    (root / "cat" / "broken.png").write_bytes(b"garbage")
    outside = tmp_path / "secret.png"
    outside.write_bytes(png(np.zeros((4, 4), np.uint8)))
    os.symlink(outside, root / "dog" / "escape.png")
    with pytest.raises(DataError, match=r"cat/broken.png: not a readable image.*data.bad_files = 'fail'"):
        prep(folder_records(root), tmp_path / "out")
    assert not (tmp_path / "out").exists()                        # nothing half-written
    result = prep(folder_records(root), tmp_path / "out", bad_files="skip")
    assert result.rejects == 2 and sum(result.counts.values()) == 6
    rejects = (tmp_path / "out" / "rejects.csv").read_text()
    assert "cat/broken.png" in rejects and "dog/escape.png" in rejects and "symlink out" in rejects


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG or JPEG images found"):
        list(folder_records(tmp_path / "empty"))
    with pytest.raises(DataError, match="not a directory"):
        list(folder_records(tmp_path / "missing"))


def test_failed_prepare_keeps_the_previous_output(tmp_path):
    good = prep(packaged_records("digits"), tmp_path / "out")
    with pytest.raises(DataError):
        prep([Record("bad.png", b"nope")], tmp_path / "out")
    assert dataset_version(tmp_path / "out") == good.version      # nothing stored was lost


def test_reject_reasons_are_stable_text(tmp_path):
    """PIL's messages carry object reprs with memory addresses; rejects.csv must not."""
    records = [Record("a/junk.png", b"not an image at all"), *packaged_records("digits")]
    one = prep(records, tmp_path / "one", bad_files="skip")
    two = prep(records, tmp_path / "two", bad_files="skip")
    text = (tmp_path / "one" / "rejects.csv").read_text()
    assert text == (tmp_path / "two" / "rejects.csv").read_text() and one.version == two.version
    assert "0x" not in text and "object at" not in text
    assert text.splitlines()[1].startswith("a/junk.png,not a readable image (UnidentifiedImageError")
    with pytest.raises(BadFile) as err:
        decode(Record("x.png", b"junk"))
    assert err.value.key == "x.png" and err.value.reason.startswith("not a readable image")


def _same_tree(root):
    """The same image files in ``root``: two classes, one unreadable file."""
    make_folder(root, n_per_class=4)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    return root


def _output(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_same_files_in_two_folders_give_identical_bytes(tmp_path):
    """The dataset version depends on the images, never on the folder they were read from."""
    a = _same_tree(tmp_path / "first clone" / "images")
    b = _same_tree(tmp_path / "elsewhere" / "deeper" / "imgs")
    ra = prep(folder_records(a), tmp_path / "out-a", channels=3, bad_files="skip", source="folder",
              origin=f"folder:{a}")
    rb = prep(folder_records(b), tmp_path / "out-b", channels=3, bad_files="skip", source="folder",
              origin=f"folder:{b}")
    assert ra.version == rb.version and ra.rejects == 1
    assert _output(tmp_path / "out-a") == _output(tmp_path / "out-b")
    stats = (tmp_path / "out-a" / "stats.json").read_text()
    assert str(tmp_path) not in stats and json.loads(stats)["source"] == "folder"
    # fail policy: the same refusal (naming the file by its relative key) from both folders
    errors = []
    for root in (a, b):
        with pytest.raises(DataError) as err:
            prep(folder_records(root), tmp_path / "out-fail", channels=3, source="folder")
        errors.append(str(err.value))
    assert errors[0] == errors[1] and errors[0].startswith("cat/broken.png: not a readable image")
    for root in (a, b):
        (root / "cat" / "broken.png").unlink()
    fa = prep(folder_records(a), tmp_path / "fail-a", channels=3, source="folder")
    fb = prep(folder_records(b), tmp_path / "fail-b", channels=3, source="folder")
    assert fa.version == fb.version and _output(tmp_path / "fail-a") == _output(tmp_path / "fail-b")


def test_symlinked_directories_are_followed_inside_and_refused_outside(tmp_path):
    root = make_folder(tmp_path / "imgs", n_per_class=2)
    extra = make_folder(tmp_path / "store" / "bird", n_per_class=2, classes=("x",))
    os.symlink(root / "cat", root / "kitten")                        # inside: followed
    os.symlink(extra / "x", root / "bird")                           # outside: refused
    os.symlink(root, root / "dog" / "loop")                          # a loop: refused
    records = list(folder_records(root))
    keys = sorted(r.key for r in records if isinstance(r, Record))
    assert keys == ["cat/000.png", "cat/001.jpg", "dog/000.png", "dog/001.jpg",
                    "kitten/000.png", "kitten/001.jpg"]
    refused = {r.key: r.reason for r in records if isinstance(r, BadFile)}
    assert set(refused) == {"bird/", "dog/loop/"}
    assert "outside the source folder" in refused["bird/"] and "loop" in refused["dog/loop/"]
    with pytest.raises(DataError, match=r"bird/: directory link resolves outside.*data.bad_files = 'fail'"):
        prep(folder_records(root), tmp_path / "out", channels=3)
    # under skip the refused links are listed in rejects.csv; kitten/ duplicates cat/ by content
    # (validation reports that), but it was read, not skipped silently
    result = prep(folder_records(root), tmp_path / "out", channels=3, bad_files="skip")
    rejects = (tmp_path / "out" / "rejects.csv").read_text()
    assert result.rejects == 2 and "bird/," in rejects and "dog/loop/," in rejects
    assert str(tmp_path) not in rejects
