"""Validate a prepared dataset with pandera before any training starts.

A ``DataFrameModel`` checks the manifest row by row; dataset-level checks cover what no single row
shows: unique content hashes (duplicates reported with both keys), labels in range, one image
shape, no empty split, pixel statistics that are not degenerate, no overlap between train and
held-out. Validation is lazy: every failure goes into one report (``report.json`` and a readable
``report.txt`` in the output directory), then :class:`ValidationFailed` is raised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from diffusion.prepare import MANIFEST_COLUMNS, SPLITS


class ValidationFailed(RuntimeError):
    """The dataset failed validation; the message summarises, the report lists every failure."""


class ManifestSchema(pa.DataFrameModel):
    id: Series[str] = pa.Field(str_matches=r"^[0-9a-f]{16}$")
    source_key: Series[str] = pa.Field(str_length={"min_value": 1})
    sha256: Series[str] = pa.Field(str_matches=r"^[0-9a-f]{64}$")
    label: Series[int] = pa.Field(ge=-1)
    height: Series[int] = pa.Field(gt=0)
    width: Series[int] = pa.Field(gt=0)
    channels: Series[int] = pa.Field(isin=[1, 3])
    split: Series[str] = pa.Field(isin=list(SPLITS))
    shard: Series[int] = pa.Field(ge=0)
    index: Series[int] = pa.Field(ge=0)

    class Config:
        strict = True          # no missing or extra columns
        coerce = False


@dataclass
class ValidationReport:
    dataset: str
    rows: int
    failures: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def add(self, check: str, message: str, cases: list | None = None) -> None:
        self.failures.append({"check": check, "message": message, "cases": (cases or [])[:50]})

    def text(self) -> str:
        head = f"dataset {self.dataset}: {self.rows} rows, " + (
            "all checks passed" if self.ok else f"{len(self.failures)} failed checks")
        lines = [head]
        for f in self.failures:
            lines.append(f"- [{f['check']}] {f['message']}")
            lines += [f"    {c}" for c in f["cases"][:10]]
        return "\n".join(lines) + "\n"


def _schema_failures(manifest: pd.DataFrame, report: ValidationReport) -> None:
    try:
        ManifestSchema.validate(manifest, lazy=True)
    except pa.errors.SchemaErrors as err:
        cases = err.failure_cases
        for (column, check), group in cases.groupby(["column", "check"], dropna=False, sort=True):
            sample = [f"row {r}: {v!r}" for r, v in zip(group["index"], group["failure_case"])]
            report.add("schema", f"manifest column {column!r} fails {check} "
                                 f"({len(group)} rows)", sample)


def _dataset_failures(manifest: pd.DataFrame, directory: Path, num_classes: int,
                      min_pixel_std: float, report: ValidationReport) -> None:
    dup = manifest[manifest.duplicated("sha256", keep=False)]
    if len(dup):
        pairs = [" == ".join(g["source_key"]) for _, g in dup.groupby("sha256", sort=True)]
        report.add("unique_content", f"{len(pairs)} images occur more than once (same pixels)", pairs)
    labels = manifest["label"]
    bad_labels = manifest[(labels < -1) | (labels >= max(num_classes, 0))] if num_classes else \
        manifest[labels != -1]
    if len(bad_labels):
        report.add("labels_in_range", f"{len(bad_labels)} labels outside [-1, {num_classes})",
                   [f"{k}: {v}" for k, v in zip(bad_labels["source_key"], bad_labels["label"])])
    shapes = manifest[["channels", "height", "width"]].drop_duplicates()
    if len(shapes) > 1:
        report.add("one_shape", f"{len(shapes)} different image shapes",
                   [tuple(int(v) for v in row) for row in shapes.itertuples(index=False)])
    for split in SPLITS:
        if not (manifest["split"] == split).any():
            report.add("split_not_empty", f"split {split!r} has no images")
    overlap = set(manifest.loc[manifest["split"] == "train", "sha256"]) & set(
        manifest.loc[manifest["split"] == "heldout", "sha256"])
    if overlap:
        keys = manifest.loc[manifest["sha256"].isin(overlap), "source_key"].tolist()
        report.add("no_split_overlap", f"{len(overlap)} images are in both train and heldout", keys)
    for split in SPLITS:
        for shard in sorted(directory.glob(f"{split}-*.npy")):
            pixels = np.load(shard, allow_pickle=False)
            std = float(pixels.astype(np.float32).std())
            if std < min_pixel_std:
                report.add("pixel_stats", f"{shard.name}: pixel std {std:.3f} < {min_pixel_std} "
                                          "(constant or near-constant images)")
    counts = manifest.groupby(["split", "shard"]).size()
    for (split, shard), n in counts.items():
        path = directory / f"{split}-{int(shard):05d}.npy"
        if not path.exists():
            report.add("shards_present", f"{path.name} is missing ({n} manifest rows point at it)")
        elif np.load(path, mmap_mode="r").shape[0] != n:
            report.add("shards_present", f"{path.name} holds a different number of images than "
                                         f"its {n} manifest rows")


def validate_dataset(directory: str | Path, report_dir: str | Path, *, num_classes: int | None = None,
                     min_pixel_std: float = 1.0) -> ValidationReport:
    """Check a prepared dataset; write ``report.json`` and ``report.txt`` into ``report_dir``;
    raise :class:`ValidationFailed` if anything failed."""
    directory, report_dir = Path(directory), Path(report_dir)
    manifest_path = directory / "manifest.csv"
    if not manifest_path.is_file():
        raise ValidationFailed(f"{manifest_path}: not found; run the prepare stage first")
    manifest = pd.read_csv(manifest_path, dtype={"id": str, "sha256": str, "source_key": str})
    stats = json.loads((directory / "stats.json").read_text()) if (directory / "stats.json").exists() else {}
    if num_classes is None:
        num_classes = len(stats.get("classes", []))
    report = ValidationReport(str(directory), len(manifest))
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    _schema_failures(manifest, report)
    if not missing:
        _dataset_failures(manifest, directory, num_classes, min_pixel_std, report)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "report.json").write_text(json.dumps(
        {"dataset": report.dataset, "rows": report.rows, "ok": report.ok,
         "failures": report.failures}, indent=2, default=str) + "\n")
    (report_dir / "report.txt").write_text(report.text())
    if not report.ok:
        summary = "; ".join(f"[{f['check']}] {f['message']}" for f in report.failures[:5])
        raise ValidationFailed(f"{directory}: validation failed ({len(report.failures)} checks): "
                               f"{summary}. Full report: {report_dir / 'report.txt'}")
    return report
