"""Create the pipeline's S3 buckets on any S3-compatible endpoint (MinIO, AWS), idempotently.

    AWS_ENDPOINT_URL=http://minio:9000 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \\
        python infra/bootstrap_buckets.py [--dvc ddpm-dvc] [--mlflow ddpm-mlflow] [--ray ddpm-ray]
        [--checkpoint-days 30] [--noncurrent-days 7]

Each bucket gets versioning (an overwritten or deleted object can be recovered) and a lifecycle
rule ``ddpm-noncurrent`` that expires non-current versions after ``--noncurrent-days``; the Ray
bucket also gets ``ddpm-old-checkpoints``, expiring objects under ``ray/`` (where
``ray.storage_path = s3://<ray bucket>/ray`` puts run checkpoints) after ``--checkpoint-days``.
Running it again changes nothing; lifecycle rules with other IDs are kept as they are. Prints a
JSON report of what it did. Credentials and endpoint come from the standard AWS settings only.
"""

from __future__ import annotations

import argparse
import json
import sys

import boto3
from botocore.exceptions import BotoCoreError, ClientError

NONCURRENT_RULE = "ddpm-noncurrent"
CHECKPOINT_RULE = "ddpm-old-checkpoints"


def _rules(client, bucket: str) -> list[dict]:
    try:
        return client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("NoSuchLifecycleConfiguration", "NoSuchLifecycle"):
            return []
        raise


def ensure_bucket(client, bucket: str, *, noncurrent_days: int, checkpoint_days: int | None) -> dict:
    report = {"bucket": bucket}
    try:
        client.head_bucket(Bucket=bucket)
        report["bucket_action"] = "exists"
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in ("404", "NoSuchBucket", "NotFound"):
            raise
        client.create_bucket(Bucket=bucket)
        report["bucket_action"] = "created"
    if client.get_bucket_versioning(Bucket=bucket).get("Status") == "Enabled":
        report["versioning"] = "already enabled"
    else:
        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        report["versioning"] = "enabled"
    ours = [{"ID": NONCURRENT_RULE, "Status": "Enabled", "Filter": {"Prefix": ""},
             "NoncurrentVersionExpiration": {"NoncurrentDays": noncurrent_days}}]
    if checkpoint_days is not None:
        ours.append({"ID": CHECKPOINT_RULE, "Status": "Enabled", "Filter": {"Prefix": "ray/"},
                     "Expiration": {"Days": checkpoint_days}})
    existing = _rules(client, bucket)
    others = [r for r in existing if r.get("ID") not in {NONCURRENT_RULE, CHECKPOINT_RULE}]
    current = {r["ID"]: r for r in existing if r.get("ID") in {NONCURRENT_RULE, CHECKPOINT_RULE}}
    if all(_same_rule(current.get(r["ID"]), r) for r in ours) and len(current) == len(ours):
        report["lifecycle"] = "unchanged"
    else:
        client.put_bucket_lifecycle_configuration(Bucket=bucket,
                                                  LifecycleConfiguration={"Rules": others + ours})
        report["lifecycle"] = "set"
    report["lifecycle_rules"] = sorted(r["ID"] for r in others + ours)
    return report


def _same_rule(have: dict | None, want: dict) -> bool:
    if have is None:
        return False
    return all(have.get(k) == v for k, v in want.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python infra/bootstrap_buckets.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dvc", default="ddpm-dvc", help="DVC remote bucket")
    ap.add_argument("--mlflow", default="ddpm-mlflow", help="MLflow artifact bucket")
    ap.add_argument("--ray", default="ddpm-ray", help="Ray Train checkpoint bucket")
    ap.add_argument("--noncurrent-days", type=int, default=7)
    ap.add_argument("--checkpoint-days", type=int, default=30)
    args = ap.parse_args(argv)
    for name in ("noncurrent_days", "checkpoint_days"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} = {getattr(args, name)}: expected >= 1 day",
                  file=sys.stderr)
            return 2
    client = boto3.client("s3")
    try:
        reports = [ensure_bucket(client, args.dvc, noncurrent_days=args.noncurrent_days, checkpoint_days=None),
                   ensure_bucket(client, args.mlflow, noncurrent_days=args.noncurrent_days, checkpoint_days=None),
                   ensure_bucket(client, args.ray, noncurrent_days=args.noncurrent_days,
                                 checkpoint_days=args.checkpoint_days)]
    except (ClientError, BotoCoreError) as exc:
        print(f"error: S3 at {client.meta.endpoint_url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reports, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
