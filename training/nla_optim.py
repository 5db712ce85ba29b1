"""The optimizer of atlas training: Adam over the four networks with a learning rate per group
of parameters (make_optimizer), its exponentially decaying schedule (set_learning_rates), and
restoring its saved state into a run with other settings (load_optimizer_state).
"""

import torch

from models.nla import GridAtlas, GridMapping, NLAModel

GRID_LR_DECAY = 0.1  # lr_decay for the grid backend when the key is null (README: +0.45-0.95 dB at 20000 steps)


def make_optimizer(nla: NLAModel, cfg: dict, capturable: bool = False) -> torch.optim.Adam:
    """Adam over all four networks. The grid backend's atlas grids, mapping offsets and MLPs each
    take their own learning rate; the official MLPs take lr. capturable: keep Adam's step
    counts on the device, so a CUDA graph can capture opt.step()."""
    grid_backend = isinstance(nla.atlas, GridAtlas)
    groups = {"lr": [], "grid_lr": [], "grid_mapping_lr": [], "grid_mlp_lr": []}
    for name, param in nla.named_parameters():
        key = ("lr" if not grid_backend else "grid_lr" if name.startswith("atlas.grids.") else
               "grid_mapping_lr" if name.endswith(".offsets") or ".coarse." in name else "grid_mlp_lr")
        groups[key].append(param)
    # fused Adam updates the millions of grid texels much faster on a CPU; the official MLPs keep
    # PyTorch's default Adam, as the original code does. Each group keeps its configured rate as
    # base_lr; set_learning_rates scales it. In a CUDA graph the rate must be a device tensor.
    device = next(nla.parameters()).device
    return torch.optim.Adam([{"params": params, "base_lr": cfg[key],
                              "lr": torch.tensor(cfg[key], device=device) if capturable else cfg[key]}
                             for key, params in groups.items() if params],
                            fused=grid_backend, capturable=capturable)


def load_optimizer_state(opt: torch.optim.Optimizer, saved: dict):
    """Restore Adam's moments and step counts from a checkpoint, keeping this run's settings
    (rates, fused, capturable): a run saved on a CPU may resume as a CUDA graph, and the other way."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    opt.load_state_dict(saved)
    for group, own in zip(opt.param_groups, settings):
        group.update(own)
        for param in group["params"]:
            state = opt.state.get(param, {})
            if "step" in state:  # where a fused or capturable Adam expects it
                on_device = group["fused"] or group["capturable"]
                state["step"] = state["step"].to(param.device if on_device else "cpu", torch.float32)


def lr_decay(cfg: dict) -> float:
    """What the learning rates decay to by the end of the schedule, as a fraction of the
    configured ones: the key lr_decay, or when it is null the backend's default: 1.0 for mlp
    (constant rates, as NLA trains), GRID_LR_DECAY for grid (more PSNR and steadier mappings at
    20000 steps, README; a run of a few dozen steps needs 1.0)."""
    if cfg.get("lr_decay") is not None:
        return cfg["lr_decay"]
    return GRID_LR_DECAY if cfg["atlas_backend"] == "grid" else 1.0


def set_learning_rates(opt: torch.optim.Optimizer, cfg: dict, it: int):
    """lr at step it: base_lr * lr_decay ** (it / iters_num), an exponential decay to lr_decay times
    the configured rate at the end of the schedule. Tensor rates are updated in place, so a
    captured CUDA graph sees them."""
    factor = lr_decay(cfg) ** (it / max(cfg["iters_num"], 1))
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(group["base_lr"] * factor)
        else:
            group["lr"] = group["base_lr"] * factor


def held_mapping_levels(nla: NLAModel, cfg: dict, it: int) -> list[torch.nn.Parameter]:
    """The grid mappings' offset levels that do not train at step it (grid_mapping_coarse_to_fine = f):
    with L levels, the coarsest trains from step 0 and level i (0 the finest) from
    f * iters_num * (L - 1 - i) / (L - 1), so the finest is held at its start (the flow's
    motion, pretrain_mappings) until f of the schedule: the atlas forms under smooth mappings
    before the fine offsets can bend them to fit it. f = 0 (the default): none is held.
    grid_mapping_coarse_to_fine_layers picks the mappings it holds (both, foreground, background)."""
    fraction = cfg.get("grid_mapping_coarse_to_fine") or 0.0
    held = []
    if fraction == 0:
        return held
    layers = cfg.get("grid_mapping_coarse_to_fine_layers", "both")
    for name, net in (("foreground", nla.mapping_foreground), ("background", nla.mapping_background)):
        if not isinstance(net, GridMapping) or layers not in ("both", name):
            continue
        levels = [net.offsets, *net.coarse]  # finest first
        last = len(levels) - 1
        for i, level in enumerate(levels[:last]):  # the coarsest always trains
            if it < fraction * cfg["iters_num"] * (last - i) / last:
                held.append(level)
    return held
