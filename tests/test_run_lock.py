"""One writer per run folder (util.processes.FolderLock) and jobs that end with their batch:
a second trainer on a folder a live process writes is refused with one line naming that
process and writes nothing; a lock whose process is gone is taken over; the lock is released
at the end, on an error and on Ctrl-C; kill -9 of batch.py ends its job."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from util.cli import run_cli
from util.errors import FolderInUseError
from util.processes import LOCK_NAME, FolderLock, pid_alive

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def other_process():
    """A live process that is not this one (it holds locks in these tests)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield process
    process.kill()
    process.wait()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def lock_held_by(folder: Path, pid: int, command="python train_image.py resume=x"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "command": command, "since": "2026-01-01 12:00:00"}))


def listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_folder_a_live_process_holds_is_refused_with_its_pid(tmp_path, other_process):
    lock_held_by(tmp_path / "run", other_process.pid)
    with pytest.raises(FolderInUseError) as e:
        with FolderLock(tmp_path / "run"):
            (tmp_path / "run" / "written").write_text("no")
    message = str(e.value)
    assert f"process {other_process.pid}" in message and "train_image.py resume=x" in message
    assert f"kill -INT {other_process.pid}" in message and "\n" not in message
    assert not (tmp_path / "run" / "written").exists()
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == other_process.pid  # still theirs


def test_a_stale_lock_is_taken_over_and_released_at_the_end(tmp_path):
    lock_held_by(tmp_path / "run", dead_pid())
    with FolderLock(tmp_path / "run"):
        assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_reused_pid_is_not_the_writer(tmp_path, other_process):
    """The pid of a dead writer given to a new process: the start time tells them apart."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": other_process.pid, "started": "1"}))
    assert pid_alive(other_process.pid) and not pid_alive(other_process.pid, "1")
    with FolderLock(folder):
        pass


@pytest.mark.parametrize("stop", [RuntimeError, KeyboardInterrupt])
def test_the_lock_is_released_on_an_error_and_on_ctrl_c(tmp_path, stop):
    with pytest.raises(stop):
        with FolderLock(tmp_path / "run"):
            (tmp_path / "run" / "losses.csv").write_text("step\n")
            raise stop()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    with FolderLock(tmp_path / "run"):  # free again
        pass


def test_a_folder_made_for_nothing_is_removed_again(tmp_path):
    with pytest.raises(ValueError):
        with FolderLock(tmp_path / "atlas"):
            raise ValueError("bad input")
    assert not (tmp_path / "atlas").exists()


def test_two_jobs_of_one_process_do_not_share_a_folder(tmp_path):
    """The web app runs jobs as threads of one process."""
    inside, leave, refused = threading.Event(), threading.Event(), []

    def first():
        with FolderLock(tmp_path / "run"):
            inside.set()
            leave.wait(10)
    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(10)
    try:
        with FolderLock(tmp_path / "run"):
            pass
    except FolderInUseError as e:
        refused.append(str(e))
    leave.set()
    thread.join()
    assert refused and "another job of this process" in refused[0]
    with FolderLock(tmp_path / "run"):  # re-entrant in one thread
        with FolderLock(tmp_path / "run"):
            pass
        assert (tmp_path / "run" / LOCK_NAME).exists()  # held until the outer block ends
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def run_script(capsys, script: str, *args):
    """A command line as typed (its main through util.cli.run_cli, in this process): (exit
    status, stderr's non-empty lines)."""
    import importlib
    main = importlib.import_module(script.removesuffix(".py")).main
    with pytest.raises(SystemExit) as e:
        run_cli(main, [str(a) for a in args])
    return e.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_train_image_refuses_to_resume_a_run_another_process_writes(tmp_path, tiny_overrides, other_process,
                                                                     capsys):
    import train_image
    run_dir = train_image.main([*tiny_overrides, "n_epochs=1", "log_images_freq=1", "write_metrics=false",
                                "resize_input=64", "bootstrap_epoch=0"])
    assert not (run_dir / LOCK_NAME).exists()  # released at the end
    lock_held_by(run_dir, other_process.pid)
    before = listing(run_dir)
    capsys.readouterr()
    code, errors = run_script(capsys, "train_image.py", f"resume={run_dir}", "n_epochs=4")
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith("error: run folder") and f"process {other_process.pid}" in errors[0]
    assert listing(run_dir) == before  # nothing written


def test_a_video_edit_in_a_folder_another_process_writes_is_refused(tmp_path, tiny_video_overrides, other_process):
    """The video trainer holds its run folder as the image trainer does (resume= of a video run)."""
    from training.loop import resume_config
    run_dir = tmp_path / "results" / "video-run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("n_epochs: 4\n")
    import torch
    torch.save({"step": 2, "lr": 1e-3, "config": {}, "generator": {}, "optimizer": {}, "python_rng": None,
                "torch_rng": None, "layer": "background"}, run_dir / "checkpoints" / "last.pt")
    lock_held_by(run_dir, other_process.pid)
    with pytest.raises(FolderInUseError, match=f"process {other_process.pid}"):
        resume_config("video", run_dir, [], "train_video.py")


def test_train_nla_refuses_an_atlas_folder_another_process_writes(tmp_path, tiny_video, other_process, capsys):
    out = tmp_path / "atlas"
    lock_held_by(out, other_process.pid, command="python train_nla.py --out atlas")
    before = listing(out)
    code, errors = run_script(capsys, "train_nla.py", "--video", tiny_video / "frames", "--out", out, "resx=48",
                              "resy=32", "iters_num=2", "device=cpu")
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: atlas folder {out} is being written by process {other_process.pid}")
    assert listing(out) == before  # no flow cache, no config.yaml


def test_sigterm_stops_a_training_as_ctrl_c_does(tmp_path, tiny_video):
    """`kill` (or `timeout`, a scheduler) of a plain train_nla.py: the checkpoint of the steps done
    is written, the folder's lock released, exit status 130; the same command then resumes."""
    out = tmp_path / "atlas"
    command = [sys.executable, "train_nla.py", "--video", str(tiny_video / "frames"), "--out", str(out), "resx=48",
               "resy=32", "iters_num=100000", "evaluate_every=5", "samples_batch=200", "device=cpu"]
    run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "checkpoint").is_file():  # training, past its first save
            time.sleep(0.2)
        assert (out / "checkpoint").is_file()
        run.send_signal(signal.SIGTERM)
        output, _ = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 130, output
    iteration = int(torch.load(out / "checkpoint", weights_only=False)["iteration"])
    assert iteration >= 5 and f"interrupted at iteration {iteration}; run the same command again to resume" in output
    assert not (out / LOCK_NAME).exists()


def test_run_cli_gives_the_caller_its_sigterm_handler_and_warnings_back():
    """In-process callers (a notebook, tests) keep their own SIGTERM handling after a command:
    the handler that turns SIGTERM into Ctrl-C, and the one-line warnings, last only for the call."""
    import warnings

    from util.errors import InputError
    own_handler, own_format = (lambda signum, frame: None), warnings.formatwarning
    before = signal.signal(signal.SIGTERM, own_handler)
    try:
        during = []
        run_cli(lambda argv: during.append((signal.getsignal(signal.SIGTERM), warnings.formatwarning)), [])
        assert during[0][0] is not own_handler and during[0][1] is not own_format  # in force while main runs
        assert signal.getsignal(signal.SIGTERM) is own_handler and warnings.formatwarning is own_format

        def bad_input(argv):
            raise InputError("no such clip")
        with pytest.raises(SystemExit) as exit_info:
            run_cli(bad_input, [])
        assert exit_info.value.code == 2
        assert signal.getsignal(signal.SIGTERM) is own_handler and warnings.formatwarning is own_format
    finally:
        signal.signal(signal.SIGTERM, before)


def test_kill_9_of_batch_ends_its_job(tmp_path, tiny_clip_file, cat_photo):
    """The job gets SIGINT when batch.py dies: it writes its checkpoint, releases its folder and ends."""
    job = {"image_path": str(cat_photo), "clip_model_name": str(tiny_clip_file), "resize_input": 64, "n_aug": 2,
           "num_scales": 3, "skip_n33d": 8, "skip_n33u": 8, "n_epochs": 100000, "log_images_freq": 100000,
           "seed": 0, "mixed_precision": "off", "device": "cpu"}
    jobs_file = tmp_path / "jobs.yaml"
    jobs_file.write_text(yaml.safe_dump({"jobs": [{"example_config": "golden_horse", "name": "long",
                                                   "overrides": job}]}))
    # as `python batch.py jobs.yaml &` in a shell script starts it: with SIGINT ignored, which its
    # jobs inherit (they must take SIGINT back to be stopped)
    batch = subprocess.Popen([sys.executable, "batch.py", str(jobs_file)], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline, lock = time.time() + 240, None
        while time.time() < deadline and lock is None:  # the job holds its run folder once it trains
            found = list((tmp_path / "runs" / "long").glob(f"*/{LOCK_NAME}"))
            lock = found[0] if found and (tmp_path / "runs" / "long" / found[0].parent.name / "losses.csv").exists() \
                else None
            time.sleep(0.5)
        assert lock is not None, (tmp_path / "runs" / "long" / "log.txt").read_text()
        job_pid = json.loads(lock.read_text())["pid"]
        assert pid_alive(job_pid) and job_pid != batch.pid
    finally:
        batch.send_signal(signal.SIGKILL)
        batch.wait()
    killed = time.time()
    while time.time() < killed + 30 and pid_alive(job_pid):
        time.sleep(0.2)
    alive = pid_alive(job_pid)
    print(f"the job ended {time.time() - killed:.1f} s after its batch")
    if alive:
        os.kill(job_pid, signal.SIGKILL)
    assert not alive, "the job outlived its batch"
    run_dir = lock.parent
    assert not lock.exists()  # released on its way out
    assert (run_dir / "checkpoints" / "last.pt").is_file()  # Ctrl-C's checkpoint: the rerun resumes
    assert "interrupted after step" in (tmp_path / "runs" / "long" / "log.txt").read_text()


def test_a_job_takes_one_ctrl_c_and_finishes_its_checkpoint_through_a_second():
    """A dying multi-threaded batch sends the parent-death signal once per thread: the second
    SIGINT must not cut the first one's checkpoint short."""
    code = ("import os, sys, time\n"
            "from util.processes import die_with_parent\n"
            "die_with_parent()\n"
            "try:\n"
            "    print('ready', flush=True)  # inside the try: the test's first SIGINT comes after it\n"
            "    time.sleep(60)\n"
            "except KeyboardInterrupt:\n"
            "    time.sleep(1.0)  # writing the checkpoint\n"
            "    print('checkpoint written', flush=True)\n")
    job = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "TEXT2LIVE_PARENT_PID": str(os.getpid())},
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # as from `... &`
    assert job.stdout.readline().strip() == "ready"
    job.send_signal(signal.SIGINT)
    time.sleep(0.3)
    job.send_signal(signal.SIGINT)
    out, _ = job.communicate(timeout=30)
    assert "checkpoint written" in out
