"""ddpm-sweep with real components: a local Ray cluster, Ray Tune with ASHA, MLflow on SQLite,
the pipeline's evaluate and register stages. One sweep of 4 tiny trials on the 8x8 digits serves
the ASHA, MLflow, resume and gate checks (the suite's time budget); a bad space is refused at
load by the command, before Ray starts."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from diffusion.config import load_config
from diffusion.search import draw_points
from tests.helpers import digits_dir

ray = pytest.importorskip("ray")
from flows import interrupts  # noqa: E402
from flows.interrupts import Interrupted  # noqa: E402
from flows.sweep import STOP_REASONS, prepare_best, register_best, run_search  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BAD_LR = 1e-7           # learns nothing in 60 steps: its quick FID stays at the untrained model's
SPACE = f"{{train.lr: [3.0e-3, 5.0e-3, 4.0e-3, {BAD_LR}]}}"
STEPS, EVERY = 60, 20


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
    """A domain extractor for the digits and a local Ray cluster, for this module."""
    from diffusion.data import load_prepared
    from diffusion.features import save_classifier, train_classifier
    root = tmp_path_factory.mktemp("sweep")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.pop("RAY_ADDRESS", None)
    model, acc = train_classifier(load_prepared(digits_dir(), "train"), load_prepared(digits_dir(), "heldout"),
                                  epochs=1, progress=False)
    save_classifier(model, root / "extractor.pt", {"heldout_accuracy": acc})
    yield root
    ray.shutdown()


@pytest.fixture(autouse=True)
def fresh_interrupt_state():
    """These tests send the job's signals: later tests in this process start with none recorded."""
    yield
    interrupts._requested.clear()
    interrupts._signum = None


def overrides(root: Path, seed: int) -> list[str]:
    return ["data.source=digits", "data.resolution=8", f"data.prepared_dir={digits_dir()}",
            "model.preset=tiny", "model.num_classes=0", f"train.steps={STEPS}", "train.batch_size=16",
            f"sweep.checkpoint_every={EVERY}", "train.log_every=10", "train.warmup_steps=2",
            "train.budget_minutes=1", "train.precision=fp32", f"extractor.path={root / 'extractor.pt'}",
            "evaluate.sampler=ddim", "evaluate.steps=4", "evaluate.fid_samples=64", "evaluate.fid_seeds=1",
            "evaluate.kid_subset_size=32", "evaluate.guidance_scale=1.0", "evaluate.precision=fp32",
            "evaluate.memory_format=contiguous", f"evaluate.reference_cache={root / 'ref'}",
            f"tracking.local_dir={root / 'mlflow'}", "tracking.experiment=sweep", "tracking.model_name=sweep",
            f"sweep.space={SPACE}", "sweep.trials=4", "sweep.budget_minutes=10", "sweep.scheduler=asha",
            "sweep.grace_minutes=0.001", "sweep.reduction_factor=2", "sweep.quick_fid_samples=64",
            "sweep.max_concurrent=1", f"sweep.seed={seed}", f"sweep.storage_path={root / 'tune'}"]


@pytest.mark.slow(minutes=3)
def test_tiny_sweep_asha_stops_the_bad_trial_resumes_and_registers_the_best(sweep_root):
    # the bad learning rate must not be the first trial: ASHA compares with trials recorded before
    seed = next(s for s in range(20) if draw_points({"train.lr": [3e-3, 5e-3, 4e-3, BAD_LR]}, 4, s)[0]
                ["train.lr"] != BAD_LR)
    cfg = load_config(None, overrides(sweep_root, seed))
    events = []
    started_wall = time.time()

    def interrupt_after_two(event):          # `kill`: stopped in Ctrl-C's order (Tune's handler)
        events.append(event)
        if event["kind"] == "end" and sum(e["kind"] == "end" for e in events) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with interrupts.handled():
        with pytest.raises(Interrupted) as stopped:
            run_search(cfg, interrupt_after_two)
        assert signal.getsignal(signal.SIGTERM) is interrupts._on_signal   # the job's own, put back
    assert stopped.value.signum == signal.SIGTERM and stopped.value.exit_code == 143
    ended_first = {e["trial_id"]: e for e in events if e["kind"] == "end"}
    assert len(ended_first) == 2
    asha_file = next((sweep_root / "tune").glob("default-*.asha.json"))
    asha = json.loads(asha_file.read_text())["recorded"]
    assert {trial_id for trial_id, _, _ in asha} >= set(ended_first)     # ASHA's rungs, for the restore
    from flows.tracking import client_for, tracking_uri
    parent_id = json.loads(next((sweep_root / "tune").glob("default-*.sweep.json")).read_text())["parent_run_id"]
    assert client_for(tracking_uri(cfg)).get_run(parent_id).info.status == "KILLED"
    exp = next(p for p in (sweep_root / "tune").iterdir() if p.is_dir() and not p.name.endswith("-best"))
    checkpoints = {p: p.stat().st_mtime_ns for p in exp.rglob("checkpoint.pt")}

    again = []
    with interrupts.handled():
        search = run_search(cfg, again.append)
    assert search.restored
    # the restored scheduler rewrote its record starting from what it replayed: the first run's
    # results come first, as recorded (a scheduler restored without them would have dropped them)
    assert json.loads(asha_file.read_text())["recorded"][:len(asha)] == asha
    started_again = {e["trial_id"] for e in again if e["kind"] == "start"}
    assert started_again and not started_again & set(ended_first)          # finished trials kept
    for trial_id in ended_first:                                           # and never rewritten
        kept = [path for path in checkpoints if trial_id in str(path)]
        assert kept, (trial_id, sorted(map(str, checkpoints)))
        assert all(path.stat().st_mtime_ns == checkpoints[path] for path in kept)

    import tempfile                              # the trials' work directories are gone

    from flows.sweep_trials import _alive
    left = []
    for d in Path(tempfile.gettempdir()).glob("ddpm-trial-*-*"):
        try:
            if d.lstat().st_ctime >= started_wall and not _alive(int(d.name.split("-")[2])):
                left.append(d)
        except (OSError, ValueError):
            pass
    assert not left
    rows = search.trials
    assert len(rows) == 4 and all(r["stop_reason"] in STOP_REASONS for r in rows)
    bad = next(r for r in rows if r["point"]["train.lr"] == BAD_LR)
    assert bad["stop_reason"] == "asha" and bad["steps"] < STEPS, rows
    completed = [r for r in rows if r["stop_reason"] == "completed"]
    assert completed and all(r["steps"] == STEPS for r in completed)
    assert search.best["point"]["train.lr"] != BAD_LR

    from flows.tracking import client_for
    client = client_for(search.tracking_uri)
    parent = client.get_run(search.parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{search.parent_run_id}'")
    assert len(children) == 4
    for child in children:
        row = next(r for r in rows if r["mlflow_run_id"] == child.info.run_id)
        assert float(child.data.params["train.lr"]) == row["point"]["train.lr"]
        assert child.data.tags["stop_reason"] == row["stop_reason"]
        assert child.info.status == "FINISHED"
        history = client.get_metric_history(child.info.run_id, "quick_fid")
        steps = [m.step for m in history]
        assert steps == sorted(set(steps)) and steps[-1] == row["steps"]   # each checkpoint once
    assert parent.data.params["best.train.lr"] == str(search.best["point"]["train.lr"])
    assert {a.path for a in client.list_artifacts(search.parent_run_id, "sweep")} == {
        "sweep/points.json", "sweep/trials.csv", "sweep/trials.json"}

    from flows.stages import evaluate_stage
    best = prepare_best(cfg, search)
    metrics = evaluate_stage(best, progress=False)
    reg = register_best(best, search)
    assert reg["alias"] == "champion" and metrics["fid"] > 0
    version = client.get_model_version(reg["name"], reg["version"])
    assert version.tags["sweep_parent_run_id"] == search.parent_run_id
    assert version.run_id == search.best["mlflow_run_id"]
    assert client.get_run(search.parent_run_id).info.status == "FINISHED"


@pytest.mark.slow(minutes=2.5)
def test_trials_of_two_ray_train_workers_report_score_and_resume_from_tunes_checkpoint(sweep_root):
    # sweep.workers_per_trial=2: each trial is a Ray Train run of 2 DDP workers on the trial's 2
    # CPUs; rank 0 scores, Tune keeps the checkpoints. Interrupted as trial 0 reports its second
    # checkpoint (Tune registers a checkpoint after its result's callbacks, so the first is the last
    # it holds), the sweep resumes that trial from it: its workers start at that step
    cfg = load_config(None, overrides(sweep_root, 0) + [
        "sweep.name=ddp", "sweep.space={train.lr: [3.0e-3, 4.0e-3]}", "sweep.trials=2", "sweep.scheduler=none",
        "sweep.workers_per_trial=2", "sweep.cpus_per_trial=2", f"ray.storage_path={sweep_root / 'ray'}"])
    first = []

    def interrupt_at_second_report(event):
        first.append(event)
        if event["kind"] == "result" and event["step"] == 2 * EVERY:
            os.kill(os.getpid(), signal.SIGTERM)

    with interrupts.handled():
        with pytest.raises(Interrupted):
            run_search(cfg, interrupt_at_second_report)
    stopped = next(e["trial_id"] for e in first if e["kind"] == "result")
    with interrupts.handled():
        search = run_search(cfg)
    assert search.restored and len(search.trials) == 2
    assert all(r["stop_reason"] == "completed" and r["steps"] == STEPS and r["checkpoint"] for r in search.trials)
    results = {}
    for line_file in search.path.glob("*/result.json"):
        rows = [json.loads(x) for x in line_file.read_text().splitlines()]
        results[rows[0]["trial_id"]] = rows
    assert set(results) == {r["trial_id"] for r in search.trials}
    for trial_id, rows in results.items():
        assert {r["world_size"] for r in rows} == {2}                          # DDP in each trial
        assert all(r["yardstick"] == rows[0]["yardstick"] and 0 < r["quick_fid"] for r in rows)
    resumed = [r for r in results[stopped] if r["step"] > 2 * EVERY]
    assert resumed and {r["resumed_from"] for r in resumed} == {EVERY}   # Tune's checkpoint, not step 0
    from flows.tracking import client_for
    client = client_for(search.tracking_uri)
    for row in search.trials:
        steps = [m.step for m in client.get_metric_history(row["mlflow_run_id"], "quick_fid")]
        assert sorted(set(steps)) == list(range(EVERY, STEPS + 1, EVERY))
        if row["trial_id"] != stopped:
            assert sorted(steps) == list(range(EVERY, STEPS + 1, EVERY))       # each report once
    assert not list((sweep_root / "ray" / "sweeps").glob("ddp-*"))      # Ray Train's copies removed
    best = prepare_best(cfg, search)
    assert (Path(best.train.out_dir) / "checkpoint.pt").is_file()


@pytest.mark.slow(minutes=1.5)
def test_a_sweep_the_budget_ended_stays_ended_when_run_again(sweep_root):
    # Tune saves its searcher finished at the time budget: a re-run's fit() returns at once with
    # fewer trials than points, which is the end of the search, not an interrupt
    cfg = load_config(None, overrides(sweep_root, 0) + ["sweep.budget_minutes=0.25", "sweep.name=budget",
                                                       "train.steps=100000"])   # never done in 15 s
    first = run_search(cfg)
    assert first.ended_by == "budget" and not first.restored
    again = run_search(cfg)
    assert again.restored and again.ended_by == "budget"
    assert [r["trial_id"] for r in again.trials] == [r["trial_id"] for r in first.trials]
    from flows.tracking import client_for
    parent = client_for(again.tracking_uri).get_run(again.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["ended_by"] == "budget"


@pytest.mark.slow(minutes=2.5)
@pytest.mark.timeout(900)
def test_the_sweep_command_stopped_by_sigterm_exits_143_and_its_rerun_resumes_and_registers(sweep_root, tmp_path):
    # `python -m flows.sweep` itself (the supervisor, the flow, Tune): SIGTERM (`kill`) to the
    # command once a trial ended -> Tune's ordered stop, exit 128 + 15, the sweep's state kept and
    # every process it started gone; the same command again resumes and registers the best
    from tests.test_interrupts import _finish, _processes_with, _read_until
    marker = ("DDPM_TEST_JOB", uuid.uuid4().hex)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect"), marker[0]: marker[1]}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "flows.sweep", "--params", str(REPO / "params.yaml"),
           *overrides(sweep_root, 0), "sweep.name=command", "sweep.space={train.lr: [3.0e-3, 4.0e-3]}",
           "sweep.trials=2", "sweep.scheduler=none", f"tracking.local_dir={tmp_path / 'mlflow'}"]
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _read_until(proc, lines, r"^  sweep: trial \d ended \(completed\)", timeout=600)
        os.kill(proc.pid, signal.SIGTERM)
        code, _ = _finish(proc, lines)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    shown = "".join(lines)
    assert code == 143, shown
    assert "interrupted (" in shown and "run the same command again to resume the sweep" in shown, shown
    assert "Traceback" not in shown and "error:" not in shown.lower(), shown
    assert _processes_with(f"{marker[0]}={marker[1]}") == []      # Ray, Prefect's server: all gone
    state = json.loads(next((sweep_root / "tune").glob("command-*.sweep.json")).read_text())
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    assert client.get_run(state["parent_run_id"]).info.status == "KILLED"

    again = subprocess.run(cmd, cwd=tmp_path, env=env, text=True, capture_output=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 trials (resumed)" in again.stdout and "-> alias 'champion'" in again.stdout, again.stdout
    assert again.stdout.count("ended (completed)") == 1, again.stdout        # the finished trial kept
    assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"


def test_a_bad_space_is_refused_at_load_with_its_key_paths(tmp_path):
    # one bad key and one bad value: both named in one message (the library's checks of every
    # kind of bad space are in tests/library/test_search.py); nothing starts
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "flows.sweep", "--params", str(REPO / "params.yaml"),
                          "sweep.space={train.lrr: [1.0e-3], model.preset: [tiny, huge]}"],
                         capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "sweep.space.train.lrr: unknown config key" in out.stderr
    assert "sweep.space.model.preset[1] = 'huge': expected one of" in out.stderr
    assert out.stdout == "" and not any(tmp_path.iterdir())     # no log, no Ray session, no store
    assert time.perf_counter() - started < 60


def test_a_trial_config_error_and_no_per_trial_budget_are_refused_before_anything_starts(tmp_path):
    # model.num_heads = 7 divides none of mnist_fast's channels: a cross-field error of one trial
    out = subprocess.run([sys.executable, "-m", "flows.sweep", "--params", str(REPO / "params.yaml"),
                          "sweep.space={model.num_heads: [1, 7]}", "sweep.trials=2", "train.budget_minutes=0",
                          # trials of 3 workers: one GPU cannot be split, batch 32 not over 3 workers
                          "sweep.workers_per_trial=3", "sweep.gpus_per_trial=1", "sweep.cpus_per_trial=4096"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,   # the local cluster
                         env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2, out.stderr
    assert "train.budget_minutes = 0: a sweep needs a per-trial budget" in out.stderr
    trial = next(line for line in out.stderr.splitlines() if "model.num_heads=7" in line)
    assert trial.startswith(("error: trial ", "trial ")) and "from sweep.space.model.num_heads" in trial
    assert "model.num_heads = 7: must divide" in out.stderr
    assert "sweep.gpus_per_trial = 1 over sweep.workers_per_trial = 3: each worker needs a whole GPU" in out.stderr
    assert "train.batch_size = 32 does not split over sweep.workers_per_trial = 3 workers" in out.stderr
    assert f"sweep.cpus_per_trial = 4096: this machine's local Ray cluster has {os.cpu_count()} CPUs" in out.stderr
    assert out.stdout == "" and not any(tmp_path.iterdir())


def test_tunes_signal_handler_is_read_as_an_interrupt_and_replaced_after_fit():
    # Ray Tune's own handlers (what tuner.fit() installs), no Ray started: a signal while they
    # are installed reads as an interrupt however many trials Tune had created
    from ray.tune.tune import _setup_signal_catching

    from flows.sweep import TUNE_SIGNALS, _tune_interrupted
    saved = {sig: signal.getsignal(sig) for sig in TUNE_SIGNALS}
    try:
        _setup_signal_catching()
        assert not _tune_interrupted(saved)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.1)
        assert _tune_interrupted(saved)
        _setup_signal_catching()
        os.kill(os.getpid(), signal.SIGINT)       # Tune's handler only sets its event
        time.sleep(0.1)
        assert _tune_interrupted(saved)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_sigterm_and_sighup_take_tunes_ordered_stop_and_a_second_signal_raises():
    import threading

    from flows.sweep import STOP_SIGNALS, _stop_tune_on
    for signum in STOP_SIGNALS:
        with interrupts.handled():
            ours = signal.getsignal(signal.SIGINT)
            stops, taken = {}, []
            _stop_tune_on(STOP_SIGNALS, ours, stops, taken)
            try:
                with pytest.raises(Interrupted) as early:      # Tune's handler not in place yet
                    os.kill(os.getpid(), signum)
                    time.sleep(1)
                assert early.value.signum == signum and not taken
            finally:
                for sig, handler in stops.items():
                    signal.signal(sig, handler)
        with interrupts.handled():
            ours = signal.getsignal(signal.SIGINT)
            stops, taken = {}, []
            _stop_tune_on(STOP_SIGNALS, ours, stops, taken)
            stopped = threading.Event()

            def tune_handler(sig, frame):                     # what Tune's _setup_signal_catching does
                stopped.set()
                signal.signal(signal.SIGINT, ours)
            try:
                signal.signal(signal.SIGINT, tune_handler)
                os.kill(os.getpid(), signum)
                time.sleep(0.2)
                assert stopped.is_set() and interrupts.received() == signum and taken == [signum]
                with pytest.raises(Interrupted) as second:     # a second signal: at once
                    os.kill(os.getpid(), signum)
                    time.sleep(1)
                assert second.value.signum == signum
            finally:
                signal.signal(signal.SIGINT, ours)
                for sig, handler in stops.items():
                    signal.signal(sig, handler)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)    # nohup: stays ignored
    try:
        stops = {}
        _stop_tune_on(STOP_SIGNALS, signal.getsignal(signal.SIGINT), stops, [])
        assert signal.SIGHUP not in stops and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        for sig, handler in stops.items():
            signal.signal(sig, handler)
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_work_dirs_of_ended_trial_processes_are_removed_and_live_ones_kept(tmp_path):
    # Tune may end a trial's actor between two reports (ASHA, the budget, Ctrl-C): its work dir
    # outlives it; the next trial on the node (and the driver after a search) removes it
    from flows.sweep_trials import WORK_PREFIX, remove_orphaned_work_dirs
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f"{WORK_PREFIX}{dead.pid}-abc"
    (orphan / "train").mkdir(parents=True)
    (orphan / "train" / "checkpoint.pt").write_bytes(b"x" * 1024)
    live = tmp_path / f"{WORK_PREFIX}{os.getppid()}-def"
    mine = tmp_path / f"{WORK_PREFIX}{os.getpid()}-ghi"
    other = tmp_path / "ddpm-trial-12ab-x"                       # not a pid
    for d in (live, mine, other):
        d.mkdir()
    assert remove_orphaned_work_dirs(tmp_path) == [orphan]
    assert not orphan.exists() and live.is_dir() and mine.is_dir() and other.is_dir()


def test_ashas_rungs_survive_a_restore_and_stop_what_the_uninterrupted_search_stops(tmp_path):
    # Tune restores the scheduler as pickled at creation (empty rungs): RestorableASHA replays
    # its recorded rungs, so a restored search stops the same trials as one never interrupted
    import pickle

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from flows.sweep_asha import RestorableASHA, _Seen, read_history

    def scheduler(cls, **extra):
        sched = cls(time_attr="train_minutes", max_t=4.0, grace_period=1.0, reduction_factor=2, **extra)
        sched.set_search_properties("quick_fid", "min")
        return sched

    history = tmp_path / "s.asha.json"
    live = scheduler(RestorableASHA, history_path=history)
    pickled_at_creation = pickle.dumps(live)                  # what tuner.pkl holds
    good, fair = _Seen("good"), _Seen("fair")
    for trial, fids in ((good, [100.0, 50.0, 20.0, 10.0]), (fair, [150.0, 80.0, 40.0])):
        live.on_trial_add(None, trial)
        for minute, fid in enumerate(fids, start=1):
            live.on_trial_result(None, trial, {"train_minutes": float(minute), "quick_fid": fid})
    live.on_trial_complete(None, good, {"train_minutes": 4.0, "quick_fid": 10.0})
    assert live.rungs()[-1][1] == {"good": -100.0, "fair": -150.0}        # the 1-minute rung

    restored = pickle.loads(pickled_at_creation)
    plain = scheduler(ASHAScheduler)                           # what Tune 2.60 alone gives back
    bad = _Seen("bad")
    decisions = []
    for sched in (restored, live, plain):                     # restored first: it reads the record
        sched.on_trial_add(None, fair)                         # the resumed trial
        sched.on_trial_add(None, bad)                          # a new one, worse than both
        decisions.append(sched.on_trial_result(None, bad, {"train_minutes": 1.0, "quick_fid": 400.0}))
    assert restored.rungs() == live.rungs()
    assert decisions == [TrialScheduler.STOP, TrialScheduler.STOP, TrialScheduler.CONTINUE]
    assert json.loads(history.read_text())["recorded"][-1] == ["bad", 1.0, -400.0]

    history.write_text("{not json")                # a damaged record: named (run_search refuses
    with pytest.raises(ValueError, match="s.asha.json: not a sweep's ASHA record"):   # to restore)
        read_history(history)
    late = pickle.loads(pickled_at_creation)       # and inside Tune, empty rungs rather than a crash
    late.on_trial_add(None, bad)
    assert all(not recorded for _, recorded in late.rungs())


def test_an_interrupted_sweep_flow_ends_cancelled_with_the_signal_recorded(monkeypatch):
    # Tune's own Ctrl-C stop records no signal; the flow does, so the command exits 130
    import flows.sweep as sweep

    def stopped_by_tune(params_file, overrides):
        raise Interrupted(signal.SIGINT)
    monkeypatch.setattr(sweep, "sweep_flow_body", stopped_by_tune)
    state = sweep.ddpm_sweep.fn("params.yaml", [])
    assert state.is_cancelled() and interrupts.received() == signal.SIGINT


def test_the_tune_callback_pickles_without_the_tracking_uri():
    # Tune writes its callbacks into tuner.pkl; a token in MLFLOW_TRACKING_URI must not land there
    import pickle

    from flows.sweep_trials import SweepTracker
    track = SweepTracker("https://user:s3cret-token@mlflow.example/", "parent", "0", 60.0, "asha")
    assert b"s3cret-token" not in pickle.dumps(track)
    assert pickle.loads(pickle.dumps(track)).uri is None
