"""The web app's logic without a browser: upload checks, the stop flag, the progress estimate,
and a run's zip (config snapshot + a command line that reproduces the run)."""

import os
import shlex
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from util.errors import ClipFileError, ConfigError, InputError, PromptTooLongError
from webapp import jobs
from webapp.uploads import check_masks, check_origin, check_photo, check_video

REPO = Path(__file__).resolve().parent.parent

TINY_IMAGE_KEYS = {"n_aug": 2, "num_scales": 3, "skip_n33d": 8, "skip_n33u": 8, "mixed_precision": "off"}


@pytest.fixture
def server(tmp_path, tiny_clip_file):
    return jobs.ServerSettings(results=tmp_path / "results", atlases=tmp_path / "atlases", clip=str(tiny_clip_file),
                               overrides={"image": TINY_IMAGE_KEYS})


def image_request(photo, **changes):
    values = dict(photo=Path(photo), photo_name="cat.jpg", comp_text="golden cat", screen_text="gold",
                  src_text="cat", bootstrap_text=None, steps=6, size=64, seed=2, device="cpu", preview_every=2)
    values.update(changes)
    return jobs.ImageRequest(**values)


# ---- uploads -----------------------------------------------------------------------------------

def test_photos_are_checked_before_decoding(tmp_path, cat_photo):
    assert check_photo(cat_photo) == (451, 300)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG" * 100)
    with pytest.raises(InputError, match="broken.jpg is not a readable image"):
        check_photo(broken)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(cat_photo).read_bytes()[:2000])
    with pytest.raises(InputError, match="not a readable image"):
        check_photo(truncated, "truncated.jpg")
    with pytest.raises(InputError, match="notes.txt is not a photo file this app reads; upload one of: jpg"):
        check_photo(cat_photo, "notes.txt")
    huge = tmp_path / "huge.png"
    Image.new("L", (8000, 5010)).save(huge)  # 40.08 megapixels; compresses to a few kB
    with pytest.raises(InputError, match=r"8000x5010 \(40.1 megapixels\); upload a photo of at most 40 megapixels"):
        check_photo(huge)
    Image.new("L", (8000, 5000)).save(huge)
    assert check_photo(huge) == (8000, 5000)


def test_only_uploads_and_the_apps_results_are_opened(tmp_path, cat_photo):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    inside = uploads / "x.jpg"
    inside.write_bytes(Path(cat_photo).read_bytes())
    assert check_origin(inside, [uploads]) == inside
    for path in (cat_photo, uploads / ".." / ".." / "etc" / "passwd", "/etc/passwd", ""):
        with pytest.raises(InputError, match="not uploaded to this app"):
            check_origin(path, [uploads])
    link = uploads / "link.jpg"
    link.symlink_to(cat_photo)  # a link out of the upload folder is judged by where it points
    with pytest.raises(InputError, match="not uploaded"):
        check_origin(link, [uploads])


def test_videos_and_masks_are_checked(tmp_path, cat_photo):
    import imageio.v2 as imageio
    video = tmp_path / "clip.mp4"
    imageio.mimwrite(video, [np.full((32, 48, 3), 10 * t, np.uint8) for t in range(4)], fps=5, macro_block_size=16)
    assert check_video(video) == (48, 32)
    with pytest.raises(InputError, match="clip.txt is not a video file"):
        check_video(video, "clip.txt")
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(b"\0" * 1000)
    with pytest.raises(InputError, match="fake.mp4 is not a readable video"):
        check_video(fake)
    check_masks([cat_photo], ["00000.jpg"])
    with pytest.raises(InputError, match="00001.gif is not a mask image file"):
        check_masks([cat_photo, cat_photo], ["00000.jpg", "00001.gif"])


def test_requests_are_refused_with_the_command_lines_messages_before_anything_is_written(server, cat_photo):
    with pytest.raises(ConfigError, match="comp_text is empty"):
        jobs.check_image_request(image_request(cat_photo, comp_text=None), server)
    with pytest.raises(ConfigError, match="must be a whole number of at least 1"):
        jobs.whole_number("2.5", "steps", 1)
    with pytest.raises(ConfigError, match="size must be a whole number from 32 to 2048; got 4"):
        jobs.whole_number(4, "size", 32, 2048)
    with pytest.raises(PromptTooLongError, match="over CLIP's limit of 77; use a shorter prompt"):
        jobs.check_image_request(image_request(cat_photo, screen_text="gold " * 80), server)
    with pytest.raises(InputError, match="no atlas chosen"):
        jobs.check_video_request(jobs.VideoRequest("", "background", "snow", None, None, None, 4, 0, "cpu", 2), server)
    with pytest.raises(InputError, match="there is no atlas '../atlases'"):
        jobs.atlas_folder(server, "../atlases")
    assert not server.results.exists()


def test_settings_file_sections_and_keys_are_checked(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("image: {n_aug: 2}\natlas: {samples_batch: 500}\n")
    assert jobs.read_settings_file(path) == {"image": {"n_aug": 2}, "atlas": {"samples_batch": 500}}
    path.write_text("images: {n_aug: 2}\n")
    with pytest.raises(ConfigError, match="unknown section 'images'"):
        jobs.read_settings_file(path)
    path.write_text("video: {n_agu: 2}\n")
    with pytest.raises(ConfigError, match="unknown config key 'n_agu'.*did you mean 'n_aug'"):
        jobs.read_settings_file(path)


# ---- jobs --------------------------------------------------------------------------------------

def test_stop_makes_progress_return_false_and_the_run_ends_with_its_result(tmp_path):
    job = jobs.Job(tmp_path)
    calls = []

    def work(progress):
        step = 0
        while step < 1000:
            step += 1
            calls.append(step)
            time.sleep(0.01)  # a training step
            if not progress(step, 1000, None):
                return step
        return step

    job.start(work)
    seen = []
    for report in job.reports(poll=0.05):
        if report is not None:
            seen.append(report.step)
            if report.step == 3:
                job.stop()
    assert job.stopped and job.error is None
    assert job.result == calls[-1] == seen[-1] and 3 <= job.result < 1000  # stops at the next report


def test_a_failing_run_hands_its_error_over(tmp_path):
    def work(progress):
        progress(1, 5, None)
        raise InputError("frame x is not a readable image")

    job = jobs.Job(tmp_path).start(work)
    assert [r.step for r in job.reports(poll=0.05) if r is not None] == [1]
    assert isinstance(job.error, InputError) and job.result is None


def test_job_board_stops_only_the_sessions_own_job(tmp_path):
    board, mine, theirs = jobs.JobBoard(), jobs.Job(tmp_path), jobs.Job(tmp_path)
    for session, job in (("me", mine), ("them", theirs)):
        assert board.submit(session, "image") and board.starting(session)
        board.begin(session, job)
    assert board.stop("me") == "running" and mine.stopped and not theirs.stopped
    board.finished("me")
    assert board.stop("me") is None and not board.busy("me") and board.busy("them")


def test_a_page_has_one_run_and_a_second_press_is_neither_counted_nor_run(tmp_path):
    board = jobs.JobBoard()
    assert board.submit("me", "image") is True
    assert board.submit("me", "image") is False and board.submit("me", "video") is False  # ignored, not counted
    assert board.starting("me") is True   # the counted run leaves the queue
    assert board.starting("me") is False  # a second run of the page's, had one been queued, never runs
    board.finished("me")
    assert board.stop("me") is None       # Stop on an idle page: nothing to cancel, now or later
    assert board.submit("me", "image") is True and board.starting("me") is True  # the next run is not affected


def test_stop_takes_a_waiting_run_out_of_the_queue_and_places_count_the_runs_ahead(tmp_path):
    board = jobs.JobBoard()
    for session in ("a", "b", "c"):
        board.submit(session, "image" if session != "c" else "video")
    assert board.place("a") == ("image", 0, 3)  # next, nothing running: it starts in a moment
    board.starting("a")
    assert board.place("a") is None and board.place("b") == ("image", 1, 2) and board.place("c") == ("video", 2, 2)
    assert board.stop("b") == "waiting" and not board.busy("b")
    assert board.place("c") == ("video", 1, 1)
    assert board.starting("b") is False  # its event, should it still leave the queue, does not run
    board.submit("d", "image")
    board.forget("d")  # its page was closed while it waited: it no longer counts as ahead of anyone
    assert board.place("c") == ("video", 1, 1) and board.starting("d") is False
    job = jobs.Job(tmp_path)
    board.stop("a")  # pressed while "a" was starting (no Job yet): the Job stops as soon as it begins
    board.begin("a", job)
    assert job.stopped


def test_time_left_excludes_the_start_up():
    # started at 0, the first report (step 10) at 40 s (loading CLIP took most of it)
    assert jobs.eta_seconds(10, 100, now=40, started=0, first=None) == pytest.approx(360)
    # step 20 at 50 s: 1 s per step since the first report, 80 steps left
    assert jobs.eta_seconds(20, 100, now=50, started=0, first=(10, 40)) == pytest.approx(80)
    assert jobs.format_seconds(80) == "1 min 20 s" and jobs.format_seconds(7300) == "2 h 01 min"


def test_between_reports_the_page_shows_the_time_passing(tmp_path):
    job = jobs.Job(tmp_path)
    assert job.now() is None
    job.started -= 50  # the first report (step 10 of 100) 50 s after the start: 450 s left
    job.progress(10, 100)
    time.sleep(0.3)
    now = job.now()
    assert now.step == 10 and now.elapsed >= job.last.elapsed + 0.3
    assert job.last.eta - now.eta == pytest.approx(now.elapsed - job.last.elapsed)


# ---- a real (tiny) run and its zip -------------------------------------------------------------

def run_job(request, server):
    """An image job run to its end: (its reports, its outputs)."""
    job = jobs.Job(jobs.new_job_folder(server.results, "image"))
    job.start(lambda progress: jobs.run_image_job(request, server, job, progress))
    reports = [r for r in job.reports(poll=0.1) if r is not None]
    if job.error is not None:
        raise job.error
    return reports, job.result


def test_image_job_zip_reproduces_the_run_from_the_command_line(server, cat_photo, tmp_path):
    reports, out = run_job(image_request(cat_photo), server)
    assert [(r.step, r.total) for r in reports] == [(2, 6), (4, 6)]
    assert not out.stopped and out.steps == 6
    with Image.open(out.edit_layer) as layer:
        assert layer.mode == "RGBA" and layer.size == (96, 64)
    run_name = out.zip.stem
    with zipfile.ZipFile(out.zip) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "unpacked")
    assert {f"{run_name}/config.yaml", f"{run_name}/input.jpg", f"{run_name}/REPRODUCE.txt",
            f"{run_name}/final/edit_layer.png", f"{run_name}/model.pt", f"{run_name}/losses.csv"} <= names
    # checkpoints and intermediate images only on request
    run = out.zip.parent / run_name
    assert (run / "checkpoints").is_dir() and (run / "intermediate").is_dir()
    assert not any(n.split("/")[1] in ("checkpoints", "intermediate") for n in names)
    full = jobs.zip_run(run, {}, out.command, checkpoints=True)
    with zipfile.ZipFile(full) as archive:
        assert f"{run_name}/checkpoints/last.pt" in archive.namelist()
        assert any(n.startswith(f"{run_name}/intermediate/") for n in archive.namelist())
    unpacked = tmp_path / "unpacked" / run_name
    saved = yaml.safe_load((unpacked / "config.yaml").read_text())
    assert saved["seed"] == 2 and saved["comp_text"] == "golden cat" and saved["resize_input"] == 64
    assert out.command in (unpacked / "REPRODUCE.txt").read_text()

    # the command, run where the zip was unpacked (with the repository's script), gives the same edit
    # (up to one 8-bit level: a CPU's sums round differently with another number of threads)
    args = shlex.split(out.command)
    assert args[:4] == ["python", "train_image.py", "--config", f"{run_name}/config.yaml"]
    subprocess.run([sys.executable, str(REPO / args[1]), *args[2:]], cwd=tmp_path / "unpacked", check=True,
                   capture_output=True, env={"OMP_NUM_THREADS": str(torch.get_num_threads()), "PATH": "/usr/bin:/bin"})
    again = np.asarray(Image.open(next((tmp_path / "unpacked" / "results").glob("*/final/composite.png"))), dtype=int)
    assert np.abs(again - np.asarray(Image.open(out.composite), dtype=int)).max() <= 1


def test_stopped_image_job_keeps_its_result_and_says_how_many_steps(server, cat_photo):
    request = image_request(cat_photo, steps=50)
    job = jobs.Job(jobs.new_job_folder(server.results, "image"))
    job.stop()  # pressed before the first preview: the run ends there
    job.start(lambda progress: jobs.run_image_job(request, server, job, progress))
    assert [r.step for r in job.reports(poll=0.1) if r is not None] == [2]
    out = job.result
    assert out.stopped and out.steps == 2 and out.edit_layer.is_file()
    assert "n_epochs=2" in out.command


def test_atlas_job_trains_an_uploaded_video_and_video_job_edits_it(server, tiny_clip_file, tmp_path):
    import imageio.v2 as imageio
    import skimage.data
    photo = np.asarray(skimage.data.coffee())
    video = tmp_path / "my clip!.mp4"
    imageio.mimwrite(video, [photo[100:164, 10 * t:10 * t + 96] for t in range(6)], fps=5, macro_block_size=16)
    server.overrides = {"atlas": {"grid_levels": 5, "grid_max_resolution": 256, "grid_mapping_cell": 8,
                                  "grid_alpha_width": 32, "samples_batch": 1000},
                        "video": {"grid_atlas_resolution": 300, "num_scales": 3, "skip_n33d": 8, "skip_n33u": 8,
                                  "n_aug": 2, "fps": 5}}
    request = jobs.AtlasRequest(video=video, video_name=video.name, masks=[], mask_names=[], steps=20, size=32,
                                device="cpu", preview_every=10)
    jobs.check_atlas_request(request, server)
    job = jobs.Job(jobs.new_atlas_folder(server, video.name))
    job.start(lambda progress: jobs.run_atlas_job(request, server, job, progress))
    assert [r.step for r in job.reports(poll=0.1) if r is not None] == [10]
    assert job.error is None and job.result == "my-clip" and jobs.list_atlases(server.atlases) == ["my-clip"]
    preview = jobs.atlas_preview(server.atlases / "my-clip", 10)  # what the page shows while it trains
    assert preview and preview[0][1].startswith("input | reconstruction (video ")  # and its PSNR (no masks here)

    edit = jobs.VideoRequest("my-clip", "background", "snowy table", "snow", None, None, 2, 0, "cpu", 1)
    jobs.check_video_request(edit, server)
    job = jobs.Job(jobs.new_job_folder(server.results, "video"))
    job.start(lambda progress: jobs.run_video_job(edit, server, job, progress))
    assert [r.step for r in job.reports(poll=0.1) if r is not None] == [1]
    out = job.result
    assert out.edited.is_file() and out.side_by_side.is_file() and out.alpha_video.name == "edit_layer.webm"
    assert [c for _, c in out.atlases] == ["atlas", "edited atlas", "edit layer"]
    assert out.command.startswith("python train_video.py --config edit-")


def test_a_run_refused_while_it_starts_leaves_no_job_folder(server, cat_photo):
    server.clip = str(cat_photo)  # not a CLIP checkpoint: found out only when the run loads it
    job = jobs.Job(jobs.new_job_folder(server.results, "image"))
    job.start(lambda progress: jobs.run_image_job(image_request(cat_photo), server, job, progress))
    for _ in job.reports(poll=0.1):
        pass
    assert isinstance(job.error, ClipFileError) and job.result is None
    assert not job.folder.exists()


# ---- issue 26: one line for every refusal -------------------------------------------------------

def test_a_photo_over_pillows_decompression_limit_gets_its_one_line(tmp_path):
    import struct
    import zlib

    def png_header(width, height):  # a valid PNG header (and one empty IDAT): no pixels decoded
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(20000, 20000))  # 400 megapixels: Pillow refuses to open it at all
    with pytest.raises(InputError, match=r"^bomb.png is 400 megapixels; upload a photo of at most 40 megapixels$"):
        check_photo(bomb)
    bomb.write_bytes(png_header(10000, 10000))  # 100 megapixels: over Pillow's warning limit, under its error
    with pytest.raises(InputError, match=r"10000x10000 \(100.0 megapixels\)"):
        check_photo(bomb)


def test_gif_is_not_offered_as_a_video(tmp_path):
    from webapp.uploads import VIDEO_SUFFIXES
    assert ".gif" not in VIDEO_SUFFIXES
    gif = tmp_path / "clip.gif"
    Image.new("RGB", (8, 8)).save(gif)
    with pytest.raises(InputError, match="clip.gif is not a video file this app reads; upload one of: mp4, mov"):
        check_video(gif)


def test_messages_for_the_page_name_no_server_paths():
    assert jobs.public_message("clip_model_name=/srv/app/models/my-clip.pt is not a CLIP ViT checkpoint: x\nmore") \
        == "clip_model_name=my-clip.pt is not a CLIP ViT checkpoint: x"
    assert jobs.public_message("frame /tmp/x/job/frames/00001.png is unreadable; see https://example.com/a/b") \
        == "frame 00001.png is unreadable; see https://example.com/a/b"
    assert jobs.public_message("there is no atlas in /srv/atlases/; pick one") == "there is no atlas in a folder; pick one"


def test_steps_are_bounded_with_their_range():
    with pytest.raises(ConfigError, match=f"steps must be a whole number from 1 to {jobs.MAX_STEPS}; got 1000000000000$"):
        jobs.whole_number(1e12, "steps", 1, jobs.MAX_STEPS)
    assert jobs.whole_number(jobs.MAX_STEPS, "steps", 1, jobs.MAX_STEPS) == jobs.MAX_STEPS


def test_an_atlas_without_masks_offers_only_its_background(server, tmp_path):
    with_masks, without = server.atlases / "swan", server.atlases / "clip"
    for folder, masks in ((with_masks, "'masks'"), (without, "null")):
        folder.mkdir(parents=True)
        (folder / "checkpoint").write_bytes(b"")
        (folder / "config.yaml").write_text(f"video: clip.mp4\nmasks: {masks}\n")
    assert jobs.atlas_layers(with_masks) == ["foreground", "background"]
    assert jobs.atlas_layers(without) == ["background"]
    request = jobs.VideoRequest("clip", "foreground", "snow", None, None, None, 4, 0, "cpu", 2)
    with pytest.raises(InputError, match="'clip' was trained without object masks, so it has no foreground layer; "
                                         "edit its background") as refused:
        jobs.check_video_request(request, server)
    assert "mask_alpha_threshold" not in str(refused.value)
    with pytest.raises(InputError, match=r"there is no atlas 'gone' in atlases/; pick one") as refused:
        jobs.atlas_folder(server, "gone")
    assert str(tmp_path) not in str(refused.value)


def test_the_settings_file_is_named_in_its_messages_not_the_command_line(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("video: {n_agu: 2}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'n_agu' in settings file settings.yaml \(section "
                                          r"video\); did you mean 'n_aug'") as refused:
        jobs.read_settings_file(path)
    assert "command line" not in str(refused.value)
    path.write_text("image: {n_aug: -3}\n")
    with pytest.raises(ConfigError, match=r"^settings file settings.yaml, section image: .*n_aug") as refused:
        jobs.read_settings_file(path)
    assert "command line" not in str(refused.value)


def run_app(*args, timeout=60):
    return subprocess.run([sys.executable, str(REPO / "app.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_app_refuses_a_results_place_it_cannot_use_in_one_line(tmp_path):
    taken = tmp_path / "results.txt"
    taken.write_text("x")
    done = run_app("--results", taken, "--port", 1)  # the port is checked first: 1 cannot be listened on
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    free = socket_port()
    done = run_app("--results", taken, "--port", free)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == f"error: --results {taken} is a file, not a folder; give a folder (it is made if missing)\n"
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    # a read-only folder; as root (who writes anywhere) /sys, where no folder can be made
    place = locked if not os.access(locked, os.W_OK) else Path("/sys")
    done = run_app("--results", place / "new" / "runs", "--port", free)
    assert done.returncode == 2 and done.stderr.startswith(f"error: --results {place}/new/runs cannot be written")
    assert done.stderr.count("\n") == 1 and not (place / "new").exists()


def socket_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_app_on_a_port_in_use_says_so_in_one_line_and_leaves_nothing(tmp_path):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_app("--port", port, "--results", tmp_path / "results")
    assert done.returncode == 2 and "Traceback" not in done.stderr and "GRADIO_SERVER_PORT" not in done.stderr
    assert done.stderr == (f"error: port {port} on 127.0.0.1 is in use (another app.py?); stop that one, or give "
                           f"another port, e.g. --port {port + 1}\n")
    assert not (tmp_path / "results").exists()


def test_app_refuses_a_clip_file_that_is_not_clip_at_start_up(tmp_path, cat_photo, tiny_clip_file):
    assert jobs.check_clip_file(tiny_clip_file) == str(Path(tiny_clip_file).resolve())
    not_clip = tmp_path / "weights.pt"
    torch.save({"layer.weight": torch.zeros(2, 2)}, not_clip)
    for wrong in (cat_photo, not_clip):
        done = run_app("--clip", wrong, "--port", socket_port(), "--results", tmp_path / "results")
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert done.stderr.startswith(f"error: --clip {wrong} is ") and "clip_model_name" not in done.stderr
        assert done.stderr.endswith("give OpenAI's ViT-B-32.pt, or leave --clip out to download ViT-B/32\n")
        assert not (tmp_path / "results").exists()


def test_number_fields_refuse_infinity_and_nan_in_one_line():
    for value in ("inf", "nan", None, "ten"):
        with pytest.raises(ConfigError, match="steps must be a whole number from 1 to"):
            jobs.whole_number(value, "steps", 1, jobs.MAX_STEPS)
