"""batch.py: a jobs file run on the CPU (one worker) and through Ray, with a failing job,
Ctrl-C, a rerun that skips finished jobs and resumes the interrupted one, and the gallery."""

import csv
import re
from pathlib import Path

import pytest
import yaml

from jobs import batch
from util.config import parse_overrides
from util.errors import ConfigError

CPU = [("cpu", {})]


@pytest.fixture
def tiny_job(tiny_clip_file, cat_photo):
    """Overrides for a fast image job on the CPU."""
    return {"image_path": str(cat_photo), "clip_model_name": str(tiny_clip_file), "resize_input": 64, "n_aug": 2,
            "num_scales": 3, "skip_n33d": 8, "skip_n33u": 8, "n_epochs": 2, "log_images_freq": 2, "seed": 0,
            "mixed_precision": "off"}


def write_jobs(path: Path, jobs: list) -> Path:
    path.write_text(yaml.safe_dump({"jobs": jobs}, sort_keys=False))
    return path


def read_summary(path: Path) -> dict:
    with open(path) as f:
        return {row["job"]: row for row in csv.DictReader(f)}


def gallery_links(out: Path) -> list:
    page = (out / "gallery.html").read_text()
    return re.findall(r'(?:src|href)="([^"]+)"', page)


@pytest.mark.parametrize("text, message", [
    ("- example_config: golden_horse\n", "top-level 'jobs:' list"),
    ("jobs: []\n", "at least one job"),
    ("jobs:\n  - golden_horse\n", "job 1 is a str; write each job as a mapping"),
    ("jobs:\n  - example_config: golden_horse\n    n_epochs: 3\n", "unknown field 'n_epochs'.*overrides"),
    ("jobs:\n  - name: x\n", "exactly one of example_config"),
    ("jobs:\n  - example_config: golden_horsee\n", "no image or video example is named 'golden_horsee'"),
    ("jobs:\n  - example_config: golden_horse\n    kind: audio\n", "kind 'audio'; use image or video"),
    ("jobs:\n  - example_config: golden_horse\n    overrides: [1]\n", "overrides must be a mapping"),
    ("jobs:\n  - {example_config: golden_horse, name: a}\n  - {example_config: ice_cake, name: a}\n",
     "two jobs are named 'a'"),
    ("jobs: [\n", "not valid YAML"),
])
def test_a_bad_jobs_file_is_one_line_naming_the_fix(tmp_path, text, message):
    path = tmp_path / "jobs.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        batch.read_jobs(path)
    assert "\n" not in str(e.value)


def test_jobs_get_their_kind_and_unique_names(tmp_path):
    jobs = batch.read_jobs(write_jobs(tmp_path / "jobs.yaml", [
        {"example_config": "golden_horse"}, {"example_config": "golden_horse.yaml"},
        {"example_config": "car-turn_winter", "overrides": {"n_epochs": 5}}, {"config": "my edit.yaml"}]))
    assert [(j.name, j.kind) for j in jobs] == [("golden_horse", "image"), ("golden_horse-2", "image"),
                                                ("car-turn_winter", "video"), ("my_edit", "image")]
    assert jobs[2].overrides == {"n_epochs": 5}
    # key=value on batch.py's command line: on top of every job's own overrides
    jobs = batch.read_jobs(tmp_path / "jobs.yaml", common={"n_epochs": 7})
    assert [j.overrides for j in jobs] == [{"n_epochs": 7}] * 4


def test_the_shipped_example_jobs_file_is_valid():
    jobs = batch.read_jobs(batch.CONFIG_DIR / "batch_example.yaml")
    assert [j.name for j in jobs] == ["chelsea_leopard", "coffee_golden_cup", "rocket_fire-600"]
    for job in jobs:
        batch.check_job(job)


def test_batch_on_one_machine_fails_one_job_survives_ctrl_c_and_resumes(tmp_path, tiny_job, monkeypatch, capsys):
    jobs_file = write_jobs(tmp_path / "jobs.yaml", [
        {"example_config": "golden_horse", "name": "first", "overrides": tiny_job},
        {"example_config": "golden_horse", "name": "second", "overrides": {**tiny_job, "n_epochs": 20}},
        {"example_config": "golden_horse", "name": "bad-key", "overrides": {**tiny_job, "n_epoch": 3}},
    ])
    second = tmp_path / "runs" / "second"

    # Ctrl-C as soon as the second job has written its first checkpoint (step 2 of 20)
    real_pause = batch.pause

    def pause_then_ctrl_c(seconds):
        if list(second.glob("*/checkpoints/last.pt")):
            raise KeyboardInterrupt
        real_pause(seconds)
    monkeypatch.setattr(batch, "pause", pause_then_ctrl_c)
    rows, completed, out = batch.run_batch(jobs_file, devices=CPU)
    assert not completed and out == tmp_path
    summary = read_summary(tmp_path / "summary.csv")
    assert list(summary) == ["first", "second", "bad-key"]  # the jobs file's order
    assert summary["first"]["status"] == "done" and float(summary["first"]["clip_i"]) > 0
    assert summary["second"]["status"] == "interrupted" and summary["second"]["run_dir"]
    assert summary["bad-key"]["status"] == "failed"
    assert summary["bad-key"]["error"] == ("unknown config key 'n_epoch' in the overrides of job 'bad-key'; "
                                           "did you mean 'n_epochs'?")
    interrupted_run = Path(summary["second"]["run_dir"])
    assert not (interrupted_run / "final").exists() and (interrupted_run / "checkpoints" / "last.pt").is_file()

    # the rerun skips the finished job, resumes the interrupted one in its own folder, fails the bad one again
    monkeypatch.setattr(batch, "pause", real_pause)
    rows, completed, _ = batch.run_batch(jobs_file, devices=CPU)
    assert completed
    summary = read_summary(tmp_path / "summary.csv")
    assert [summary[j]["status"] for j in ("first", "second", "bad-key")] == ["skipped", "done", "failed"]
    assert Path(summary["second"]["run_dir"]) == interrupted_run
    assert "resume=" in (second / "log.txt").read_text()
    assert len((interrupted_run / "losses.csv").read_text().strip().splitlines()) == 1 + 20
    assert len(list(second.iterdir())) == 3  # one run folder, log.txt, job.json
    for key in ("clip_t", "l1", "structure_distance", "alpha_coverage"):
        assert summary["second"][key] != ""  # from the run's metrics.json
    assert summary["first"]["seconds"] and float(summary["first"]["seconds"]) > 0  # kept from the first batch

    # the gallery shows the finished jobs: every picture and link it names exists
    links = gallery_links(tmp_path)
    assert len(links) == 2 * 2 * 3  # two finished image jobs, three pictures each, as image and link
    assert all((tmp_path / link).is_file() for link in links)
    assert any("composite.png" in link for link in links) and any("edit_over_green.png" in link for link in links)


def test_a_video_job_gets_thumbnails_linking_to_its_mp4s(tmp_path, tiny_video_overrides):
    overrides = parse_overrides([a for a in tiny_video_overrides if not a.startswith("results_folder")])
    jobs_file = write_jobs(tmp_path / "jobs.yaml", [{"example_config": "car-turn_winter",
                                                     "overrides": {**overrides, "n_epochs": 2}}])
    rows, completed, _ = batch.run_batch(jobs_file, devices=CPU)
    assert completed and rows[0]["status"] == "done", rows[0]["error"]
    assert rows[0]["warp_error"] is not None
    links = gallery_links(tmp_path)
    assert sorted(Path(link).suffix for link in links) == [".jpg"] * 3 + [".mp4"] * 3
    assert all((tmp_path / link).is_file() for link in links)


def test_three_jobs_through_ray_on_the_cpu(tmp_path, tiny_job):
    ray = pytest.importorskip("ray", reason="Ray is optional: pip install -r requirements-ray.txt")
    out = tmp_path / "shared"
    jobs_file = write_jobs(tmp_path / "jobs.yaml", [
        {"example_config": "golden_horse", "name": "one", "overrides": tiny_job},
        {"example_config": "ice_cake", "name": "two", "overrides": tiny_job},
        {"example_config": "golden_horse", "name": "bad-image",
         "overrides": {**tiny_job, "image_path": str(tmp_path / "missing.jpg")}},  # fails inside its task
    ])
    rows, completed, _ = batch.run_batch(jobs_file, out_dir=out, ray_address="local", ray_cpus=2)
    assert completed and not ray.is_initialized()  # Ray is shut down again
    summary = read_summary(out / "summary.csv")
    assert [summary[j]["status"] for j in ("one", "two", "bad-image")] == ["done", "done", "failed"]
    assert "missing.jpg does not exist" in summary["bad-image"]["error"]
    assert all(Path(summary[j]["run_dir"]).parent == out / "runs" / j for j in ("one", "two"))
    assert all(summary[j]["clip_t"] for j in ("one", "two"))


def test_a_killed_job_says_so(tmp_path):
    """A job killed from outside (the out-of-memory killer) leaves no message of its own."""
    import subprocess
    import sys
    import time
    folder = tmp_path / "runs" / "big"
    folder.mkdir(parents=True)
    (folder / "log.txt").write_text("step 1/1000\r")
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    process.kill()
    attempt = batch.Attempt(batch.Job("big", "image", "golden_horse", None, {}), folder, process, 0, time.time())
    row = batch.finish_job(attempt, process.wait())
    assert row["status"] == "failed" and row["error"].startswith("killed by SIGKILL (out of memory?)")
