"""One optimisation step of atlas training: the points a step evaluates the model at
(PointBlocks), all weighted losses at them (step_losses), and the step itself (TrainingStep:
losses, backward, Adam; eager, or replayed as a CUDA graph).

Per step, samples_batch pixels (x, y, t) are drawn (datasets.video_data.sample_pixels); the
model is evaluated at them and at their right and lower neighbours (gradient loss, local
rigidity), at far neighbours (global rigidity) and at their flow-corresponding points in the
frames gap before and after.
"""

import warnings

import torch

from datasets.video_data import VideoData
from losses import nla as L
from models.nla import NLAModel
from training.nla_optim import held_mapping_levels, set_learning_rates


class PointBlocks:
    """Where each kind of point lies in the rows of one step's batch of points.

    A step runs each network once on all its points, stacked as blocks of n rows (n sampled
    pixels), in this order (`names`):

        sample                    the sampled pixels (x, y, t)
        right, below              their neighbours 1 px to the right and 1 px down (gradient loss;
                                  local rigidity when derivative_amount is 1)
        ahead, behind             their flow partners in frames t+gap and t-gap
        rigid_right, rigid_below  their neighbours derivative_amount px away (local rigidity); only
                                  when derivative_amount is not 1
        far_right, far_below      each layer's global rigidity neighbours; only until
                                  stop_global_rigidity

    Each block is a slice of rows (blocks.sample, blocks.ahead, ...), and so are the runs of
    blocks the losses take together: rendered (sample, right, below: their colour is compared
    with the frame's), flow_partners (ahead, behind) and with_opacity (sample to behind: the
    points the opacity is evaluated at). local_rigidity and global_rigidity are the (x, y)
    neighbour blocks of each rigidity term (global_rigidity None once it is off).
    """

    def __init__(self, n: int, spaced_rigidity: bool, global_rigidity: bool):
        self.n = n
        self.names = ("sample", "right", "below", "ahead", "behind")
        if spaced_rigidity:
            self.names += ("rigid_right", "rigid_below")
        if global_rigidity:
            self.names += ("far_right", "far_below")
        block = {name: slice(i * n, (i + 1) * n) for i, name in enumerate(self.names)}
        self.sample, self.right, self.below = block["sample"], block["right"], block["below"]
        self.ahead, self.behind = block["ahead"], block["behind"]
        self.rendered = slice(self.sample.start, self.below.stop)
        self.flow_partners = slice(self.ahead.start, self.behind.stop)
        self.with_opacity = slice(self.sample.start, self.behind.stop)
        self.local_rigidity = ((block["rigid_right"], block["rigid_below"]) if spaced_rigidity
                               else (self.right, self.below))
        self.global_rigidity = (block["far_right"], block["far_below"]) if global_rigidity else None


def step_losses(nla: NLAModel, data: VideoData, cfg: dict, it: int, sample):
    """All weighted losses of one step at the sampled pixels `sample` = (t, y, x, g) (from
    sample_pixels): (total, {name: detached tensor}, batch reconstruction mse per channel,
    detached). Nothing here waits for the device or depends on tensor values for shapes, so a
    CUDA graph can capture it (TrainingStep).

    Each network runs once per step, on every point it is needed at (the rows of PointBlocks),
    so a step is a few large kernels rather than many small ones."""
    t, y, x, g = sample
    n, T, device = t.shape[0], data.T, t.device
    tf, yf, xf = t.float(), y.float(), x.float()
    half = max(data.W, data.H) / 2
    s = getattr(nla.mapping_foreground, "scale", cfg["uv_mapping_scale"])  # a grid mapping's own: uv_mapping_fit
    d = cfg["derivative_amount"]
    global_rigidity = it < cfg["stop_global_rigidity"]
    blocks = PointBlocks(n, spaced_rigidity=d != 1, global_rigidity=global_rigidity)

    # checked optical flow to frame t+gap and to frame t-gap. A point without one keeps weight 0
    # rather than being indexed out: no data-dependent shapes, so a GPU never waits here.
    gap, start = data.gaps[g], data.pair_start[g]  # [n] each
    pair_ahead = start + torch.minimum(t, T - 1 - gap)  # rows of the flow pairs (t, t+gap)
    pair_behind = start + (t - gap).clamp(min=0)  # and (t-gap, t)
    flow = torch.cat([data.pair_forward[pair_ahead, y, x], data.pair_backward[pair_behind, y, x]])  # [2n, 2]
    checked = torch.cat([(t + gap < T) & data.pair_forward_ok[pair_ahead, y, x],
                         (t >= gap) & data.pair_backward_ok[pair_behind, y, x]])[:, None].float()  # [2n, 1]
    to_ahead, to_behind = flow[:n], flow[n:]  # [n, 2] each: the flow to each flow partner
    tg = gap.float()

    # each block's coordinates (x, y, t); the global rigidity neighbours are each layer's own
    coordinates = {"sample": (xf, yf, tf), "right": (xf + 1, yf, tf), "below": (xf, yf + 1, tf),
                   "ahead": (xf + to_ahead[:, 0], yf + to_ahead[:, 1], tf + tg),
                   "behind": (xf + to_behind[:, 0], yf + to_behind[:, 1], tf - tg)}
    if d != 1:
        coordinates.update(rigid_right=(xf + d, yf, tf), rigid_below=(xf, yf + d, tf))

    def layer_points(amount):  # every block's points, global rigidity neighbours `amount` px away: [rows, 3]
        at = dict(coordinates)
        if global_rigidity:
            at.update(far_right=(xf + amount, yf, tf), far_below=(xf, yf + amount, tf))
        xs, ys, ts = zip(*(at[name] for name in blocks.names))
        return nla.normalize(torch.cat(xs), torch.cat(ys), torch.cat(ts))

    amount_fg, amount_bg = cfg["global_rigidity_derivative_amount_fg"], cfg["global_rigidity_derivative_amount_bg"]
    points_fg = layer_points(amount_fg)
    points_bg = points_fg if amount_bg == amount_fg or not global_rigidity else layer_points(amount_bg)
    m_f, m_b = nla.mapping_foreground(points_fg), nla.mapping_background(points_bg)  # [rows, 2] each
    sample, right, below, rendered = blocks.sample, blocks.right, blocks.below, blocks.rendered
    alpha = nla.opacity(points_fg[blocks.with_opacity])  # [5n, 1], rows as the blocks sample to behind
    colour = nla.colour(torch.cat([0.5 * m_f[rendered] + 0.5, 0.5 * m_b[rendered] - 0.5]))  # both layers at once
    fg, bg = colour.chunk(2)  # [3n, 3] each, rows as the rendered blocks
    rec = alpha[rendered] * fg + (1 - alpha[rendered]) * bg  # the sample, its right and lower neighbours
    frame = data.frames[t.repeat(3), torch.cat([y, y, y + 1]), torch.cat([x, x + 1, x])]  # [3n, 3], rows as rec
    mse = L.rgb_loss(rec[sample], frame[sample])
    terms = {"rgb": cfg["rgb_coeff"] * mse,
             "gradient": cfg["gradient_loss_coeff"] * L.gradient_loss(
                 rec[sample], rec[right], rec[below], frame[sample], frame[right], frame[below])}

    # local rigidity of both layers and global rigidity, as one batch of (m, m_dx, m_dy) groups
    local = blocks.local_rigidity
    groups = [("rigidity", m_f, local, d, cfg["rigidity_coeff"]), ("rigidity", m_b, local, d, cfg["rigidity_coeff"])]
    if global_rigidity:
        groups += [("global_rigidity_fg", m_f, blocks.global_rigidity, amount_fg, cfg["global_rigidity_coeff_fg"]),
                   ("global_rigidity_bg", m_b, blocks.global_rigidity, amount_bg, cfg["global_rigidity_coeff_bg"])]
    steps = torch.cat([torch.full((n, 1), amount / half, device=device) for _, _, _, amount, _ in groups])
    values = L.rigidity_loss(torch.cat([m[sample] for _, m, _, _, _ in groups]),
                             torch.cat([m[dx] for _, m, (dx, _), _, _ in groups]),
                             torch.cat([m[dy] for _, m, (_, dy), _, _ in groups]),
                             steps, s, reduce=False).view(len(groups), n).mean(dim=1)
    for (name, _, _, _, coeff), value in zip(groups, values):
        terms[name] = terms[name] + coeff * value if name in terms else coeff * value

    # optical flow: each layer's atlas positions of the sample and its flow partners coincide
    # (weighted by that layer's opacity), and so do the opacities; means over checked pairs
    partners = blocks.flow_partners
    a = alpha[sample].repeat(2, 1)  # [2n, 1] the sample's opacity, once per flow partner
    checked_share = checked.mean().clamp(min=1e-6)
    to_pixels = half / s  # mapping-output difference -> pixels
    flow_fg = L.flow_loss(m_f[sample].repeat(2, 1), m_f[partners], checked * a, to_pixels)
    flow_bg = L.flow_loss(m_b[sample].repeat(2, 1), m_b[partners], checked * (1 - a), to_pixels)
    terms["flow"] = cfg["optical_flow_coeff"] * (flow_fg + flow_bg) / checked_share
    terms["alpha_flow"] = cfg["alpha_flow_factor"] * L.alpha_flow_loss(a, alpha[partners], checked) / checked_share

    terms["sparsity"] = cfg["sparsity_coeff"] * L.sparsity_loss(alpha[sample], fg[sample])
    if data.masks is None:
        terms["alpha_bootstrap"] = cfg["alpha_bootstrapping_factor"] * L.alpha_bootstrap_loss(
            alpha[sample], torch.zeros_like(alpha[sample]))
    elif it < cfg["stop_bootstrapping_iteration"]:
        terms["alpha_bootstrap"] = cfg["alpha_bootstrapping_factor"] * L.alpha_bootstrap_loss(
            alpha[sample], data.masks[t, y, x][:, None])
    total = sum(terms.values())
    return total, {k: v.detach() for k, v in terms.items()}, mse.detach() / 3


class TrainingStep:
    """One optimisation step of atlas training (losses, backward, Adam), called as
    step(it, sample) -> ({name: loss}, batch mse), whose tensors stay valid until the next call.

    With use_graph (a CUDA device), the step is captured as a CUDA graph once per phase of the
    schedule (global rigidity on or off, mask bootstrapping on or off, how many mapping levels
    grid_mapping_coarse_to_fine holds) and replayed. A grid
    step is hundreds of small kernels, so an eager GPU step is bound by launching them; a
    replay launches them all at once. The sampled pixels are drawn eagerly and copied into the
    graph's inputs, so both paths train on the same samples. The optimizer must be capturable
    (make_optimizer(..., capturable=True)). If a capture fails, training goes on eagerly, with
    a warning.
    """

    WARMUP = 3  # eager steps before each capture, on a side stream: lazy initialisation happens there

    def __init__(self, nla: NLAModel, data: VideoData, cfg: dict, opt: torch.optim.Optimizer, use_graph: bool):
        self.nla, self.data, self.cfg, self.opt, self.use_graph = nla, data, cfg, opt, use_graph
        self.graph = self.graph_phase = self.inputs = self.outputs = None
        self.warmed = 0
        # warm-up and capture share one side stream: libraries create per-stream handles lazily,
        # and that must happen before a capture, not inside it
        self.stream = torch.cuda.Stream() if use_graph else None

    def phase(self, it: int):
        return (it < self.cfg["stop_global_rigidity"],
                self.data.masks is not None and it < self.cfg["stop_bootstrapping_iteration"],
                len(held_mapping_levels(self.nla, self.cfg, it)))

    def losses_and_gradients(self, it: int, sample):
        """The step's losses and the gradients of every parameter that trains at step it. A
        mapping level held by grid_mapping_coarse_to_fine is left out of autograd for the step, so
        its gradient (a scatter into the whole level) is never computed and Adam skips it, its
        moments included."""
        held = held_mapping_levels(self.nla, self.cfg, it)
        for level in held:
            level.requires_grad_(False)
        try:
            total, terms, mse = step_losses(self.nla, self.data, self.cfg, it, sample)
            self.opt.zero_grad(set_to_none=True)
            total.backward()
        finally:
            for level in held:
                level.requires_grad_(True)
        return terms, mse

    def eager(self, it: int, sample):
        terms, mse = self.losses_and_gradients(it, sample)
        self.opt.step()
        return terms, mse

    def __call__(self, it: int, sample):
        set_learning_rates(self.opt, self.cfg, it)
        if not self.use_graph:
            return self.eager(it, sample)
        phase = self.phase(it)
        if phase != self.graph_phase:
            if self.warmed < self.WARMUP:
                self.warmed += 1
                self.stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.stream):
                    out = self.eager(it, sample)
                torch.cuda.current_stream().wait_stream(self.stream)
                return out
            try:
                self.capture(it, phase, sample)
            except RuntimeError as e:
                warnings.warn(f"CUDA graph capture failed ({str(e).splitlines()[0]}); training eagerly "
                              "(slower; set cuda_graph=false to skip the attempt)")
                self.use_graph, self.graph = False, None
                return self.eager(it, sample)
        for static, new in zip(self.inputs, sample):
            static.copy_(new)
        self.graph.replay()
        return self.outputs

    def capture(self, it: int, phase, sample):
        self.graph = self.outputs = None  # the previous phase's graph and its memory go
        self.opt.zero_grad(set_to_none=True)  # backward inside the capture allocates the gradients
        self.inputs = [s.clone() for s in sample]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            terms, mse = self.losses_and_gradients(it, self.inputs)
            self.opt.step()
        self.graph, self.graph_phase, self.outputs, self.warmed = graph, phase, (terms, mse), 0

