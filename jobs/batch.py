"""Many edits from one jobs file, on one machine (a worker per GPU) or on a Ray cluster.

A job runs as its own process, `python train_image.py ...` or `python train_video.py ...`
exactly as a user would type it, in its own folder <out>/runs/<job>/; its output goes to
<out>/runs/<job>/log.txt. A job folder holding a finished run is skipped, one holding an
interrupted run (a checkpoint, no final/) is resumed with resume=<run folder>. Every finished
run has metrics.json (config write_metrics), which the summary repeats.
"""

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from tqdm import tqdm

from evaluation.runs import VIDEO_METRICS, is_finished
from util.config import CHECKS, CONFIG_DIR, REPO_ROOT, example_path, load_config, merge, read_yaml
from util.errors import ConfigError, InputError
from util.files import save_failed, write_text_atomic
from util.processes import PARENT_ENV

JOB_KEYS = ("example_config", "config", "kind", "name", "overrides")
SUMMARY_COLUMNS = ["job", "kind", "status", "run_dir", "seconds", "error"] + VIDEO_METRICS
INTERRUPTED_CODES = (130, -signal.SIGINT)  # a run stopped by Ctrl-C exits 130 (util.cli) or dies of SIGINT
RAY_INSTALL = 'pip install -r requirements-ray.txt'


@dataclass
class Job:
    name: str                  # the job's folder name under <out>/runs/
    kind: str                  # "image" or "video"
    example_config: str | None
    config: str | None
    overrides: dict


# ---- the jobs file -------------------------------------------------------------------------

def _example_kind(name: str) -> str | None:
    """The kind whose example folder holds `name` (None when neither does)."""
    found = [kind for kind in ("image", "video") if example_path(name, kind).is_file()]
    return found[0] if len(found) == 1 else None


def _config_kind(path: str) -> str:
    """A config file's kind: video when it sets a key only video editing has, image otherwise."""
    video_only = set(read_yaml(CONFIG_DIR / "video_config.yaml")) - set(read_yaml(CONFIG_DIR / "image_config.yaml"))
    try:
        keys = set(yaml.safe_load(Path(path).read_text()) or {})
    except (OSError, yaml.YAMLError, TypeError):
        return "image"  # the job reports the unreadable file when it runs
    return "video" if keys & video_only else "image"


def read_jobs(path, common: dict | None = None) -> list:
    """The jobs of a jobs file, checked for shape; a one-line ConfigError names the problem and fix.
    (A job's config keys are checked when it runs: a bad key fails that job only.) `common`:
    config changes for every job, on top of each job's overrides."""
    path = Path(path)
    where = f"jobs file {path}"
    data = read_yaml(path, "jobs file", fix="; give a YAML file with a top-level 'jobs:' list")
    if not isinstance(data.get("jobs"), list) or not data["jobs"]:
        raise ConfigError(f"{where} needs a top-level 'jobs:' list with at least one job "
                          "(each with example_config or config)")
    jobs, names = [], set()
    for i, entry in enumerate(data["jobs"], start=1):
        at = f"{where}, job {i}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at} is a {type(entry).__name__}; write each job as a mapping, e.g. "
                              "'- example_config: golden_horse'")
        unknown = [k for k in entry if k not in JOB_KEYS]
        if unknown:
            raise ConfigError(f"{at} has an unknown field '{unknown[0]}'; a job takes {', '.join(JOB_KEYS)} "
                              "(config keys go under overrides:)")
        example, config = entry.get("example_config"), entry.get("config")
        if (example is None) == (config is None):
            raise ConfigError(f"{at} needs exactly one of example_config (an example's name) or config (a path)")
        kind = entry.get("kind")
        if kind is not None and kind not in ("image", "video"):
            raise ConfigError(f"{at} has kind {kind!r}; use image or video")
        if kind is None:
            kind = _example_kind(str(example)) if example is not None else _config_kind(str(config))
            if kind is None:
                raise ConfigError(f"{at}: no image or video example is named '{example}'; fix the name "
                                  "(see configs/*_example_configs) or set kind:")
        overrides = entry.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"{at}: overrides must be a mapping of config keys (key: value), "
                              f"not a {type(overrides).__name__}")
        name = entry.get("name")
        stem = Path(str(example if example is not None else config)).stem
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name if name is not None else stem))
        if name is not None and base in names:
            raise ConfigError(f"{at}: two jobs are named '{base}'; give each job its own name")
        unique, n = base, 1
        while unique in names:
            n += 1
            unique = f"{base}-{n}"
        names.add(unique)
        jobs.append(Job(unique, kind, None if example is None else str(example),
                        None if config is None else str(config), {**overrides, **(common or {})}))
    for kind in sorted({job.kind for job in jobs}) if common else ():  # a typo there is one error, not one per job
        load_config(kind, overrides=dict(common))
    return jobs


def check_job(job: Job) -> None:
    """The job's config as the command line would build it, checked (ConfigError when wrong)."""
    merge(read_yaml(CONFIG_DIR / f"{job.kind}_config.yaml"), job.overrides, f"the overrides of job '{job.name}'")
    cfg = load_config(job.kind, config=job.config, example=job.example_config, overrides=dict(job.overrides))
    CHECKS[job.kind](cfg)


# ---- one job -------------------------------------------------------------------------------

def find_run(job_folder: Path):
    """("finished" | "interrupted" | "new", run folder or None) for a job's folder: the newest
    finished run, else the newest run with a checkpoint to resume."""
    runs = sorted(d for d in job_folder.glob("*") if d.is_dir() and (d / "config.yaml").is_file()) \
        if job_folder.is_dir() else []
    finished = [d for d in runs if is_finished(d)]
    if finished:
        return "finished", finished[-1]
    resumable = [d for d in runs if (d / "checkpoints" / "last.pt").is_file()]
    if resumable:
        return "interrupted", resumable[-1]
    return "new", None


def job_command(job: Job, job_folder: Path, device: str) -> list:
    """The command line that runs (or resumes) the job, as a user would type it."""
    script = str(REPO_ROOT / f"train_{job.kind}.py")
    state, run_dir = find_run(job_folder)
    if state == "interrupted":
        return [sys.executable, script, f"resume={run_dir}", f"device={device}"]
    command = [sys.executable, script]
    if job.config is not None:
        command += ["--config", job.config]
    if job.example_config is not None:
        command += ["--example_config", job.example_config]
    command += [f"{key}={json.dumps(value)}" for key, value in job.overrides.items()]  # JSON is YAML
    return command + [f"results_folder={job_folder}", f"device={device}"]


@dataclass
class Attempt:
    job: Job
    folder: Path
    process: subprocess.Popen
    log_offset: int   # where this attempt's output starts in log.txt
    started: float


def start_job(job: Job, out_dir: Path, device: str, env: dict | None = None, cwd=None) -> Attempt:
    """Launch the job's process; its output is appended to <out>/runs/<job>/log.txt."""
    folder = out_dir / "runs" / job.name
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "log.txt"
    offset = log_path.stat().st_size if log_path.exists() else 0
    command = job_command(job, folder, device)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        # its own session: a Ctrl-C in the terminal reaches the batch only, which passes exactly one
        # SIGINT on (a second one could cut the job's checkpoint short)
        # PARENT_ENV: the job ends when this process does, even when it is killed (kill -9)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True,
                                   env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1",
                                        PARENT_ENV: str(os.getpid())})
    return Attempt(job, folder, process, offset, time.time())


def _last_error(log_path: Path, offset: int) -> str:
    """The one-line error of an attempt: its last 'error: ...' line, else its last line."""
    with open(log_path, errors="replace") as f:
        f.seek(offset)
        lines = [line.strip() for line in re.split(r"[\r\n]", f.read()) if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    line = errors[-1][len("error: "):] if errors else (lines[-1] if lines else "no output")
    return line[:300]


def _seconds(folder: Path) -> float:
    path = folder / "job.json"
    try:
        return float(json.loads(path.read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def result_row(job: Job, status: str, run_dir=None, seconds=None, error="") -> dict:
    """A summary row; a finished run's metrics.json fills the metric columns."""
    row = {"job": job.name, "kind": job.kind, "status": status, "run_dir": str(run_dir or ""),
           "seconds": "" if seconds is None else round(seconds, 1), "error": error}
    metrics = Path(run_dir) / "metrics.json" if run_dir is not None else None
    if metrics is not None and metrics.is_file():
        try:
            values = json.loads(metrics.read_text())
            if not isinstance(values, dict):
                raise ValueError(f"it holds a {type(values).__name__}")
            row.update({k: values.get(k) for k in VIDEO_METRICS if k in values})
        except (OSError, ValueError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:80]
            note = f"metrics unreadable: {metrics} ({why}); measure again with: python evaluate.py {run_dir}"
            row["error"] = f"{error}; {note}" if error else note
    return row


def finish_job(attempt: Attempt, returncode: int) -> dict:
    """The summary row of an attempt that ended with `returncode`; the job's total time is kept
    in <out>/runs/<job>/job.json across attempts."""
    folder = attempt.folder
    total = _seconds(folder) + time.time() - attempt.started
    write_text_atomic(folder / "job.json", json.dumps({"seconds": total}) + "\n")
    state, run_dir = find_run(folder)
    if returncode == 0 and state == "finished":
        return result_row(attempt.job, "done", run_dir, total)
    if returncode in INTERRUPTED_CODES:
        return result_row(attempt.job, "interrupted", run_dir, total, "stopped by Ctrl-C; rerun to continue")
    if returncode < 0:  # killed: no message of its own (the out-of-memory killer sends SIGKILL)
        error = f"killed by {signal.Signals(-returncode).name} (out of memory?); see {folder / 'log.txt'}"
    else:
        error = _last_error(folder / "log.txt", attempt.log_offset)
    return result_row(attempt.job, "failed", run_dir, total, error)


def stop(attempt: Attempt, grace: float = 300.0) -> int:
    """Ctrl-C for a running job: SIGINT (it writes its checkpoint), then wait; kill after `grace` s."""
    if attempt.process.poll() is None:
        attempt.process.send_signal(signal.SIGINT)
    try:
        return attempt.process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        attempt.process.kill()
        return attempt.process.wait()


def run_job(job: Job, out_dir: Path, device: str, env: dict | None = None, cwd=None) -> dict:
    """Run one job to its end (the unit a Ray task runs); Ctrl-C stops it cleanly."""
    attempt = start_job(job, out_dir, device, env, cwd)
    try:
        code = attempt.process.wait()
    except KeyboardInterrupt:
        code = stop(attempt)
    return finish_job(attempt, code)


# ---- many jobs -----------------------------------------------------------------------------

def triage(jobs: list, out_dir: Path):
    """(rows of jobs settled before running: finished earlier or a bad config, jobs to run)."""
    rows, todo = {}, []
    for job in jobs:
        folder = out_dir / "runs" / job.name
        state, run_dir = find_run(folder)
        if state == "finished":
            rows[job.name] = result_row(job, "skipped", run_dir, _seconds(folder))
            continue
        if state == "new":
            try:
                check_job(job)
            except (ConfigError, InputError, FileNotFoundError) as e:
                rows[job.name] = result_row(job, "failed", error=str(e).splitlines()[0])
                continue
        todo.append(job)
    return rows, todo


def local_devices() -> list:
    """One (device, environment) per visible GPU, or one CPU worker."""
    import torch
    if not torch.cuda.is_available():
        return [("cpu", {})]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else \
        [str(i) for i in range(torch.cuda.device_count())]
    return [("cuda", {"CUDA_VISIBLE_DEVICES": gpu}) for gpu in ids]


def pause(seconds: float) -> None:
    """The scheduler's wait between polls of the running jobs."""
    time.sleep(seconds)


def run_local(jobs: list, out_dir: Path, devices: list, rows: dict, poll: float = 0.2) -> bool:
    """Run jobs with one worker per device, each job on its own device; rows[job] gets each
    result. Returns False when Ctrl-C stopped the batch (running jobs checkpoint and stop)."""
    pending, running, free = list(jobs), [], list(devices)
    bar = tqdm(total=len(jobs), desc="jobs", unit="job", dynamic_ncols=True)
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        while pending or running:
            while pending and free:
                device, env = free.pop(0)
                running.append((start_job(pending.pop(0), out_dir, device, env), (device, env)))
            for item in list(running):
                attempt, slot = item
                code = attempt.process.poll()
                if code is not None:
                    running.remove(item)
                    free.append(slot)
                    rows[attempt.job.name] = finish_job(attempt, code)
                    bar.update(1)
                    bar.set_postfix_str(f"{attempt.job.name}: {rows[attempt.job.name]['status']}")
            pause(poll)
    except KeyboardInterrupt:
        bar.close()
        print("\nstopping: the running jobs save a checkpoint ...", file=sys.stderr)
        for attempt, _ in running:
            rows[attempt.job.name] = finish_job(attempt, stop(attempt))
        for job in pending:
            rows[job.name] = result_row(job, "not run", error="the batch was stopped first")
        return False
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    bar.close()
    return True


def _terminate(signum, frame):
    """SIGTERM (a scheduler stopping the batch) stops it as Ctrl-C does: checkpoints first."""
    raise KeyboardInterrupt


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _ray_task(job: dict, out_dir: str, cwd: str) -> dict:
    """A job as a Ray task: on the GPU Ray gave it (CUDA_VISIBLE_DEVICES is set), else the CPU."""
    import ray
    device = "cuda" if ray.get_gpu_ids() else "cpu"
    return run_job(Job(**job), Path(out_dir), device, cwd=cwd)


def run_ray(jobs: list, out_dir: Path, address: str, rows: dict, num_cpus: int | None = None) -> bool:
    """Run every job as a Ray task with one GPU (one CPU on a cluster without GPUs). address:
    'auto' (the running cluster), 'local' (start a one-machine Ray here) or host:port. Run
    folders go under out_dir, which must be a folder every node sees (a shared file system),
    as must this repository (at the same path). Returns False when Ctrl-C stopped the batch."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs the optional Ray package: {RAY_INSTALL}") from None
    python_path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    runtime_env = {"env_vars": {"PYTHONPATH": python_path}}  # the tasks import this package
    if address == "local":
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=False)
    else:
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        except ConnectionError as e:
            raise ConfigError(f"--ray {address}: no Ray cluster there ({str(e).splitlines()[0][:100]}); start one "
                              "with 'ray start --head', or use --ray local") from None
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        task = ray.remote(num_gpus=1)(_ray_task) if gpus else ray.remote(num_cpus=1)(_ray_task)
        refs = {task.remote(asdict(job), str(out_dir), os.getcwd()): job for job in jobs}
        bar = tqdm(total=len(refs), desc=f"jobs on Ray ({int(gpus)} GPUs)", unit="job", dynamic_ncols=True)
        waiting = list(refs)
        try:
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                job = refs[done[0]]
                try:
                    rows[job.name] = ray.get(done[0])
                except ray.exceptions.RayError as e:
                    rows[job.name] = result_row(job, "failed", error=str(e).strip().splitlines()[-1][:300])
                bar.update(1)
                bar.set_postfix_str(f"{job.name}: {rows[job.name]['status']}")
        except KeyboardInterrupt:
            print("\nstopping: cancelling the Ray tasks (running jobs save a checkpoint) ...", file=sys.stderr)
            for ref in waiting:
                ray.cancel(ref)
            for ref in waiting:
                job = refs[ref]
                try:
                    rows[job.name] = ray.get(ref)
                except (ray.exceptions.RayError, KeyboardInterrupt):
                    rows[job.name] = result_row(job, "interrupted", error="stopped by Ctrl-C; rerun to continue")
            return False
        finally:
            bar.close()
        return True
    finally:
        ray.shutdown()


# ---- outputs -------------------------------------------------------------------------------

def write_summary(rows: list, path: Path) -> None:
    """summary.csv: job, kind, status, run folder, seconds, error, then every metric."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in SUMMARY_COLUMNS})
    write_text_atomic(path, buffer.getvalue())


def check_out_dir(out_dir: Path) -> None:
    """The output folder is made now and must take files: a file in its place or a read-only
    place is a one-line SaveError before any job starts."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise save_failed(out_dir, e) from None


def run_batch(jobs_file, out_dir=None, ray_address: str | None = None, devices: list | None = None,
              ray_cpus: int | None = None, common: dict | None = None):
    """Run a jobs file; write summary.csv and gallery.html in out_dir (default: beside the jobs
    file). common: config changes for every job. Returns (rows in the jobs file's order, completed: False when Ctrl-C stopped it,
    the output folder)."""
    from evaluation.gallery import write_gallery
    jobs = read_jobs(jobs_file, common)
    out_dir = Path(out_dir if out_dir is not None else Path(jobs_file).parent).resolve()
    check_out_dir(out_dir)
    rows, todo = triage(jobs, out_dir)
    skipped = sum(r["status"] == "skipped" for r in rows.values())
    if skipped:
        print(f"{skipped} of {len(jobs)} jobs finished earlier: skipped")
    completed = True
    if todo:
        if ray_address:
            completed = run_ray(todo, out_dir, ray_address, rows, ray_cpus)
        else:
            completed = run_local(todo, out_dir, devices or local_devices(), rows)
    ordered = [rows[job.name] for job in jobs]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_summary(ordered, out_dir / "summary.csv")
    write_gallery(ordered, out_dir)
    return ordered, completed, out_dir
