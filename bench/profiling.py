"""What the benches share: a torch.profiler table of a few more training steps."""

from pathlib import Path

import torch


def profile_steps(train_step, first_step: int, device: torch.device, path, steps: int = 3):
    """Run train_step(step) for `steps` steps under torch.profiler; write the top operators
    (by GPU time on CUDA, else by CPU time) to `path`."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for step in range(first_step, first_step + steps):
            train_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    Path(path).write_text(prof.key_averages().table(sort_by=key, row_limit=40))
