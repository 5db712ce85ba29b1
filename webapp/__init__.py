"""The web app (python app.py): uploads checked (uploads.py), runs in background jobs
(jobs.py), the Gradio page (ui.py)."""
