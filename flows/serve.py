"""Serve the ``ddpm-pipeline``, ``ddpm-rollback`` and ``ddpm-sweep`` flows as deployments (the long-running
process that executes their runs): ``python -m flows.serve [--name local] [--cron "0 3 * * *"]``
with ``PREFECT_API_URL`` pointing at a Prefect server. Then trigger runs from anywhere:

    prefect deployment run 'ddpm-pipeline/local' --param 'overrides=["train.steps=900"]' --watch
    prefect deployment run 'ddpm-rollback/local' --param to=3 --param reason="v4 blurs 7s" --watch

Run it from the project root: stages read ``params.yaml`` and write ``data/``, ``runs/``,
``metrics/`` and ``mlflow/`` relative to the working directory, as ``dvc repro`` does.
"""

from __future__ import annotations

import argparse

from prefect import serve

from flows.pipeline import ddpm_pipeline, ddpm_rollback
from flows.sweep import ddpm_sweep


STOP_RUNS_S = 90.0      # how long a SIGTERMed serve waits for its runs to stop in order


def _stop_runs_first() -> None:
    """Prefect 3.8.8's runner answers SIGTERM with ``sys.exit(0)``: its flow-run processes were
    left running and their runs RUNNING. Before that, send each run's process SIGTERM (it stops
    at a step, checkpoints, ends its MLflow run KILLED and its flow run Cancelled) and wait."""
    from prefect.runner.runner import Runner
    original = Runner.handle_sigterm
    if getattr(original, "stops_runs_first", False):
        return

    def handle_sigterm(self, *args, **kwargs):
        from flows.interrupts import stop_children
        stop_children(STOP_RUNS_S)
        original(self, *args, **kwargs)
    handle_sigterm.stops_runs_first = True
    Runner.handle_sigterm = handle_sigterm


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="local", help="deployment name (default: local)")
    parser.add_argument("--cron", default=None, help="optional schedule, e.g. '0 3 * * *'")
    parser.add_argument("--params", default="params.yaml", help="default params file of the runs")
    args = parser.parse_args(argv)
    _stop_runs_first()
    serve(ddpm_pipeline.to_deployment(name=args.name, cron=args.cron,
                                      parameters={"params_file": args.params}, tags=["ddpm"],
                                      description="DVC data -> Ray training -> FID -> MLflow gate"),
          ddpm_rollback.to_deployment(name=args.name, parameters={"params_file": args.params},
                                      tags=["ddpm"], description="move the champion alias back"),
          ddpm_sweep.to_deployment(name=args.name, parameters={"params_file": args.params},
                                   tags=["ddpm", "sweep"], description="Ray Tune search, best trial "
                                   "through the gate"))


if __name__ == "__main__":
    main()
