"""The streaming writer (diffusion.prepare.write_prepared): the same bytes as a writer that holds
the whole dataset (an independent copy of the previous implementation below), on a dataset of
many shards, under both bad-file policies; a bad file or an interruption after several full
shards leaves the prior prepared data as it was; keys must arrive sorted."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from diffusion import prepare as prep_mod
from diffusion.prepare import (MANIFEST_COLUMNS, SPLITS, BadFile, DataError, KeyOrdered, Record,
                               dataset_version, prepare, prepare_record, shard_images, split_of,
                               write_prepared)


def reference_writer(items, out_dir, *, resolution, channels, heldout_fraction, bad_files="fail", source=""):
    """The writer before streaming: collect everything, sort by key, write split by split."""
    prepared, rejects = [], []
    for item in items:
        if isinstance(item, BadFile):
            if bad_files == "fail":
                raise DataError(f"{item} (data.bad_files = 'fail'; use 'skip' to list and skip bad files)")
            rejects.append((item.key, item.reason))
        else:
            prepared.append(item)
    rejects.sort()
    prepared.sort(key=lambda p: p.key)
    classes = sorted({p.label for p in prepared if p.label is not None},
                     key=lambda n: (0, int(n)) if n.isdigit() else (1, n))
    index_of = {c: i for i, c in enumerate(classes)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    rows, counts, sums = [], {s: 0 for s in SPLITS}, {}
    for split in SPLITS:
        members = [p for p in prepared if split_of(p.sha256, heldout_fraction) == split]
        per_shard = shard_images(resolution, channels)
        for shard_no, start in enumerate(range(0, len(members), per_shard)):
            chunk = members[start:start + per_shard]
            stack = np.stack([p.pixels for p in chunk])
            np.save(out_dir / f"{split}-{shard_no:05d}.npy", stack, allow_pickle=False)
            pix = stack.astype(np.float64)
            acc = sums.setdefault(split, [np.zeros(channels), np.zeros(channels), 0])
            acc[0] += pix.sum(axis=(0, 2, 3))
            acc[1] += (pix**2).sum(axis=(0, 2, 3))
            acc[2] += pix[:, 0].size
            for i, p in enumerate(chunk):
                rows.append((p.sha256[:16], p.key, p.sha256, index_of.get(p.label, -1),
                             resolution, resolution, channels, split, shard_no, i))
        counts[split] = len(members)
    for name, header, body in (("manifest.csv", MANIFEST_COLUMNS, rows),
                               ("rejects.csv", ("source_key", "reason"), rejects)):
        with (out_dir / name).open("w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(header)
            w.writerows(body)
    stats = {"source": source, "resolution": resolution, "channels": channels,
             "heldout_fraction": heldout_fraction, "counts": counts, "classes": classes,
             "rejects": len(rejects), "pixel_mean": {}, "pixel_std": {}}
    for split, (total, sq, n) in sums.items():
        mean = total / n
        stats["pixel_mean"][split] = [round(float(v), 4) for v in mean]
        stats["pixel_std"][split] = [round(float(v), 4) for v in np.sqrt(np.maximum(sq / n - mean**2, 0))]
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")


def records(n, bad_every=0, labels=("a", "b", "10", "2", "c d")):
    """``n`` 6x6 RGB images with some odd labels (a space, numbers sorting as numbers), every
    ``bad_every``-th one a bad file; keys sorted, some with a tab, a comma and a quote."""
    rng = np.random.default_rng(n)
    out = []
    for i in range(n):
        odd = ("\t", ",\"q\"", "\r", "\n", "\r\n")[i % 5]         # keys a CSV file must quote
        key = f"{labels[i % len(labels)]}/img{odd}{i:05d}.png" if i % 7 == 0 else \
            f"{labels[i % len(labels)]}/img{i:05d}.png"
        label = None if i % 11 == 0 else labels[i % len(labels)]       # unlabelled images too
        if bad_every and i % bad_every == bad_every - 1:
            out.append(Record(key, b"not an image", label))
        else:
            out.append(Record(key, rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), label))
    return sorted(out, key=lambda r: r.key)


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


@pytest.fixture
def small_shards(monkeypatch):
    # 6x6x3 = 108 bytes per image: 7 images per shard, so 300 images make ~40 shards
    monkeypatch.setattr(prep_mod, "SHARD_BYTES", 7 * 108)
    assert shard_images(6, 3) == 7


@pytest.mark.parametrize("policy, bad_every", [("fail", 0), ("skip", 0), ("skip", 9)])
def test_streaming_writer_gives_the_bytes_of_the_whole_dataset_writer(tmp_path, small_shards, policy, bad_every):
    recs = records(300, bad_every)
    kw = dict(resolution=6, channels=3, heldout_fraction=0.2, bad_files=policy, source="test")
    result = prepare(KeyOrdered(recs), tmp_path / "new", **kw)
    reference_writer((prepare_record(r, 6, 3) for r in recs), tmp_path / "old", **kw)
    assert len([f for f in files(tmp_path / "new") if f.endswith(".npy")]) > 30
    assert files(tmp_path / "new") == files(tmp_path / "old")
    assert result.version == dataset_version(tmp_path / "old")
    assert result.rejects == (300 // 9 if bad_every else 0)


def test_a_bad_file_after_full_shards_keeps_the_prior_data(tmp_path, small_shards):
    out = tmp_path / "prepared"
    prepare(KeyOrdered(records(50)), out, resolution=6, channels=3, heldout_fraction=0.2)
    before = files(out)
    recs = records(300)
    recs[250] = Record(recs[250].key, b"\x89PNG broken", "a")      # after ~35 shards were written
    with pytest.raises(DataError, match="^" + re.escape(recs[250].key) +
                       r": not a readable image .*data.bad_files = 'fail'"):
        prepare(KeyOrdered(recs), out, resolution=6, channels=3, heldout_fraction=0.2)
    assert files(out) == before
    assert not (tmp_path / "prepared.tmp").exists()


def test_an_interrupted_prepare_keeps_the_prior_data(tmp_path, small_shards):
    out = tmp_path / "prepared"
    prepare(KeyOrdered(records(50)), out, resolution=6, channels=3, heldout_fraction=0.2)
    before = files(out)

    def interrupted():
        for i, r in enumerate(records(300)):
            if i == 200:
                raise KeyboardInterrupt            # Ctrl-C in the middle of the stream
            yield r
    with pytest.raises(KeyboardInterrupt):
        prepare(KeyOrdered(interrupted()), out, resolution=6, channels=3, heldout_fraction=0.2)
    assert files(out) == before
    assert not (tmp_path / "prepared.tmp").exists()


def test_keys_out_of_order_are_refused_by_the_writer_and_sorted_by_prepare(tmp_path):
    recs = records(20)
    with pytest.raises(ValueError, match="must come sorted by key"):
        write_prepared((prepare_record(r, 6, 3) for r in recs[::-1]), tmp_path / "a", resolution=6,
                       channels=3, heldout_fraction=0.2)
    with pytest.raises(ValueError, match="must come sorted by key"):      # a source that breaks its promise
        prepare(KeyOrdered(recs[::-1]), tmp_path / "a", resolution=6, channels=3, heldout_fraction=0.2)
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.tmp").exists()
    a = prepare(iter(recs[::-1]), tmp_path / "b", resolution=6, channels=3, heldout_fraction=0.2)
    b = prepare(KeyOrdered(recs), tmp_path / "c", resolution=6, channels=3, heldout_fraction=0.2)
    assert a.version == b.version


def test_progress_reports_images_and_rejects(tmp_path):
    seen = []
    recs = records(30, bad_every=10)
    write_prepared((prepare_record(r, 6, 3) for r in recs), tmp_path / "p", resolution=6,
                            channels=3, heldout_fraction=0.2, bad_files="skip",
                            progress=lambda images, rejects: seen.append((images, rejects)))
    assert len(seen) == 30 and seen[-1] == (27, 3)
    assert all(a <= b for a, b in zip(seen, seen[1:]))
