"""Serve the ``ddpm-pipeline`` flow as a deployment (the long-running process that executes its
runs): ``python -m flows.serve [--name local] [--cron "0 3 * * *"]`` with ``PREFECT_API_URL``
pointing at a Prefect server. Then trigger runs from anywhere:

    prefect deployment run 'ddpm-pipeline/local' --param 'overrides=["train.steps=900"]' --watch

Run it from the project root: stages read ``params.yaml`` and write ``data/``, ``runs/``,
``metrics/`` and ``mlflow/`` relative to the working directory, as ``dvc repro`` does.
"""

from __future__ import annotations

import argparse

from flows.pipeline import ddpm_pipeline


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="local", help="deployment name (default: local)")
    parser.add_argument("--cron", default=None, help="optional schedule, e.g. '0 3 * * *'")
    parser.add_argument("--params", default="params.yaml", help="default params file of the runs")
    args = parser.parse_args(argv)
    ddpm_pipeline.serve(name=args.name, cron=args.cron, parameters={"params_file": args.params},
                        tags=["ddpm"], description="DVC data -> Ray training -> FID -> MLflow gate")


if __name__ == "__main__":
    main()
