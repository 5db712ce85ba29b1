"""The Gradio page: an Image tab and a Video tab over webapp.jobs.

Runs go through Gradio's queue, one at a time (concurrency_id "training", limit 1), so other
users see their place in the queue; each handler is a generator that starts a Job in a
background thread and yields its progress and previews, so the server never waits on
training. Stop sets the session's job's stop flag; the run ends at its next preview with the
result so far. Files reach the page only from the app's results folder.
"""

import html
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

CSS = """
.t2l-progress { padding: 6px 2px; }
.t2l-progress progress { width: 100%; height: 14px; accent-color: #e8590c; }
.t2l-progress .t2l-line { font-size: 0.95em; margin-top: 4px; }
.t2l-note { font-size: 0.9em; opacity: 0.85; }
.t2l-refused { color: #c92a2a; font-weight: 600; }
.t2l-result img { width: 100%; height: 100%; object-fit: contain; }  /* small previews fill their box */
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


def upload_path(value):
    """The server path and the user's file name of an upload as the browser sent it
    (preprocess=False: a FileData dict), or (None, None)."""
    if not value:
        return None, None
    path = value.get("path")
    return path, value.get("orig_name") or (Path(path).name if path else None)


def user_error(e: Exception) -> gr.Error:
    """The one-line message of a user error, shown until the user closes it."""
    return gr.Error(str(e).splitlines()[0] if str(e) else type(e).__name__, duration=None, print_exception=False)


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


def result_image(label: str, elem_id: str) -> gr.Image:
    """An output image (a live preview while training, then the result), scaled to fill its box."""
    return gr.Image(label=label, type="filepath", interactive=False, height=240, format="png", elem_id=elem_id,
                    elem_classes="t2l-result", buttons=["download", "fullscreen"])


# ---- the page --------------------------------------------------------------------------------------

def edit_texts(prefix: str, comp_label: str):
    """The four text boxes of an edit (element ids prefixed for the video tab)."""
    comp = gr.Textbox(label=comp_label, info=TEXT_HELP["comp"], elem_id=f"{prefix}comp")
    screen = gr.Textbox(label="Edit layer alone (screen text)", info=TEXT_HELP["screen"], elem_id=f"{prefix}screen")
    with gr.Row():
        src = gr.Textbox(label="Input (source text)", info=TEXT_HELP["src"], elem_id=f"{prefix}src")
        boot = gr.Textbox(label="Region (bootstrap text)", info=TEXT_HELP["bootstrap"], elem_id=f"{prefix}bootstrap")
    return comp, screen, src, boot


def run_and_stop(prefix: str):
    """A tab's Run and Stop buttons, side by side."""
    with gr.Row():
        return (gr.Button("Run", variant="primary", elem_id=f"{prefix}run"),
                gr.Button("Stop", variant="stop", elem_id=f"{prefix}stop"))


def build_app(server: jobs.ServerSettings) -> gr.Blocks:
    board = jobs.JobBoard()
    devices = jobs.available_devices()
    first = jobs.defaults_for(devices[0])
    upload_roots = [get_upload_folder(), server.results]  # the only places a path from the browser may point

    def settings_for(device):
        d = jobs.defaults_for(device)
        return d["steps"], d["size"], d["preview_every"]

    def follow(job: jobs.Job, session: str, work, progress_out, previews, what="step"):
        """Run `work` as `job`, yielding page updates ({component: value}) while it trains;
        returns its result. A page closed mid-run stops the job."""
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
            board.end(session, job)
        if isinstance(job.error, USER_ERRORS):
            raise user_error(job.error)
        if job.error is not None:
            traceback.print_exception(job.error)
            raise gr.Error(f"the run failed: {type(job.error).__name__}: {job.error}", duration=None,
                           print_exception=False)
        return job.result

    def stop(request: gr.Request):
        stopped = board.stop(request.session_hash)
        if stopped is None:
            gr.Info("Nothing is running in this page.")
        elif stopped == "waiting":
            gr.Info("Your run was waiting in the queue: it will not start.")

    def submitted(request: gr.Request):  # the Run button's first listener: a run joins the queue
        board.submitted(request.session_hash)

    def cancelled_while_waiting(request: gr.Request) -> bool:
        return not board.starting(request.session_hash)

    def edit_fields(comp_text, screen_text, src_text, boot_text, n_steps, seed_value, device_name, every) -> dict:
        """What an image and a video request share, from the page's values (checked as the CLI does)."""
        return dict(comp_text=jobs.optional_text(comp_text), screen_text=jobs.optional_text(screen_text),
                    src_text=jobs.optional_text(src_text), bootstrap_text=jobs.optional_text(boot_text),
                    steps=jobs.whole_number(n_steps, "steps", 1), seed=jobs.whole_number(seed_value, "seed", -1),
                    device=device_name if device_name in devices else devices[0],
                    preview_every=jobs.whole_number(every, "preview every", 1))

    with gr.Blocks(title="Text2LIVE") as app:
        gr.Markdown("# Text2LIVE\nType what the picture should become; a small network learns an **edit layer** "
                    "(colour + opacity) for your photo or video, while you watch. Each run trains from scratch.")
        if devices[0] == "cpu":
            gr.Markdown(f"Running on the **CPU**: a training step takes seconds, so the defaults are small "
                        f"({first['steps']} steps at {first['size']} px): on a 2-core CPU the first preview "
                        "comes after about a minute and the result after about ten. A GPU runs 1000 steps at "
                        "512 px in about two minutes (H200).", elem_classes="t2l-note")

        # ---- Image tab ----
        with gr.Tab("Image", id="image"):
            with gr.Row():
                with gr.Column(scale=2, min_width=320):
                    photo = gr.Image(label=f"Photo (JPEG, PNG, WebP…, up to {MAX_MEGAPIXELS} megapixels)",
                                     type="filepath", image_mode=None, sources=["upload", "clipboard"], height=260,
                                     elem_id="photo")
                    photo_note = gr.Markdown("", elem_id="photo-note")
                    comp, screen, src, boot = edit_texts("", "Edited picture (comp text)")
                    with gr.Row():
                        steps = gr.Number(label="Steps", value=first["steps"], precision=0, minimum=1,
                                          elem_id="steps")
                        size = gr.Number(label="Size (short side, px)", value=first["size"], precision=0,
                                         minimum=32, maximum=2048, elem_id="size")
                        seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed",
                                         info="-1: a new one each run")
                    with gr.Row():
                        device = gr.Dropdown(devices, value=devices[0], label="Device", elem_id="device")
                        preview_every = gr.Number(label="Preview every N steps", value=first["preview_every"],
                                                  precision=0, minimum=1, elem_id="preview-every")
                    run, stop_button = run_and_stop("")
                with gr.Column(scale=3, min_width=400):
                    progress = gr.HTML(progress_html(None, "Upload a photo, type the texts and press Run."),
                                       elem_id="progress")
                    with gr.Row():
                        composite = result_image("Composite", "composite")
                        layer = result_image("Edit layer (RGBA)", "edit-layer")
                    with gr.Row():
                        green = result_image("Edit over green", "edit-over-green")
                        alpha = result_image("Alpha", "alpha")
                    with gr.Column(visible=False) as results_box:  # shown when a run has ended
                        loss_plot = gr.Image(label="Losses", type="filepath", interactive=False, height=220,
                                             elem_id="loss-plot")
                        downloads = gr.File(label="Downloads (each PNG and the whole run as a zip)",
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
            except USER_ERRORS as e:
                gr.Warning(str(e))
                return None, f'<span class="t2l-refused">{html.escape(str(e))}</span>'
            return gr.update(), html.escape(f"{name}: {width}×{height}")

        photo.change(check_upload, photo, [photo, photo_note], preprocess=False, concurrency_limit=None)
        device.change(settings_for, device, [steps, size, preview_every], queue=False)

        def run_image(photo_value, comp_text, screen_text, src_text, boot_text, n_steps, short_side, seed_value,
                      device_name, every, request: gr.Request):
            if cancelled_while_waiting(request):
                yield {progress: progress_html(None, "stopped while waiting in the queue")}
                return
            try:
                path, name = upload_path(photo_value)
                if path is None:
                    raise InputError("no photo; upload one (or pick an example) first")
                req = jobs.ImageRequest(
                    photo=check_origin(path, upload_roots), photo_name=name,
                    size=jobs.whole_number(short_side, "size", 32, 2048),
                    **edit_fields(comp_text, screen_text, src_text, boot_text, n_steps, seed_value, device_name, every))
                jobs.check_image_request(req, server)
            except USER_ERRORS as e:
                raise user_error(e)
            job = jobs.Job(jobs.new_job_folder(server.results, "image"))

            def previews(report):
                folder = jobs.snapshot_folder(job.folder, report.step)
                if folder is None:
                    return {}
                return {composite: str(folder / "composite.png"), layer: str(folder / "edit_layer.png"),
                        green: str(folder / "edit_over_green.png"), alpha: str(folder / "alpha.png")}

            out = yield from follow(job, request.session_hash,
                                    lambda p: jobs.run_image_job(req, server, job, p), progress, previews)
            report = jobs.Report(out.steps, req.steps, time.monotonic() - job.started, 0.0)
            yield {progress: progress_html(report, "stopped" if out.stopped else "done"),
                   composite: str(out.composite), layer: str(out.edit_layer), green: str(out.edit_over_green),
                   alpha: str(out.alpha), loss_plot: str(out.loss_curve) if out.loss_curve else None,
                   downloads: [str(p) for p in (out.composite, out.edit_layer, out.edit_over_green, out.alpha,
                                                out.zip)],
                   command: out.command, results_box: gr.Column(visible=True)}

        # counted before the run joins the queue (a button's listeners run one after another)
        run.click(submitted, None, None, concurrency_limit=None, show_progress="hidden")
        run.click(run_image, [photo, comp, screen, src, boot, steps, size, seed, device, preview_every],
                  [progress, composite, layer, green, alpha, loss_plot, downloads, command, results_box],
                  preprocess=False,
                  concurrency_id="training", concurrency_limit=1, show_progress="minimal",
                  show_progress_on=[progress])
        stop_button.click(stop, None, None, concurrency_limit=None)

        # ---- Video tab ----
        atlas_names = jobs.list_atlases(server.atlases)
        with gr.Tab("Video", id="video"):
            with gr.Row():
                with gr.Column(scale=2, min_width=320):
                    atlas = gr.Dropdown(atlas_names, value=atlas_names[0] if atlas_names else None,
                                        label=f"Atlas (in {server.atlases.name}/)", elem_id="atlas",
                                        info="A video's Neural Layered Atlas; edits are painted on it, so they "
                                             "stay put on every frame.")
                    with gr.Accordion("Make an atlas from your own video", open=not atlas_names):
                        video_file = gr.File(label="Video (MP4, MOV, WebM…)", file_types=list(VIDEO_SUFFIXES),
                                             elem_id="video-file")
                        masks = gr.File(label="Object masks, one image per frame (optional; white = object)",
                                        file_count="multiple", file_types=list(MASK_SUFFIXES), height=160,
                                        elem_id="masks")
                        with gr.Row():
                            atlas_steps = gr.Number(label="Atlas steps", value=first["atlas_steps"], precision=0,
                                                    minimum=1, elem_id="atlas-steps")
                            atlas_size = gr.Number(label="Size (short side, px)", value=first["atlas_size"],
                                                   precision=0, minimum=16, maximum=1080, elem_id="atlas-size")
                        with gr.Row():
                            train_atlas = gr.Button("Train atlas", variant="primary", elem_id="train-atlas")
                            stop_atlas = gr.Button("Stop", variant="stop", elem_id="stop-atlas")
                        atlas_progress = gr.HTML("", elem_id="atlas-progress")
                        atlas_gallery = gr.Gallery(label="Atlas training preview", columns=3, height=200,
                                                   format="png", elem_id="atlas-preview")
                    video_layer = gr.Radio(["foreground", "background"], value="foreground", label="Layer to edit",
                                           info="foreground: the masked object; background: everything else",
                                           elem_id="layer")
                    v_comp, v_screen, v_src, v_boot = edit_texts("v-", "Edited video (comp text)")
                    with gr.Row():
                        v_steps = gr.Number(label="Steps", value=first["video_steps"], precision=0, minimum=1,
                                            elem_id="v-steps")
                        v_seed = gr.Number(label="Seed", value=0, precision=0, elem_id="v-seed")
                        v_device = gr.Dropdown(devices, value=devices[0], label="Device", elem_id="v-device")
                        v_every = gr.Number(label="Preview every N steps", value=first["video_preview_every"],
                                            precision=0, minimum=1, elem_id="v-preview-every")
                    v_run, v_stop = run_and_stop("v-")
                with gr.Column(scale=3, min_width=400):
                    v_progress = gr.HTML(progress_html(None, "Choose an atlas, type the texts and press Run."),
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
                                                   height=220, loop=True, elem_id="alpha-video")
                        atlases_out = gr.Gallery(label="Atlas, edited atlas, edit layer", columns=3, height=220,
                                                 format="png", elem_id="atlases")
                        v_loss = gr.Image(label="Losses", type="filepath", interactive=False, height=200,
                                          elem_id="v-loss-plot")
                        v_downloads = gr.File(label="Downloads (videos, atlases and the whole run as a zip)",
                                              file_count="multiple", interactive=False, elem_id="v-downloads")
                        v_command = gr.Code(label="Run it again from the command line (unzip in the repository "
                                            "first)", language="shell", interactive=False, lines=1,
                                            wrap_lines=True, elem_id="v-command")

        def run_atlas(video_value, mask_values, n_steps, short_side, device_name, request: gr.Request):
            if cancelled_while_waiting(request):
                yield {atlas_progress: progress_html(None, "stopped while waiting in the queue")}
                return
            try:
                path, name = upload_path(video_value)
                if path is None:
                    raise InputError("no video; upload one first")
                mask_files = [upload_path(v) for v in (mask_values or [])]
                req = jobs.AtlasRequest(
                    video=check_origin(path, upload_roots), video_name=name,
                    masks=[check_origin(p, upload_roots) for p, _ in mask_files], mask_names=[n for _, n in mask_files],
                    steps=jobs.whole_number(n_steps, "atlas steps", 1),
                    size=jobs.whole_number(short_side, "size", 16, 1080),
                    device=device_name if device_name in devices else devices[0], preview_every=1)
                req.preview_every = max(1, req.steps // 10)
                jobs.check_atlas_request(req, server)
            except USER_ERRORS as e:
                raise user_error(e)
            job = jobs.Job(jobs.new_atlas_folder(server, name))

            def previews(report):
                return {atlas_gallery: [(str(p), c) for p, c in jobs.atlas_preview(job.folder, report.step)]}

            name = yield from follow(job, request.session_hash, lambda p: jobs.run_atlas_job(req, server, job, p),
                                     atlas_progress, previews, what="atlas step")
            done = job.last.step if job.last and job.stopped else req.steps
            report = jobs.Report(done, req.steps, time.monotonic() - job.started, 0.0)
            yield {atlas_progress: progress_html(report, f"atlas '{name}' " + ("stopped" if job.stopped else "done"),
                                                 "atlas step"),
                   atlas_gallery: [(str(p), c) for p, c in jobs.atlas_preview(job.folder, -1)],
                   atlas: gr.update(choices=jobs.list_atlases(server.atlases), value=name)}

        # counted before the run joins the queue (a button's listeners run one after another)
        train_atlas.click(submitted, None, None, concurrency_limit=None, show_progress="hidden")
        train_atlas.click(run_atlas, [video_file, masks, atlas_steps, atlas_size, v_device],
                          [atlas_progress, atlas_gallery, atlas], preprocess=False, concurrency_id="training",
                          concurrency_limit=1, show_progress="minimal", show_progress_on=[atlas_progress])
        stop_atlas.click(stop, None, None, concurrency_limit=None)
        v_device.change(lambda d: (jobs.defaults_for(d)["video_steps"], jobs.defaults_for(d)["video_preview_every"],
                                   jobs.defaults_for(d)["atlas_steps"], jobs.defaults_for(d)["atlas_size"]),
                        v_device, [v_steps, v_every, atlas_steps, atlas_size], queue=False)

        def run_video(atlas_name, layer_name, comp_text, screen_text, src_text, boot_text, n_steps, seed_value,
                      device_name, every, request: gr.Request):
            if cancelled_while_waiting(request):
                yield {v_progress: progress_html(None, "stopped while waiting in the queue")}
                return
            try:
                req = jobs.VideoRequest(
                    atlas=atlas_name, layer=layer_name,
                    **edit_fields(comp_text, screen_text, src_text, boot_text, n_steps, seed_value, device_name, every))
                jobs.check_video_request(req, server)
            except USER_ERRORS as e:
                raise user_error(e)
            job = jobs.Job(jobs.new_job_folder(server.results, "video"))

            def previews(report):
                folder = jobs.snapshot_folder(job.folder, report.step)
                frames = sorted(folder.glob("frame_*.png")) if folder else []
                return {v_preview: str(frames[0])} if frames else {}

            out = yield from follow(job, request.session_hash,
                                    lambda p: jobs.run_video_job(req, server, job, p), v_progress, previews)
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

        # counted before the run joins the queue (a button's listeners run one after another)
        v_run.click(submitted, None, None, concurrency_limit=None, show_progress="hidden")
        v_run.click(run_video, [atlas, video_layer, v_comp, v_screen, v_src, v_boot, v_steps, v_seed, v_device,
                                v_every],
                    [v_progress, v_preview, edited, side, alpha_video, atlases_out, v_loss, v_downloads, v_command,
                     v_results_box],
                    preprocess=False, concurrency_id="training", concurrency_limit=1, show_progress="minimal",
                    show_progress_on=[v_progress])
        v_stop.click(stop, None, None, concurrency_limit=None)

        def refresh_atlases():  # atlases trained since the app started (by any page) are offered too
            names = jobs.list_atlases(server.atlases)
            return gr.Dropdown(choices=names, value=names[0] if names else None)

        app.load(refresh_atlases, None, atlas, concurrency_limit=None)
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

