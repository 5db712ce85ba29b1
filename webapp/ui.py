"""The Gradio page: an Image tab and a Video tab over webapp.jobs.

Runs go through Gradio's queue, one at a time (concurrency_id "training", limit 1). Run is
a chain: a quick listener counts the run on the JobBoard (each page has at most one run: its
Run buttons are disabled until it ends) and shows the page's place in the queue (refreshed by
a timer while it waits); then the run itself, a generator that starts a Job in a background
thread and yields its progress and previews, so the server never waits on training; then the
Run buttons come back. Stop sets the page's job's stop flag (the run ends at its next preview
with the result so far), or takes its run out of the queue. Files reach the page only from the
app's results and atlases folders, served as they are (not copied into Gradio's cache).
"""

import html
import inspect
import time
import traceback
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from util.errors import USER_ERRORS, InputError
from webapp import jobs
from webapp.uploads import MASK_SUFFIXES, MAX_MEGAPIXELS, VIDEO_SUFFIXES, check_origin, check_photo

TEXT_HELP = {
    "comp": "The whole edited picture, e.g. 'golden horse'. Required.",
    "screen": "The edit layer on its own, shown over a green screen, e.g. 'gold'. Optional.",
    "src": "What the input shows now, e.g. 'horse' (guides the direction of the edit). Optional.",
    "bootstrap": "The region to edit, e.g. 'horse': the early edit layer is pulled to where CLIP sees it. Optional.",
}
VIDEO_TEXT_HELP = {
    "comp": "What every frame of the edited video shows, e.g. 'a swan made of crystal' (foreground) or "
            "'a snowy lake' (background). Required.",
    "screen": "The edit layer on its own, shown over a green screen, e.g. 'crystal'. Optional.",
    "src": "What the layer shows now, e.g. 'swan' (guides the direction of the edit). Optional.",
    "bootstrap": "The region of the layer to edit, e.g. 'lake': the early edit layer is pulled to where CLIP sees "
                 "it. Optional.",
}
# Gradio's uploads (photos, videos, masks) are deleted a day after they arrive, checked every
# hour, and all of them when the app stops; the app's results are served from its own folders
# and never copied into that cache
UPLOAD_CACHE = (3600, 24 * 3600)

CSS = """
.t2l-progress { padding: 6px 2px; }
.t2l-progress progress { width: 100%; height: 14px; accent-color: #e8590c; }
.t2l-progress .t2l-line { font-size: 0.95em; margin-top: 4px; }
.t2l-progress .t2l-failed { color: #c92a2a; font-weight: 600; }
.t2l-queue { padding: 8px 12px; margin: 2px 0; border-radius: 6px; background: #fff4e6; color: #7c2d12;
             border: 1px solid #ffc078; font-weight: 600; }
.t2l-note { font-size: 0.9em; opacity: 0.85; }
.t2l-refused { color: #c92a2a; font-weight: 600; }
.t2l-result img { width: 100%; height: 100%; object-fit: contain; }  /* small previews fill their box */
/* transparency shown over a checkerboard, not over white */
.t2l-checker img, .t2l-checker video {
  background-color: #ffffff;
  background-image: conic-gradient(#d0d0d0 25%, #ffffff 0 50%, #d0d0d0 0 75%, #ffffff 0);
  background-size: 16px 16px; }
.t2l-step h3 { margin: 10px 0 0 0; }
.t2l-hidden { display: none !important; }
/* a queue note takes no room until it has something to say */
#queue-note:not(:has(.t2l-queue)), #atlas-queue-note:not(:has(.t2l-queue)), #v-queue-note:not(:has(.t2l-queue)) {
  display: none; }
"""


# ---- small pieces -------------------------------------------------------------------------------

def progress_html(report, stage: str, what: str = "step") -> str:
    """The progress bar: `report` (a jobs.Report or None before the first one) and where the
    run is ('running', 'stopping', 'stopped', 'done', or a starting message)."""
    if report is None:
        return f'<div class="t2l-progress"><progress></progress><div class="t2l-line">{stage}</div></div>'
    line = f"{what} {report.step} / {report.total} · {jobs.format_seconds(report.elapsed)} elapsed"
    if stage == "running":
        line += f" · about {jobs.format_seconds(report.eta)} left"
    elif stage == "stopping":
        line += " · stopping at the next preview…"
    else:
        line = f"{stage}: {line}"
    return (f'<div class="t2l-progress"><progress value="{report.step}" max="{report.total}"></progress>'
            f'<div class="t2l-line">{line}</div></div>')


def status_html(text: str, failed: bool = False) -> str:
    """The progress area with no run going: an empty bar and one line (what to do, or what failed)."""
    css = "t2l-line t2l-failed" if failed else "t2l-line"
    return (f'<div class="t2l-progress"><progress value="0" max="1"></progress>'
            f'<div class="{css}">{html.escape(text)}</div></div>')


def queue_html(place) -> str:
    """Where the page's run waits: `place` is JobBoard.place()'s (kind, runs ahead, runs waiting);
    nothing once it is next with nothing running (it starts in a moment)."""
    if place is None or place[1] == 0:
        return ""
    ahead = place[1]
    runs = "1 run" if ahead == 1 else f"{ahead} runs"
    return (f'<div class="t2l-queue">Waiting in the queue: {runs} ahead of yours. The server trains one run '
            'at a time; Stop takes yours out of the queue.</div>')


def failure(e: Exception) -> str:
    """The one line the page shows for a failed run: a user error's message, else the error's
    type and message (its traceback goes to the server's log); never a server path."""
    if isinstance(e, gr.Error):
        return jobs.public_message(e.message)
    if isinstance(e, USER_ERRORS):
        return jobs.public_message(e) or type(e).__name__
    traceback.print_exception(e)
    return jobs.public_message(f"the run failed: {type(e).__name__}: {e}")


def upload_path(value):
    """The server path and the user's file name of an upload as the browser sent it
    (preprocess=False: a FileData dict), or (None, None)."""
    if not value:
        return None, None
    path = value.get("path")
    return path, value.get("orig_name") or (Path(path).name if path else None)


def example_rows(folder: Path) -> list:
    """[photo, comp, screen, src, bootstrap] for each image example config whose photo is here
    (scikit-image's photos always are), the photos copied into `folder` (served by the app)."""
    import numpy as np
    import yaml
    from PIL import Image

    from util.config import CONFIG_DIR
    from util.image_io import resolve_data_path
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for config in sorted((CONFIG_DIR / "image_example_configs").glob("*.yaml")):
        example = yaml.safe_load(config.read_text())
        source, target = str(example.get("image_path", "")), folder / f"{config.stem}.jpg"
        if not target.is_file():
            try:
                if source.startswith("skimage:"):
                    import skimage.data
                    image = Image.fromarray(np.asarray(getattr(skimage.data, source.split(":", 1)[1])()))
                else:
                    image = Image.open(resolve_data_path(source))
                image.convert("RGB").save(target, quality=92)
            except (OSError, AttributeError, ValueError):
                continue  # sample data not downloaded: no example
        first = [(t[0] if isinstance(t, list) else t) or "" for t in
                 (example.get(k) for k in ("comp_text", "screen_text", "src_text", "bootstrap_text"))]
        rows.append([str(target), *first])
    return rows


def result_image(label: str, elem_id: str, transparent: bool = False) -> gr.Image:
    """An output image (a live preview while training, then the result), scaled to fill its box;
    one with transparency (the RGBA edit layer) is shown over a checkerboard."""
    return gr.Image(label=label, type="filepath", interactive=False, height=240, format="png", elem_id=elem_id,
                    elem_classes=["t2l-result", *(["t2l-checker"] if transparent else [])],
                    buttons=["download", "fullscreen"])


# ---- the page --------------------------------------------------------------------------------------

def edit_texts(prefix: str, comp_label: str, helps: dict):
    """The four text boxes of an edit (element ids prefixed for the video tab)."""
    comp = gr.Textbox(label=comp_label, info=helps["comp"], elem_id=f"{prefix}comp")
    screen = gr.Textbox(label="Edit layer alone (screen text)", info=helps["screen"], elem_id=f"{prefix}screen")
    with gr.Row():
        src = gr.Textbox(label="Input (source text)", info=helps["src"], elem_id=f"{prefix}src")
        boot = gr.Textbox(label="Region (bootstrap text)", info=helps["bootstrap"], elem_id=f"{prefix}bootstrap")
    return comp, screen, src, boot


def run_and_stop(prefix: str, label: str = "Run"):
    """A Run and a Stop button, side by side."""
    with gr.Row():
        return (gr.Button(label, variant="primary", elem_id=f"{prefix}run"),
                gr.Button("Stop", variant="stop", elem_id=f"{prefix}stop"))


def zip_choice(prefix: str) -> gr.Checkbox:
    return gr.Checkbox(False, label="Zip the checkpoints and intermediate images too",
                       info="The zip always holds the config, input, final images, model and loss log; the "
                            "checkpoints make it many times larger.", elem_id=f"{prefix}zip-checkpoints")


def cpu_note(text: str):
    return gr.Markdown(text, elem_classes="t2l-note")


def build_app(server: jobs.ServerSettings) -> gr.Blocks:
    board = jobs.JobBoard()
    devices = jobs.available_devices()
    first = jobs.defaults_for(devices[0])
    upload_roots = [get_upload_folder(), server.results]  # the only places a path from the browser may point
    # the app's outputs are served from where they are written, not copied into Gradio's cache
    gr.set_static_paths([server.results, server.atlases])

    def settings_for(device):
        d = jobs.defaults_for(device)
        return d["steps"], d["size"], d["preview_every"]

    def follow(job: jobs.Job, session: str, work, progress_out, previews, what="step"):
        """Run `work` as `job`, yielding page updates ({component: value}) while it trains;
        returns its result, or raises its error. A page closed mid-run stops the job."""
        board.begin(session, job)
        job.start(work)
        try:
            yield {progress_out: progress_html(None, "starting (loading the models)…")}
            for report in job.reports():
                stage = "stopping" if job.stopped else "running"
                if report is None:  # no news: the time passing
                    now = job.now()
                    waited = jobs.format_seconds(time.monotonic() - job.started)
                    yield {progress_out: progress_html(now, stage, what) if now else
                           progress_html(None, f"starting (loading the models)… {waited}")}
                    continue
                yield {progress_out: progress_html(report, stage, what), **previews(report)}
        finally:
            if job.error is None and job.result is None:
                job.stop()  # the page went away (the generator was closed) before the run ended
        if job.error is not None:
            raise job.error
        return job.result

    def with_request(fn, like):
        """fn(*values, request) given the parameters Gradio matches inputs to: those of `like`,
        then the request (Gradio passes it last, where this signature says)."""
        params = list(inspect.signature(like).parameters.values())
        fn.__signature__ = inspect.Signature(
            [*params, inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request)])
        fn.__annotations__ = {"request": gr.Request}
        return fn

    run_buttons = []   # every Run of the page: disabled while the page has a run
    queue_notes = {}   # kind -> the note that shows the page's place in the queue
    showing_place = set()  # sessions whose page shows its place in the queue
    refusals = {}      # session -> why its Run was refused (shown on the progress line)

    def buttons_for(session: str) -> list:
        return [gr.Button(interactive=not board.busy(session)) for _ in run_buttons]

    def notes_for(session: str) -> list:
        place = board.place(session)
        if place is None:
            showing_place.discard(session)
            return ["" for _ in queue_notes]
        showing_place.add(session)
        return [queue_html(place) if place[0] == kind else "" for kind in queue_notes]

    def submit(kind, make_request):
        """Run's first listener: the request checked as the run will check it (so a refusal comes
        at once, not after the queue), then counted: the run joins the queue, or is ignored when
        the page has a run already. A refusal stops the chain (the run is not queued)."""
        def submitted(*values):
            *values, request = values
            session = request.session_hash
            try:
                make_request(*values)
            except Exception as e:
                refusals[session] = failure(e)
                raise gr.Error(refusals[session], duration=None, print_exception=False) from None
            board.submit(session, kind)
            return [*buttons_for(session), gr.Timer(active=True), *notes_for(session)]
        return with_request(submitted, make_request)

    def refused(request: gr.Request):  # after a refused Run: the reason on the progress line
        return status_html(f"refused: {refusals.pop(request.session_hash, 'see the message')}", failed=True)

    def run_with(make_request, work, progress_out):
        """A run as the page calls it, when it leaves the queue: ignored unless it is the page's
        counted run; the request made (and checked) again, then `work(request, session)`
        yields the page's updates; any failure shown on its progress line (the same line as the
        message that pops up); the page free to run again after."""
        def run(*values):
            *values, request = values
            session = request.session_hash
            if not board.starting(session):
                return  # not this page's run (pressed while it had one, or taken out of the queue)
            try:
                yield from work(make_request(*values), session)
            except Exception as e:
                message = failure(e)
                yield {progress_out: status_html(f"failed: {message}", failed=True)}
                raise gr.Error(message, duration=None, print_exception=False) from None
            finally:
                board.finished(session)
        return with_request(run, make_request)

    def tick(request: gr.Request):  # while the page's run waits: its place in the queue
        session = request.session_hash
        shown = session in showing_place
        waiting = board.place(session) is not None
        notes = notes_for(session) if waiting or shown else [gr.skip() for _ in queue_notes]
        return [gr.Timer(active=waiting), *notes]

    def release(request: gr.Request):  # after a run: Run can be pressed again
        return buttons_for(request.session_hash)

    taken_out_kind = {}  # session -> the kind of its run Stop took out of the queue

    def stop(request: gr.Request):
        """Stop: the page's running job stops at its next preview; a run still waiting is taken
        out of the queue (the next listener cancels it there); on an idle page, nothing."""
        place = board.place(request.session_hash)
        if board.stop(request.session_hash) != "waiting":
            raise gr.Error("nothing waits in the queue", visible=False, print_exception=False)
        taken_out_kind[request.session_hash] = place[0] if place else None

    def edit_fields(comp_text, screen_text, src_text, boot_text, n_steps, seed_value, device_name, every,
                    zip_all) -> dict:
        """What an image and a video request share, from the page's values (checked as the CLI does)."""
        return {"comp_text": jobs.optional_text(comp_text), "screen_text": jobs.optional_text(screen_text),
                "src_text": jobs.optional_text(src_text), "bootstrap_text": jobs.optional_text(boot_text),
                "steps": jobs.whole_number(n_steps, "steps", 1, jobs.MAX_STEPS),
                "seed": jobs.whole_number(seed_value, "seed", -1, 2**32 - 1),
                "device": device_name if device_name in devices else devices[0],
                "preview_every": jobs.whole_number(every, "preview every", 1), "zip_checkpoints": bool(zip_all)}

    with gr.Blocks(title="Text2LIVE", delete_cache=UPLOAD_CACHE) as app:
        gr.Markdown("# Text2LIVE\nType what the picture should become; a small network learns an **edit layer** "
                    "(colour + opacity) for your photo or video, while you watch. Each run trains from scratch.")
        queue_timer = gr.Timer(1.0, active=False)

        # ---- Image tab ----
        with gr.Tab("Image", id="image"):
            if devices[0] == "cpu":
                cpu_note(f"Running on the **CPU**: a training step takes seconds, so the defaults are small "
                         f"({first['steps']} steps at {first['size']} px): on a 2-core CPU the first preview comes "
                         "after about a minute and the result after about ten. A GPU runs 1000 steps at 512 px in "
                         "about two minutes (H200).")
            with gr.Row():
                with gr.Column(scale=2, min_width=320):
                    photo = gr.Image(label=f"Photo (JPEG, PNG, WebP…, up to {MAX_MEGAPIXELS} megapixels)",
                                     type="filepath", image_mode=None, sources=["upload", "clipboard"], height=260,
                                     elem_id="photo")
                    photo_note = gr.Markdown("", elem_id="photo-note")
                    comp, screen, src, boot = edit_texts("", "Edited picture (comp text)", TEXT_HELP)
                    with gr.Row():
                        steps = gr.Number(label="Steps", value=first["steps"], precision=0, minimum=1,
                                          maximum=jobs.MAX_STEPS, elem_id="steps")
                        size = gr.Number(label="Size (short side, px)", value=first["size"], precision=0,
                                         minimum=32, maximum=2048, elem_id="size")
                        seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed",
                                         info="-1: a new one each run")
                    with gr.Row():
                        device = gr.Dropdown(devices, value=devices[0], label="Device", elem_id="device")
                        preview_every = gr.Number(label="Preview every N steps", value=first["preview_every"],
                                                  precision=0, minimum=1, elem_id="preview-every")
                    zip_all = zip_choice("")
                    run, stop_button = run_and_stop("")
                with gr.Column(scale=3, min_width=400):
                    queue_notes["image"] = gr.HTML("", elem_id="queue-note")
                    progress = gr.HTML(status_html("Upload a photo, type the texts and press Run."),
                                       elem_id="progress")
                    with gr.Row():
                        composite = result_image("Composite", "composite")
                        layer = result_image("Edit layer (RGBA)", "edit-layer", transparent=True)
                    with gr.Row():
                        green = result_image("Edit over green", "edit-over-green")
                        alpha = result_image("Alpha", "alpha")
                    with gr.Column(visible=False) as results_box:  # shown when a run has ended
                        loss_plot = gr.Image(label="Losses", type="filepath", interactive=False, height=220,
                                             elem_id="loss-plot")
                        downloads = gr.File(label="Downloads (each PNG and the run as a zip)",
                                            file_count="multiple", interactive=False, elem_id="downloads")
                        command = gr.Code(label="Run it again from the command line (unzip in the repository first)",
                                          language="shell", interactive=False, lines=1, wrap_lines=True,
                                          elem_id="command")
            examples = example_rows(server.results / "examples")
            if examples:
                gr.Examples(examples, [photo, comp, screen, src, boot], label="Examples (fill in every field)")

        def check_upload(value):
            """A new photo (uploaded or an example's): its size under it, or, for a file that cannot
            be edited, the reason, and the photo taken away again."""
            path, name = upload_path(value)
            if path is None:
                return gr.update(), gr.update()  # cleared: a refusal's message stays
            try:
                width, height = check_photo(check_origin(path, upload_roots), name)
            except Exception as e:  # a user error's line, or any other failure named in one line
                message = failure(e)
                gr.Warning(message)
                return None, f'<span class="t2l-refused">{html.escape(message)}</span>'
            return gr.update(), html.escape(f"{name}: {width}×{height}")

        photo.change(check_upload, photo, [photo, photo_note], preprocess=False, concurrency_limit=None)
        device.change(settings_for, device, [steps, size, preview_every], queue=False)

        def image_request(photo_value, comp_text, screen_text, src_text, boot_text, n_steps, short_side, seed_value,
                          device_name, every, zip_checkpoints):
            path, name = upload_path(photo_value)
            if path is None:
                raise InputError("no photo; upload one (or pick an example) first")
            req = jobs.ImageRequest(
                photo=check_origin(path, upload_roots), photo_name=name,
                size=jobs.whole_number(short_side, "size", 32, 2048),
                **edit_fields(comp_text, screen_text, src_text, boot_text, n_steps, seed_value, device_name, every,
                              zip_checkpoints))
            jobs.check_image_request(req, server)
            return req

        def image_run(req, session):
            job = jobs.Job(jobs.new_job_folder(server.results, "image"))

            def previews(report):
                folder = jobs.snapshot_folder(job.folder, report.step)
                if folder is None:
                    return {}
                return {composite: str(folder / "composite.png"), layer: str(folder / "edit_layer.png"),
                        green: str(folder / "edit_over_green.png"), alpha: str(folder / "alpha.png")}

            out = yield from follow(job, session, lambda p: jobs.run_image_job(req, server, job, p), progress,
                                    previews)
            report = jobs.Report(out.steps, req.steps, time.monotonic() - job.started, 0.0)
            yield {progress: progress_html(report, "stopped" if out.stopped else "done"),
                   composite: str(out.composite), layer: str(out.edit_layer), green: str(out.edit_over_green),
                   alpha: str(out.alpha), loss_plot: str(out.loss_curve) if out.loss_curve else None,
                   downloads: [str(p) for p in (out.composite, out.edit_layer, out.edit_over_green, out.alpha,
                                                out.zip)],
                   command: out.command, results_box: gr.Column(visible=True)}

        run_buttons.append(run)
        image_run_inputs = [photo, comp, screen, src, boot, steps, size, seed, device, preview_every, zip_all]
        image_run_outputs = [progress, composite, layer, green, alpha, loss_plot, downloads, command, results_box]

        # ---- Video tab ----
        atlas_names = jobs.list_atlases(server.atlases)
        with gr.Tab("Video", id="video"):
            if devices[0] == "cpu":
                gpu = jobs.GPU_DEFAULTS
                cpu_note(f"Running on the **CPU**, so the video defaults are small too: an atlas of "
                         f"{first['atlas_steps']} steps at {first['atlas_size']} px (the short side; a few minutes "
                         f"on 2 cores, plus the optical flow first) and an edit of {first['video_steps']} steps with "
                         f"a preview every {first['video_preview_every']}. An edit step trains on three frames and "
                         "the atlas, so it takes longer than an image step. On a GPU the defaults are "
                         f"{gpu['atlas_steps']} atlas steps at {gpu['atlas_size']} px and {gpu['video_steps']} "
                         "edit steps.")
            with gr.Group(elem_classes="t2l-step"):
                gr.Markdown("### 1. An atlas")
            with gr.Row():
                with gr.Column(scale=2, min_width=320):
                    atlas = gr.Dropdown(atlas_names, value=atlas_names[0] if atlas_names else None,
                                        label=f"Atlas (in {server.atlases.name}/)", elem_id="atlas",
                                        info="A video's Neural Layered Atlas; edits are painted on it, so they "
                                             "stay put on every frame. Pick one, or make one below.")
                    with gr.Accordion("Make an atlas from your own video", open=not atlas_names):
                        video_file = gr.File(label="Video (MP4, MOV, WebM, AVI, MKV)", file_types=list(VIDEO_SUFFIXES),
                                             elem_id="video-file")
                        masks = gr.File(label="Object masks, one image per frame (optional; white = object; "
                                              "without masks the atlas has only a background layer)",
                                        file_count="multiple", file_types=list(MASK_SUFFIXES), height=160,
                                        elem_id="masks")
                        with gr.Row():
                            atlas_steps = gr.Number(label="Atlas steps", value=first["atlas_steps"], precision=0,
                                                    minimum=1, maximum=jobs.MAX_ATLAS_STEPS, elem_id="atlas-steps")
                            atlas_size = gr.Number(label="Size (short side, px)", value=first["atlas_size"],
                                                   precision=0, minimum=16, maximum=1080, elem_id="atlas-size")
                            a_device = gr.Dropdown(devices, value=devices[0], label="Device", elem_id="a-device")
                        train_atlas, stop_atlas = run_and_stop("atlas-", "Train atlas")
                with gr.Column(scale=3, min_width=400):
                    queue_notes["atlas"] = gr.HTML("", elem_id="atlas-queue-note")
                    atlas_progress = gr.HTML(status_html("Pick an atlas, or upload a video and press Train atlas."),
                                             elem_id="atlas-progress")
                    atlas_gallery = gr.Gallery(label="The atlas: a middle frame (input | reconstruction) and its "
                                                     "layers", columns=3, height=240, format="png",
                                               elem_id="atlas-preview", elem_classes="t2l-checker")
            with gr.Group(elem_classes="t2l-step"):
                gr.Markdown("### 2. The edit")
            with gr.Row():
                with gr.Column(scale=2, min_width=320):
                    video_layer = gr.Radio(["foreground", "background"], value="foreground", label="Layer to edit",
                                           info="foreground: the masked object; background: everything else",
                                           elem_id="layer")
                    v_comp, v_screen, v_src, v_boot = edit_texts("v-", "Edited video (comp text)", VIDEO_TEXT_HELP)
                    with gr.Row():
                        v_steps = gr.Number(label="Steps", value=first["video_steps"], precision=0, minimum=1,
                                            maximum=jobs.MAX_STEPS, elem_id="v-steps")
                        v_seed = gr.Number(label="Seed", value=0, precision=0, elem_id="v-seed")
                    with gr.Row():
                        v_device = gr.Dropdown(devices, value=devices[0], label="Device", elem_id="v-device")
                        v_every = gr.Number(label="Preview every N steps", value=first["video_preview_every"],
                                            precision=0, minimum=1, elem_id="v-preview-every")
                    v_zip_all = zip_choice("v-")
                    v_run, v_stop = run_and_stop("v-")
                with gr.Column(scale=3, min_width=400):
                    queue_notes["video"] = gr.HTML("", elem_id="v-queue-note")
                    v_progress = gr.HTML(status_html("Choose an atlas, type the texts and press Run."),
                                         elem_id="v-progress")
                    v_preview = gr.Image(label="Preview: the middle frame", type="filepath", interactive=False,
                                         height=240, elem_id="v-preview", elem_classes="t2l-result")
                    with gr.Column(visible=False) as v_results_box:  # shown when a run has ended
                        with gr.Row():
                            edited = gr.Video(label="Edited video", interactive=False, height=220, loop=True,
                                              elem_id="edited-video")
                            side = gr.Video(label="Input | edit over green | output", interactive=False,
                                            height=220, loop=True, elem_id="side-by-side")
                            alpha_video = gr.Video(label="Edit layer with alpha (WebM)", interactive=False,
                                                   height=220, loop=True, elem_id="alpha-video",
                                                   elem_classes="t2l-checker")
                        atlases_out = gr.Gallery(label="Atlas, edited atlas, edit layer", columns=3, height=220,
                                                 format="png", elem_id="atlases", elem_classes="t2l-checker")
                        v_loss = gr.Image(label="Losses", type="filepath", interactive=False, height=200,
                                          elem_id="v-loss-plot")
                        v_downloads = gr.File(label="Downloads (videos, atlases and the run as a zip)",
                                              file_count="multiple", interactive=False, elem_id="v-downloads")
                        v_command = gr.Code(label="Run it again from the command line (unzip in the repository "
                                            "first)", language="shell", interactive=False, lines=1,
                                            wrap_lines=True, elem_id="v-command")

        def atlas_request(video_value, mask_values, n_steps, short_side, device_name):
            path, name = upload_path(video_value)
            if path is None:
                raise InputError("no video; upload one first")
            mask_files = [upload_path(v) for v in (mask_values or [])]
            steps_wanted = jobs.whole_number(n_steps, "atlas steps", 1, jobs.MAX_ATLAS_STEPS)
            req = jobs.AtlasRequest(
                video=check_origin(path, upload_roots), video_name=name,
                masks=[check_origin(p, upload_roots) for p, _ in mask_files], mask_names=[n for _, n in mask_files],
                steps=steps_wanted, size=jobs.whole_number(short_side, "size", 16, 1080),
                device=device_name if device_name in devices else devices[0], preview_every=max(1, steps_wanted // 10))
            jobs.check_atlas_request(req, server)
            return req

        def atlas_run(req, session):
            job = jobs.Job(jobs.new_atlas_folder(server, req.video_name))

            def previews(report):
                return {atlas_gallery: [(str(p), c) for p, c in jobs.atlas_preview(job.folder, report.step)]}

            name = yield from follow(job, session, lambda p: jobs.run_atlas_job(req, server, job, p),
                                     atlas_progress, previews, what="atlas step")
            done = job.last.step if job.last and job.stopped else req.steps
            report = jobs.Report(done, req.steps, time.monotonic() - job.started, 0.0)
            yield {atlas_progress: progress_html(report, f"atlas '{name}' " + ("stopped" if job.stopped else "done"),
                                                 "atlas step"),
                   atlas_gallery: [(str(p), c) for p, c in jobs.atlas_preview(job.folder, -1)],
                   atlas: gr.update(choices=jobs.list_atlases(server.atlases), value=name)}

        run_buttons.append(train_atlas)
        atlas_run_inputs = [video_file, masks, atlas_steps, atlas_size, a_device]
        atlas_run_outputs = [atlas_progress, atlas_gallery, atlas]

        def video_request(atlas_name, layer_name, comp_text, screen_text, src_text, boot_text, n_steps, seed_value,
                          device_name, every, zip_checkpoints):
            req = jobs.VideoRequest(
                atlas=atlas_name, layer=layer_name,
                **edit_fields(comp_text, screen_text, src_text, boot_text, n_steps, seed_value, device_name, every,
                              zip_checkpoints))
            jobs.check_video_request(req, server)
            return req

        def video_run(req, session):
            job = jobs.Job(jobs.new_job_folder(server.results, "video"))

            def previews(report):
                folder = jobs.snapshot_folder(job.folder, report.step)
                frames = sorted(folder.glob("frame_*.png")) if folder else []
                return {v_preview: str(frames[0])} if frames else {}

            out = yield from follow(job, session, lambda p: jobs.run_video_job(req, server, job, p), v_progress,
                                    previews)
            report = jobs.Report(out.steps, req.steps, time.monotonic() - job.started, 0.0)
            files = [out.edited, out.side_by_side, *([out.alpha_video] if out.alpha_video else []),
                     *(p for p, _ in out.atlases), out.zip]
            yield {v_progress: progress_html(report, "stopped" if out.stopped else "done"),
                   edited: str(out.edited), side: str(out.side_by_side),
                   alpha_video: str(out.alpha_video) if out.alpha_video else None,
                   atlases_out: [(str(p), c) for p, c in out.atlases],
                   v_loss: str(out.loss_curve) if out.loss_curve else None,
                   v_downloads: [str(p) for p in files], v_command: out.command,
                   v_results_box: gr.Column(visible=True)}

        run_buttons.append(v_run)
        video_run_inputs = [atlas, video_layer, v_comp, v_screen, v_src, v_boot, v_steps, v_seed, v_device, v_every,
                            v_zip_all]
        video_run_outputs = [v_progress, v_preview, edited, side, alpha_video, atlases_out, v_loss, v_downloads,
                             v_command, v_results_box]

        # ---- Run and Stop, the same for the three runs ----
        notes = list(queue_notes.values())
        runs = {}  # kind -> the run's event (Stop cancels it while it waits)
        for kind, button, make_request, work, inputs, outputs in (
                ("image", run, image_request, image_run, image_run_inputs, image_run_outputs),
                ("atlas", train_atlas, atlas_request, atlas_run, atlas_run_inputs, atlas_run_outputs),
                ("video", v_run, video_request, video_run, video_run_inputs, video_run_outputs)):
            counted = button.click(submit(kind, make_request), inputs, [*run_buttons, queue_timer, *notes],
                                   preprocess=False, concurrency_limit=None, show_progress="hidden")
            counted.failure(refused, None, outputs[0], concurrency_limit=None, show_progress="hidden")
            runs[kind] = counted.success(run_with(make_request, work, outputs[0]), inputs, outputs, preprocess=False,
                                         concurrency_id="training", concurrency_limit=1, show_progress="minimal",
                                         show_progress_on=[outputs[0]])
            runs[kind].then(release, None, run_buttons, concurrency_limit=None, show_progress="hidden")
        def taken_out(request: gr.Request):  # Stop's second listener, only after a run was taken out of the queue
            session = request.session_hash
            kind = taken_out_kind.pop(session, None)
            showing_place.discard(session)
            said = ('<div class="t2l-queue">Stopped while waiting in the queue: your run will not start.</div>')
            return [*buttons_for(session), *(said if k == kind else "" for k in queue_notes), gr.Timer(active=False)]

        # Gradio cancels a queued event from a listener of its own: this hidden button's, clicked by
        # Stop's second listener (so a running run is never cancelled, only stopped cleanly)
        cancel_waiting = gr.Button("cancel", elem_id="cancel-waiting", elem_classes="t2l-hidden")
        cancel_waiting.click(None, None, None, cancels=list(runs.values()))
        for button in (stop_button, stop_atlas, v_stop):
            button.click(stop, None, None, concurrency_limit=None).success(
                taken_out, None, [*run_buttons, *notes, queue_timer], concurrency_limit=None,
                js="() => { document.querySelector('#cancel-waiting')?.click(); }")
        queue_timer.tick(tick, None, [queue_timer, *notes], concurrency_limit=None, show_progress="hidden")

        def atlas_chosen(name):
            """A picked atlas: its preview, and the layers it has (background only without masks)."""
            if not name or name not in jobs.list_atlases(server.atlases):
                return [], gr.Radio()
            folder = server.atlases / name
            layers = jobs.atlas_layers(folder)
            info = ("foreground: the masked object; background: everything else" if len(layers) == 2 else
                    "this atlas was trained without object masks: it has only a background layer")
            return ([(str(p), c) for p, c in jobs.atlas_preview(folder, -1)],
                    gr.Radio(choices=layers, value=layers[0] if len(layers) == 1 else "foreground", info=info))

        atlas.change(atlas_chosen, atlas, [atlas_gallery, video_layer], concurrency_limit=None)
        a_device.change(lambda d: (jobs.defaults_for(d)["atlas_steps"], jobs.defaults_for(d)["atlas_size"]),
                        a_device, [atlas_steps, atlas_size], queue=False)
        v_device.change(lambda d: (jobs.defaults_for(d)["video_steps"], jobs.defaults_for(d)["video_preview_every"]),
                        v_device, [v_steps, v_every], queue=False)

        def refresh_atlases():  # atlases trained since the app started (by any page) are offered too
            names = jobs.list_atlases(server.atlases)
            return gr.Dropdown(choices=names, value=names[0] if names else None)

        app.load(refresh_atlases, None, atlas, concurrency_limit=None)

        def page_closed(request: gr.Request):  # its place in the queue is given up, its run stops
            board.forget(request.session_hash)
            for per_session in (taken_out_kind, refusals):
                per_session.pop(request.session_hash, None)
            showing_place.discard(request.session_hash)

        app.unload(page_closed)
    return app


def launch(app: gr.Blocks, server: jobs.ServerSettings, host: str = "127.0.0.1", port: int = 7860,
           share: bool = False, **kwargs):
    """Serve the page: files only from the results and atlases folders (the app's own outputs),
    uploads up to the size limit."""
    from webapp.uploads import MAX_UPLOAD_MB
    app.queue(default_concurrency_limit=1)
    return app.launch(server_name=host, server_port=port, share=share,
                      allowed_paths=[str(server.results), str(server.atlases)],
                      max_file_size=f"{MAX_UPLOAD_MB}mb", css=CSS, theme=gr.themes.Soft(primary_hue="orange"), **kwargs)
