"""Orchestration glue around the plain ``diffusion`` library: S3 access, DVC stages (and, as the
next issues land, Ray training, MLflow tracking and the Prefect flow)."""
