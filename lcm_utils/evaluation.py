"""Sampling teachers and distilled students with stock diffusers pipelines from fixed noise, for comparisons.

Everything goes through the teacher family's stock pipeline with a swapped scheduler, so the numbers describe what
a user loading the outputs gets. All functions take the initial latents explicitly: the same noise for every
method is what makes the endpoint error (LCM paper, sec. 5: the PF-ODE solution from that noise) meaningful.
"""

import numpy as np
import torch
from PIL import Image

from .families import family_at
from .families.registry import DENOISER_FOLDERS
from .objectives import make_objective
from .tensors import from_latent_space


def load_teacher_pipeline(teacher, device):
    return family_at(teacher).load_pipeline(teacher).to(device)


def exported_scheduler(model_dir):
    """The scheduler a training output exported (LCMScheduler or TCDScheduler), by its saved class name."""
    import json
    import os

    import diffusers

    with open(os.path.join(model_dir, "scheduler", "scheduler_config.json")) as f:
        scheduler_cls = getattr(diffusers, json.load(f)["_class_name"])
    return scheduler_cls.from_pretrained(model_dir, subfolder="scheduler")


def training_config(model_dir):
    """The flags a training output was written with (its training_config.yaml; {} without one)."""
    import os

    import yaml

    path = os.path.join(model_dir, "training_config.yaml")
    return (yaml.safe_load(open(path)) or {}) if os.path.isfile(path) else {}


def output_sampling_kwargs(model_dir, kind="diffusion"):
    """sampling_kwargs of a training output, from its training_config.yaml ({} without one: LCM); `kind`: its
    family's schedule_kind."""
    trained = training_config(model_dir)
    objective = make_objective(trained.get("objective", "lcm"), trained.get("num_phases", 4),
                               trained.get("tcd_gamma", 0.3))
    return objective.sampling_kwargs(kind)


def load_student_pipeline(teacher, model_dir, kind, device):
    """`kind` 'full': the output_dir of train_lcm_distill.py; 'lora': that of train_lcm_lora.py. Both sample with
    the scheduler exported next to them (pass output_sampling_kwargs(model_dir) to sample_latents)."""
    family = family_at(teacher)
    folder = family.denoiser_folder
    extra = {folder: family.denoiser_class().from_pretrained(model_dir, subfolder=folder)} if kind == "full" else {}
    without_t5 = bool(training_config(model_dir).get("without_t5"))
    pipe = family.load_pipeline(teacher, without_t5, scheduler=exported_scheduler(model_dir), **extra)
    if kind == "lora":
        pipe.load_lora_weights(model_dir)
    return pipe.to(device)


def load_untrained_student_pipeline(teacher_pipe):
    """The student at step 0 (teacher weights plus a zero-initialised w-embedding, where it takes one) with LCM's
    default scheduler, sharing the teacher pipeline's other parts: what distillation starts from."""
    import diffusers

    family = family_at(teacher_pipe.name_or_path)
    folder = family.denoiser_folder
    parts = {k: v for k, v in teacher_pipe.components.items() if k not in (folder, "scheduler")}
    scheduler_cls = getattr(diffusers, make_objective("lcm").scheduler_class(family.schedule_kind))
    pipe = type(teacher_pipe)(**parts, **{folder: family.build_student(teacher_pipe.components[folder], 256)},
                              scheduler=scheduler_cls.from_config(teacher_pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(teacher_pipe.device)


def student_spec(item, error):
    """'NAME=KIND:PATH[,eta=X]' (the benchmarks' --student) -> (name, kind, path, eta or None); error(message) on a
    malformed one (an argparse parser's error)."""
    name, _, spec = item.partition("=")
    kind, _, rest = spec.partition(":")
    path, _, option = rest.partition(",eta=")
    if not name or kind not in ("full", "lora") or not path:
        error(f"--student wants NAME=KIND:PATH[,eta=X] with KIND full or lora, got {item!r}")
    try:
        eta = float(option) if option else None
    except ValueError:
        eta = -1.0
    if eta is not None and not 0.0 <= eta <= 1.0:
        error(f"--student {item!r}: eta must be a number in [0, 1]")
    return name, kind, path, eta


def takes_guidance(pipe):
    """Whether the pipeline's denoiser takes w (a full SD student's w-embedding): then guidance_scale feeds it, and
    no CFG pass runs; without it a distilled student samples at guidance_scale 1."""
    return getattr(pipeline_denoiser(pipe).config, "time_cond_proj_dim", None) is not None


def scheduler_at(scheduler, steps):
    """`scheduler`, or for one step a copy without shift_terminal: diffusers' flow-matching schedulers divide by zero
    when they stretch a one-point grid to it (and the stretch would move nothing: one step starts at sigma 1)."""
    if steps == 1 and scheduler.config.get("shift_terminal"):
        return type(scheduler).from_config(scheduler.config, shift_terminal=None)
    return scheduler


def pipeline_denoiser(pipe):
    """The pipeline's denoiser (its UNet or transformer)."""
    return next(pipe.components[name] for name in DENOISER_FOLDERS if pipe.components.get(name) is not None)


def initial_noise(num, pipe, seed):
    """[num, C, h, w] standard normal latents for the pipeline's default resolution, from `seed` (CPU RNG)."""
    config = pipeline_denoiser(pipe).config
    c, h = config.in_channels, config.sample_size
    return torch.randn(num, c, h, h, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample_latents(pipe, prompts, noise, steps, guidance_scale, seed=0, chunk=128, scheduler=None, call_kwargs=None):
    """Run the pipeline from `noise` [N, C, h, w]; returns final latents [N, C, h, w] (scaled, as the UNet sees).

    `seed` drives the fresh noise that multistep LCM (and TCD with eta > 0) sampling injects between steps (DDIM
    with eta 0 uses none); `call_kwargs`: more pipeline arguments (a TCD student's eta)."""
    if scheduler is not None:
        pipe.scheduler = scheduler
    out = []
    device = pipe.device
    size = noise.shape[-1] * pipe.vae_scale_factor
    given, pipe.scheduler = pipe.scheduler, scheduler_at(pipe.scheduler, steps)
    try:
        for start in range(0, len(prompts), chunk):
            # Flow-matching schedulers start at sigma 1 and have no init_noise_sigma.
            z = noise[start:start + chunk].to(device) * getattr(pipe.scheduler, "init_noise_sigma", 1.0)
            g = torch.Generator(device).manual_seed(seed + start)
            res = pipe(list(prompts[start:start + chunk]), num_inference_steps=steps, guidance_scale=guidance_scale,
                       latents=z, height=size, width=size, output_type="latent", generator=g, **(call_kwargs or {}))
            out.append(res.images.float().cpu())
    finally:
        pipe.scheduler = given
    return torch.cat(out)


def ddim(pipe, spacing):
    """The teacher's own DDIM scheduler config with `timestep_spacing` ('leading' as SD ships, or 'trailing')."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing=spacing)


def vae_input(vae, latents):
    """The denoiser's latents as `vae` decodes them (its scale and, where it has one, shift undone)."""
    return from_latent_space(latents, vae.config.scaling_factor, getattr(vae.config, "shift_factor", None))


@torch.no_grad()
def decode(pipe, latents, chunk=256):
    """Scaled latents [N, C, h, w] -> list of N PIL images."""
    images = []
    for z in latents.split(chunk):
        x = pipe.vae.decode(vae_input(pipe.vae, z.to(pipe.device, pipe.vae.dtype))).sample
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        images.extend(Image.fromarray(a) for a in x)
    return images


@torch.no_grad()
def decode_to_array(pipe, latents):
    """Scaled latents [N, C, h, w] -> images [N, H, W, 3] float in [0, 1], decoded in the VAE's own dtype."""
    x = pipe.vae.decode(vae_input(pipe.vae, latents.to(pipe.vae.device, pipe.vae.dtype))).sample
    return ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()


def label_font(size):
    """PIL's built-in font at `size` px (Pillow >= 10.1), else its small fixed bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def labelled_grid(images, row_labels, column_labels, min_cell=128):
    """images: rows of equal-size [H, W, 3] uint8 arrays -> one PIL image with the column labels (e.g. "4 steps,
    g 6", written on two lines at the comma) on top and the row labels (prompts, wrapped) on the left, black on
    white. Images narrower than `min_cell` are enlarged (nearest neighbour) so that the labels fit and read."""
    import textwrap

    from PIL import ImageDraw

    h, w = images[0][0].shape[:2]
    scale = max(1, -(-min_cell // w))
    h, w = h * scale, w * scale
    size = max(10, min(28, w // 10))
    font = label_font(size)
    line = size + size // 3
    margin = size // 2
    wrapped = [textwrap.wrap(label, 24)[: max(1, h // line)] or [""] for label in row_labels]
    headers = [label.split(", ") for label in column_labels]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = int(max((measure.textlength(text, font=font) for lines in wrapped for text in lines), default=0))
    left += 2 * margin
    top = line * max(len(lines) for lines in headers) + 2 * margin
    canvas = Image.new("RGB", (left + w * len(images[0]), top + h * len(images)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, lines in enumerate(headers):
        for k, text in enumerate(lines):
            draw.text((left + j * w + margin, margin + k * line), text, fill="black", font=font)
    for i, (row, lines) in enumerate(zip(images, wrapped)):
        for k, text in enumerate(lines):
            draw.text((margin, top + i * h + margin + k * line), text, fill="black", font=font)
        for j, image in enumerate(row):
            picture = Image.fromarray(image)
            if scale > 1:
                picture = picture.resize((w, h), Image.NEAREST)
            canvas.paste(picture, (left + j * w, top + i * h))
    return canvas


def to_pixels(images):
    """PIL images -> [N, 3, H, W] float in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _sqrt_psd(m):
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(feats_a, feats_b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) (Heusel et al. 2017, eq. 6): [N, D], [M, D]."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    s_a, s_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    root_a = _sqrt_psd(s_a)
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    trace_root = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * trace_root)


def endpoint_error(latents, reference):
    """Mean squared distance to the reference latents over the reference's variance: 0 is exact, and an
    independent draw with the reference's mean and variance scores 2."""
    return float(((latents - reference) ** 2).mean() / reference.var())


PLOT_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (128, 0, 0),
                (0, 0, 128), (0, 128, 128)]  # 14 distinct lines before a colour repeats


def line_plots(panels, steps, width=360, height=260):
    """Panels side by side, each {"title": str, "series": {name: [value per step]}} plotted against the step
    counts (log2 x axis), with one legend below: a PIL image. Drawn with PIL alone (no plotting library)."""
    from PIL import ImageDraw

    names = list(dict.fromkeys(name for panel in panels for name in panel["series"]))
    legend_h = 18 * len(names) + 22
    image = Image.new("RGB", (width * len(panels), height + legend_h), "white")
    draw, font = ImageDraw.Draw(image), label_font(12)
    left, right, top, bottom = 52, 14, 26, 30
    xs = [np.log2(s) for s in steps]
    for p, panel in enumerate(panels):
        x0 = p * width
        values = [v for series in panel["series"].values() for v in series]
        lo, hi = min(values), max(values)
        lo, hi = (lo - 0.05 * (hi - lo or 1), hi + 0.05 * (hi - lo or 1))

        def point(i, v):
            px = x0 + left + (xs[i] - xs[0]) / ((xs[-1] - xs[0]) or 1) * (width - left - right)
            return px, top + (hi - v) / (hi - lo) * (height - top - bottom)

        draw.text((x0 + left, 6), panel["title"], fill="black", font=font)
        draw.rectangle([x0 + left, top, x0 + width - right, height - bottom], outline=(120, 120, 120))
        for i, s in enumerate(steps):
            px, _ = point(i, lo)
            draw.text((px - 4, height - bottom + 4), str(s), fill="black", font=font)
        for frac in (0.0, 0.5, 1.0):
            v = lo + frac * (hi - lo)
            _, py = point(0, v)
            draw.text((x0 + 4, py - 6), f"{v:.3g}", fill="black", font=font)
        for n, name in enumerate(names):
            series = panel["series"].get(name)
            if series is None:
                continue
            colour = PLOT_COLOURS[n % len(PLOT_COLOURS)]
            pts = [point(i, v) for i, v in enumerate(series)]
            draw.line(pts, fill=colour, width=2)
            for px, py in pts:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    draw.text((8, height - 2), "x: sampling steps", fill="black", font=font)
    for n, name in enumerate(names):
        y = height + 14 + 18 * n
        colour = PLOT_COLOURS[n % len(PLOT_COLOURS)]
        draw.line([(8, y + 6), (28, y + 6)], fill=colour, width=3)
        draw.text((34, y), name, fill="black", font=font)
    return image
