"""The runs behind the web app, without any UI: requests are checked before anything is
written, each run trains in a background thread that reports its progress (with an estimate of
the time left) and stops cleanly when asked, and its job folder gets a zip of the run with the
command line that reproduces it.

    results/<kind>-<time>-<id>/          a job folder (the app's results folder, --results)
        input.jpg                        the uploaded photo, as uploaded (image jobs)
        <run>/                           the run folder written by text2live.edit_image / edit_video
        <run>.zip                        the run folder + input + REPRODUCE.txt
    pretrained_nla_models/<name>/        atlases trained from uploaded videos (--atlases)
"""

import json
import math
import queue
import re
import secrets
import shlex
import shutil
import threading
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from util.errors import USER_ERRORS, ConfigError, InputError
from util.files import write_atomic
from webapp.uploads import check_masks, check_photo, check_video

# what a run costs on each kind of device: the UI's defaults (a CPU run should show a first
# preview within a minute or two and finish within about ten minutes)
CPU_DEFAULTS = {"steps": 120, "size": 256, "preview_every": 10, "video_steps": 60, "video_preview_every": 5,
                "atlas_steps": 2000, "atlas_size": 240}
GPU_DEFAULTS = {"steps": 1000, "size": 512, "preview_every": 50, "video_steps": 3000, "video_preview_every": 100,
                "atlas_steps": 20000, "atlas_size": 432}
# the most steps a page may ask for: 100 times the GPU defaults (days of training), so a slip of the
# keyboard (10^12 steps) is refused with its range instead of queueing a run that never ends
MAX_STEPS = 100_000
MAX_ATLAS_STEPS = 2_000_000


def available_devices() -> list[str]:
    """'cuda:0', 'cuda:1', ... for each GPU, then 'cpu'."""
    import torch
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] + ["cpu"]


def defaults_for(device: str) -> dict:
    return CPU_DEFAULTS if device == "cpu" else GPU_DEFAULTS


@dataclass
class ServerSettings:
    """What the app's command line fixes for every run."""
    results: Path                 # job folders go here (the app serves files from here and `atlases` only)
    atlases: Path                 # atlases to edit (one folder each, with its `checkpoint`)
    clip: str | None = None       # clip_model_name for every run (a checkpoint file), None: the default
    overrides: dict = field(default_factory=dict)  # "image" / "video" / "atlas" -> config keys for every run

    def config_keys(self, kind: str) -> dict:
        keys = dict(self.overrides.get(kind) or {})
        if self.clip is not None and kind != "atlas":
            keys["clip_model_name"] = str(self.clip)
        return keys


def read_settings_file(path) -> dict:
    """A YAML file of config keys for every run, by kind: {image: {...}, video: {...}, atlas: {...}}.
    A wrong key or value is named with the file and its section."""
    from util.config import CONFIG_DIR, load_config, merge, read_yaml
    data = read_yaml(path, "settings file")
    name = Path(path).name
    unknown = sorted(set(data) - {"image", "video", "atlas"})
    if unknown:
        raise ConfigError(f"settings file {name}: unknown section '{unknown[0]}'; use image:, video: and atlas: "
                          "sections of config keys")
    for kind, keys in data.items():
        if keys is not None and not isinstance(keys, dict):
            raise ConfigError(f"settings file {name}: section {kind}: must hold key: value pairs")
        config_kind = "nla" if kind == "atlas" else kind
        merge(read_yaml(CONFIG_DIR / f"{config_kind}_config.yaml"), keys or {}, f"settings file {name} (section {kind})")
        try:
            load_config(config_kind, overrides=keys or {})  # each value checked now, not at the first run
        except ConfigError as e:
            raise ConfigError(f"settings file {name}, section {kind}: {e}") from None
    return data


def writable_folder(path, flag: str) -> tuple[Path, list]:
    """The folder `path` (a command-line flag's value), made if missing and checked to be
    writable; returns it and the folders made (to remove if the app does not start)."""
    path = Path(path).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a folder; give a folder (it is made if missing)")
    made = [p for p in (path, *path.parents) if not p.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        for folder in reversed(made):
            shutil.rmtree(folder, ignore_errors=True)
        raise ConfigError(f"{flag} {path} cannot be written ({e.strerror or type(e).__name__}); give a folder "
                          "this user can write to") from None
    return path, made


def check_clip_file(path) -> str:
    """--clip: the file loaded once at start-up, so that a wrong file is refused then and not at
    every run; returns its absolute path."""
    from models.clip import USE_VIT, build_model, read_state_dict
    from util.errors import ClipFileError
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--clip {path} does not exist; give a CLIP checkpoint file, or leave --clip out to "
                          "download ViT-B/32")
    try:
        build_model(read_state_dict(path, f"--clip {path}"), f"--clip {path}")
    except ClipFileError as e:
        raise ClipFileError(str(e).replace(USE_VIT, "give OpenAI's ViT-B-32.pt, or leave --clip out to download "
                                                    "ViT-B/32")) from None
    return str(path.resolve())


def public_message(text) -> str:
    """A message for the web page: its first line, each absolute server path cut to its last part
    (the page's user knows the names they gave, not the server's folders)."""
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return re.sub(r"(?<![\w:/.~-])/(?:[^\s'\"/,;()]+/)+([^\s'\"/,;()]*)",
                  lambda m: m.group(1) or "a folder", line)


# ---- a running job ---------------------------------------------------------------------------------

@dataclass
class Report:
    """One progress report of a run."""
    step: int
    total: int
    elapsed: float           # seconds since the job started
    eta: float               # seconds left, estimated


def eta_seconds(step: int, total: int, now: float, started: float, first: tuple | None) -> float:
    """Time left: the rate since the first report (which excludes the start-up: loading CLIP,
    the video, the optical flow), or before a second report, the rate since the start."""
    if first is not None and step > first[0]:
        per_step = (now - first[1]) / (step - first[0])
    else:
        per_step = (now - started) / max(step, 1)
    return per_step * max(total - step, 0)


class Job:
    """One run in a background thread. work(progress) does the run, calling
    progress(step, total, preview) as the API does; progress returns False once stop() was
    called, which ends the run cleanly with the result so far."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.result = None
        self.error = None
        self.started = time.monotonic()
        self.last = None                # the latest Report
        self._first = None              # (step, time) of the first report
        self._stop = threading.Event()
        self._reports = queue.Queue()   # Reports, then None when the run has ended
        self._thread = None

    def stop(self):
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def progress(self, step, total, preview=None) -> bool:
        now = time.monotonic()
        eta = eta_seconds(step, total, now, self.started, self._first)
        if self._first is None:
            self._first = (step, now)
        self.last = Report(step, total, now - self.started, eta)
        self._reports.put(self.last)
        return not self._stop.is_set()

    def now(self) -> Report | None:
        """The latest report brought up to now: the time elapsed grows, the time left shrinks."""
        if self.last is None:
            return None
        elapsed = time.monotonic() - self.started
        eta = max(0.0, self.last.eta - (elapsed - self.last.elapsed))
        return Report(self.last.step, self.last.total, elapsed, eta)

    def start(self, work):
        def run():
            try:
                self.result = work(self.progress)
            except BaseException as e:  # handed to the page by reports()' caller
                self.error = e
            finally:
                self._reports.put(None)
        self._thread = threading.Thread(target=run, name=f"job-{self.folder.name}", daemon=True)
        self._thread.start()
        return self

    def reports(self, poll: float = 1.0):
        """Yield Reports as they come, and None after `poll` seconds without one (so a page can
        show the time passing), until the run ends."""
        while True:
            try:
                report = self._reports.get(timeout=poll)
            except queue.Empty:
                yield None
                continue
            if report is None:
                return
            yield report


class JobBoard:
    """Which pages (browser sessions) have a run, and where it is: each page has at most one
    run, waiting in the queue or running. A Run pressed while the page has one is ignored (the
    page disables its Run buttons meanwhile); the waiting runs keep their order, so a page can
    show its place in the queue; Stop finds the page's running job, or takes its run out of the
    queue."""

    def __init__(self):
        self._jobs = {}       # session -> its running Job (once its checks passed)
        self._kinds = {}      # session -> the kind of its run ("image", "video", "atlas"), waiting or running
        self._waiting = []    # sessions whose run waits in the queue, first first
        self._stop_asked = set()  # sessions whose Stop came while their run was starting (no Job yet)
        self._lock = threading.Lock()

    def submit(self, session: str, kind: str) -> bool:
        """Run was pressed: the run joins the queue (True), or the page has a run already and
        this one is ignored (False)."""
        with self._lock:
            if session in self._kinds:
                return False
            self._kinds[session] = kind
            self._waiting.append(session)
            return True

    def starting(self, session: str) -> bool:
        """A run leaves the queue: True for the page's submitted run, False for one that was
        never counted (pressed while the page had a run) or was taken out of the queue."""
        with self._lock:
            if session not in self._waiting:
                return False
            self._waiting.remove(session)
            return True

    def begin(self, session: str, job: Job):
        with self._lock:
            self._jobs[session] = job
            if session in self._stop_asked:
                self._stop_asked.discard(session)
                job.stop()

    def finished(self, session: str):
        """The page's run has ended (done, stopped, refused or failed): it may run again."""
        with self._lock:
            self._jobs.pop(session, None)
            self._kinds.pop(session, None)
            self._stop_asked.discard(session)

    def busy(self, session: str) -> bool:
        with self._lock:
            return session in self._kinds

    def place(self, session: str) -> tuple[str, int, int] | None:
        """(kind, runs ahead, runs waiting) for the page's run waiting in the queue, else None.
        The runs ahead count the one running, if any."""
        with self._lock:
            if session not in self._waiting:
                return None
            running = sum(1 for s in self._kinds if s not in self._waiting)
            return self._kinds[session], self._waiting.index(session) + running, len(self._waiting)

    def forget(self, session: str):
        """The page was closed: its waiting run no longer counts, its running job stops."""
        with self._lock:
            if session in self._waiting:
                self._waiting.remove(session)
                self._kinds.pop(session, None)
            job = self._jobs.get(session)
        if job is not None:
            job.stop()

    def stop(self, session: str) -> str | None:
        """Stop the page's running job ("running"), or take its run out of the queue
        ("waiting"); None when the page has no run."""
        with self._lock:
            if session in self._waiting:
                self._waiting.remove(session)
                self._kinds.pop(session, None)
                return "waiting"
            if session not in self._kinds:
                return None
            job = self._jobs.get(session)
            if job is None:
                self._stop_asked.add(session)
        if job is not None:
            job.stop()
        return "running"


def new_job_folder(results: Path, kind: str) -> Path:
    folder = Path(results) / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    folder.mkdir(parents=True)
    return folder


def run_folder(job_folder: Path) -> Path | None:
    """The run folder the API made inside a job folder (the one folder with a config.yaml)."""
    runs = [p.parent for p in Path(job_folder).glob("*/config.yaml")]
    return runs[0] if runs else None


def snapshot_folder(job_folder: Path, step: int) -> Path | None:
    """The intermediate images the run saved at `step`."""
    run = run_folder(job_folder)
    folder = run / "intermediate" / f"step_{step:05d}" if run else None
    return folder if folder and folder.is_dir() else None


def optional_text(text) -> str | None:
    text = (text or "").strip()
    return text or None


def whole_number(value, name: str, low: int, high: int | None = None) -> int:
    """A number field of the page as an int, or the one-line error naming the field and its range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    whole = number is not None and math.isfinite(number) and number == int(number)
    if not whole or number < low or (high is not None and number > high):
        limit = f"from {low} to {high}" if high is not None else f"of at least {low}"
        shown = int(number) if whole else value  # 1e12 typed shows as 1000000000000
        raise ConfigError(f"{name} must be a whole number {limit}; got {shown!r}")
    return int(number)


def check_prompt_lengths(*texts):
    """Each text within CLIP's 77 tokens (PromptTooLongError, as the command lines say it)."""
    from models.tokenizer import tokenize
    tokenize([t for t in texts if t])


@contextmanager
def removed_on_user_error(folder: Path):
    """A job whose run fails with a user error (a text over CLIP's limit after its template, a
    damaged checkpoint) leaves no folder behind."""
    try:
        yield
    except USER_ERRORS:
        shutil.rmtree(folder, ignore_errors=True)
        raise


# ---- image jobs -----------------------------------------------------------------------------------

@dataclass
class ImageRequest:
    photo: Path                  # the upload (checked: inside the upload folder or the app's results)
    photo_name: str              # the name the user gave the file
    comp_text: str | None         # None: refused with the command line's 'comp_text is empty'
    screen_text: str | None
    src_text: str | None
    bootstrap_text: str | None
    steps: int
    size: int                    # short side, pixels
    seed: int
    device: str
    preview_every: int
    zip_checkpoints: bool = False  # the zip also holds checkpoints/ and intermediate/ (larger)


def image_config_keys(request: ImageRequest, server: ServerSettings) -> dict:
    """The config keys of an image run besides texts, steps, seed and device (edit_image's arguments)."""
    return {"resize_input": request.size, "log_images_freq": request.preview_every, **server.config_keys("image")}


def check_image_request(request: ImageRequest, server: ServerSettings):
    """Everything the command line would refuse, refused before anything is written."""
    from util.config import check_image_config, load_config
    check_photo(request.photo, request.photo_name)
    keys = {"image_path": str(request.photo), "comp_text": request.comp_text, "screen_text": request.screen_text,
            "src_text": request.src_text, "bootstrap_text": request.bootstrap_text, "n_epochs": request.steps,
            "seed": request.seed, "device": request.device, **image_config_keys(request, server)}
    check_image_config(load_config("image", overrides=keys))
    check_prompt_lengths(request.comp_text, request.screen_text, request.src_text, request.bootstrap_text)


@dataclass
class ImageOutputs:
    composite: Path
    edit_layer: Path             # RGBA
    alpha: Path
    edit_over_green: Path
    loss_curve: Path | None
    zip: Path
    command: str                 # reproduces the run from the unpacked zip
    steps: int                   # steps done
    stopped: bool                # Stop ended it before `steps` asked


def run_image_job(request: ImageRequest, server: ServerSettings, job: Job, progress) -> ImageOutputs:
    """Train an image edit into the job folder (edit_image, as the command line does) and pack it."""
    import text2live
    photo = job.folder / ("input" + Path(request.photo_name).suffix.lower())
    with removed_on_user_error(job.folder):
        shutil.copyfile(request.photo, photo)
        result = text2live.edit_image(photo, request.comp_text, request.screen_text, request.src_text,
                                      request.bootstrap_text, steps=request.steps, seed=request.seed,
                                      device=request.device, overrides=image_config_keys(request, server),
                                      progress=progress, out_dir=job.folder)
    run, final = result.run_dir, result.run_dir / "final"
    stopped = result.steps < request.steps
    command = reproduce_command("image", run.name, photo.name, steps=result.steps if stopped else None)
    zip_path = zip_run(run, {photo.name: photo}, command, request.zip_checkpoints)
    curve = run / "loss_curve.png"
    return ImageOutputs(final / "composite.png", final / "edit_layer.png", final / "alpha.png",
                        final / "edit_over_green.png", curve if curve.is_file() else None, zip_path, command,
                        result.steps, stopped)


# ---- video jobs -----------------------------------------------------------------------------------

def list_atlases(folder: Path) -> list[str]:
    """Names of the atlas folders (each with its `checkpoint`) in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "checkpoint").is_file())


def atlas_folder(server: ServerSettings, name) -> Path:
    """The atlas named `name` by the page: only a name from list_atlases, never a path."""
    if not name:
        raise InputError("no atlas chosen; pick one from the list, or upload a video and train its atlas first")
    if name not in list_atlases(server.atlases):
        raise InputError(f"there is no atlas '{name}' in {server.atlases.name}/; pick one from the list")
    return server.atlases / name


def atlas_layers(folder: Path) -> list[str]:
    """The layers of an atlas that can be edited: a folder trained without masks (its
    config.yaml says masks: null) has only a background layer."""
    config = Path(folder) / "config.yaml"
    if config.is_file():
        import yaml
        try:
            saved = yaml.safe_load(config.read_text()) or {}
        except (yaml.YAMLError, OSError):
            saved = {}
        if isinstance(saved, dict) and "masks" in saved and saved["masks"] is None:
            return ["background"]
    return ["foreground", "background"]


@dataclass
class VideoRequest:
    atlas: str                   # a name from list_atlases
    layer: str                   # "foreground" or "background"
    comp_text: str | None         # None: refused with the command line's 'comp_text is empty'
    screen_text: str | None
    src_text: str | None
    bootstrap_text: str | None
    steps: int
    seed: int
    device: str
    preview_every: int
    zip_checkpoints: bool = False


def video_config_keys(request: VideoRequest, server: ServerSettings) -> dict:
    return {"log_images_freq": request.preview_every, **server.config_keys("video")}


def check_video_request(request: VideoRequest, server: ServerSettings):
    from util.config import check_video_config, load_config
    layers = atlas_layers(atlas_folder(server, request.atlas))
    if request.layer not in ("foreground", "background"):
        raise ConfigError(f"layer={request.layer!r}; use 'background' or 'foreground'")
    if request.layer not in layers:
        raise InputError(f"the atlas '{request.atlas}' was trained without object masks, so it has no foreground "
                         "layer; edit its background, or make an atlas with masks")
    keys = {"comp_text": request.comp_text, "screen_text": request.screen_text, "src_text": request.src_text,
            "bootstrap_text": request.bootstrap_text, "n_epochs": request.steps, "seed": request.seed,
            "device": request.device, "finetune_foreground": request.layer == "foreground",
            "finetune_background": request.layer == "background", **video_config_keys(request, server)}
    check_video_config(load_config("video", overrides=keys))
    check_prompt_lengths(request.comp_text, request.screen_text, request.src_text, request.bootstrap_text)


@dataclass
class VideoOutputs:
    edited: Path                 # MP4
    side_by_side: Path           # MP4: input | edit over green | output
    alpha_video: Path | None     # WebM with alpha
    atlases: list                # [(path, caption)]: the atlas before, after, and its edit layer
    loss_curve: Path | None
    zip: Path
    command: str
    steps: int
    stopped: bool


def run_video_job(request: VideoRequest, server: ServerSettings, job: Job, progress) -> VideoOutputs:
    import text2live
    with removed_on_user_error(job.folder):
        try:
            result = text2live.edit_video(atlas_folder(server, request.atlas), request.comp_text,
                                          request.screen_text, request.src_text, request.bootstrap_text,
                                          layer=request.layer, steps=request.steps, seed=request.seed,
                                          device=request.device, overrides=video_config_keys(request, server),
                                          progress=progress, out_dir=job.folder)
        except ConfigError as e:
            if "mask_alpha_threshold" not in str(e):
                raise
            # the page has no mask_alpha_threshold to lower: say what it offers
            raise InputError(f"the atlas '{request.atlas}' has no opaque foreground to edit (its foreground "
                             "layer is empty); edit its background") from None
    run, final = result.run_dir, result.run_dir / "final"
    stopped = result.steps < request.steps
    command = reproduce_command("video", run.name, steps=result.steps if stopped else None)
    zip_path = zip_run(run, {}, command, request.zip_checkpoints)
    atlases = [(final / f"{name}.png", caption) for name, caption in
               (("atlas_original", "atlas"), ("atlas_edited", "edited atlas"), ("atlas_edit_layer", "edit layer"))
               if (final / f"{name}.png").is_file()]
    webm = final / "edit_layer.webm"
    curve = run / "loss_curve.png"
    return VideoOutputs(final / "edited.mp4", final / "side_by_side.mp4", webm if webm.is_file() else None, atlases,
                        curve if curve.is_file() else None, zip_path, command, result.steps, stopped)


# ---- atlas jobs -----------------------------------------------------------------------------------

@dataclass
class AtlasRequest:
    video: Path                  # the uploaded video (checked origin)
    video_name: str
    masks: list                  # uploaded mask images (checked origin), any order
    mask_names: list
    steps: int
    size: int                    # the frames' short side
    device: str
    preview_every: int


def atlas_name(video_name: str, taken) -> str:
    """A folder name for a new atlas from the video's file name: letters, digits, - and _ only,
    made unique among `taken`."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(video_name).stem).strip("-")[:40] or "video"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def atlas_config_keys(request: AtlasRequest, server: ServerSettings) -> dict:
    return {"evaluate_every": request.preview_every, **server.config_keys("atlas")}


def check_atlas_request(request: AtlasRequest, server: ServerSettings):
    from util.config import check_nla_config, load_config
    check_video(request.video, request.video_name)
    check_masks(request.masks, request.mask_names)
    keys = {"iters_num": request.steps, "device": request.device, **atlas_config_keys(request, server)}
    check_nla_config(load_config("nla", overrides=keys))


def natural_key(name: str):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def new_atlas_folder(server: ServerSettings, video_name: str) -> Path:
    """A new, empty folder in the atlases folder, named after the video."""
    server.atlases.mkdir(parents=True, exist_ok=True)
    while True:
        folder = server.atlases / atlas_name(video_name, {p.name for p in server.atlases.iterdir()})
        try:
            folder.mkdir()
            return folder
        except FileExistsError:  # taken meanwhile by another session
            continue


def run_atlas_job(request: AtlasRequest, server: ServerSettings, job: Job, progress) -> str:
    """Train the uploaded video's atlas into the job's folder (a new folder in the atlases
    folder); returns the atlas's name. The video and masks are copied beside it, so its
    config.yaml names files that stay. A run that fails before its first checkpoint leaves no
    folder behind."""
    import text2live
    out = job.folder
    try:
        video = out / ("video" + Path(request.video_name).suffix.lower())
        shutil.copyfile(request.video, video)
        masks = None
        if request.masks:
            masks = out / "masks"
            masks.mkdir()
            order = sorted(range(len(request.masks)), key=lambda i: natural_key(request.mask_names[i]))
            for index, i in enumerate(order):  # renamed in frame order: 00000.png, 00001.png, ...
                shutil.copyfile(request.masks[i], masks / f"{index:05d}{Path(request.mask_names[i]).suffix.lower()}")
        text2live.make_atlas(video, out, masks, steps=request.steps, size=request.size, device=request.device,
                             overrides=atlas_config_keys(request, server), progress=progress)
    except BaseException:
        if not (out / "checkpoint").is_file():  # nothing usable: leave no half-made atlas in the list
            shutil.rmtree(out, ignore_errors=True)
        raise
    return out.name


def atlas_preview(atlas: Path, iteration: int) -> list:
    """The preview images atlas training saved at `iteration` (or its final ones): the
    middle frame's reconstruction beside the input, and the atlases."""
    folder = atlas / "previews" / f"iter_{iteration:06d}"
    if not folder.is_dir():
        folder = atlas / "previews" / "final"
    if not folder.is_dir():
        return []
    recon = sorted(folder.glob("reconstruction_*.png"))
    caption = "input | reconstruction"
    if (folder / "psnr.json").is_file():  # the reconstruction's PSNR, on the object and off it
        psnrs = json.loads((folder / "psnr.json").read_text())
        parts = [f"{name} {psnrs[name]:.1f} dB" for name in ("video", "object", "background")
                 if isinstance(psnrs.get(name), (int, float))]
        caption += f" ({', '.join(parts)})" if parts else ""
    return [(p, caption) for p in recon[len(recon) // 2:][:1]] + \
        [(p, p.stem.replace("_", " ")) for p in sorted(folder.glob("atlas_*.png"))]


# ---- packing a run ---------------------------------------------------------------------------------

def reproduce_command(kind: str, run_name: str, input_name: str | None = None, steps: int | None = None) -> str:
    """The command line that runs the same edit again from the unpacked zip (in the repository
    root). steps: the steps done, when Stop ended the run early."""
    script = "train_image.py" if kind == "image" else "train_video.py"
    args = ["python", script, "--config", f"{run_name}/config.yaml"]
    if input_name is not None:
        args.append(f"image_path={run_name}/{input_name}")
    if steps is not None:
        args.append(f"n_epochs={steps}")
    args.append("results_folder=results")
    return shlex.join(args)


# what a run folder holds besides its config, final images, model and loss log: in the zip only on request
ZIP_ON_REQUEST = ("checkpoints", "intermediate")


def zip_run(run: Path, extra: dict, command: str, checkpoints: bool = False) -> Path:
    """<run>.zip beside the run folder, all under <run>/: the run's config.yaml (the resolved
    config, with the seed used), final images, model, loss log and metrics, the `extra` files
    {name: path} and REPRODUCE.txt; its checkpoints/ and intermediate/ images only when
    `checkpoints` is set (they are most of a run's size)."""
    target = run.parent / f"{run.name}.zip"
    note = (f"Unpack this zip in the text2live repository and run:\n\n    {command}\n\n"
            "config.yaml holds every setting of the run, the seed included.\n")

    def wanted(path: Path) -> bool:
        return path.is_file() and (checkpoints or path.relative_to(run).parts[0] not in ZIP_ON_REQUEST)

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(run.rglob("*")):
                if wanted(path):
                    archive.write(path, f"{run.name}/{path.relative_to(run).as_posix()}")
            for name, path in extra.items():
                archive.write(path, f"{run.name}/{name}")
            archive.writestr(f"{run.name}/REPRODUCE.txt", note)
    write_atomic(write, target)  # a zip appears complete or not at all
    return target


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"

