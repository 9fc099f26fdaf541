"""The adversarial term (--adv_weight): a discriminator made of the frozen teacher's denoiser, read at the outputs of
its blocks, with small trainable heads giving patch logits (PCM's adversarial consistency loss; LADD and
SDXL-Lightning build theirs on a frozen diffusion backbone the same way).

Per step: the student's consistency prediction (fake) and a real sample are noised forward to a time u inside the
pair's phase (objective.adversarial_span); the generator term weight * hinge_G(D(fake)) joins the consistency loss
(its gradient reaches the student through the fake, never the backbone or the heads), and the heads take one hinge
step on the same features, detached. Real is the consistency target noised the same way ("target", PCM's choice)
or the data latents noised to u ("data", LADD's and SDXL-Lightning's). u is uniform over the span, or with
--adv_timesteps low skewed towards its lower end (little noise added: the discriminator sees the sample's detail).
With --adv_fake x0 the fake is instead the student's clean estimate at the interval's start, noised from 0 to a
time anywhere on the schedule, and real is the data noised alike (LADD's discriminator sees the generator's
renoised clean output): u can then be small for every pair, not only in the lowest phase.

The heads and their AdamW stay out of the engine (DDP, FSDP, DeepSpeed): they are small, built identically on every
process from the seed, and their gradients are averaged across processes here, so one path serves every engine.
"""

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .checkpoint import load_tensors, load_torch, save_tensors, save_torch
from .consistency import hinge_discriminator_loss, hinge_generator_loss

REAL_SOURCES = ("target", "data")  # --adv_real
FAKE_SOURCES = ("prediction", "x0")  # --adv_fake
TIME_POWERS = {"uniform": 1.0, "low": 3.0}  # --adv_timesteps: u = low + (high - low) r^power, r ~ U[0, 1)
HEADS_FILE, OPTIMIZER_FILE = "discriminator_heads.safetensors", "discriminator_optimizer.pt"
ADAM_BETAS = (0.0, 0.999)  # PCM's discriminator AdamW: no first-moment smoothing, as GANs usually train
GROUPS = 32  # GroupNorm groups of a head (fewer when its width is not a multiple)


@dataclass
class Tap:
    """A block of the backbone whose output the discriminator reads: read(output, latent_shape) -> [B, C, h, w]."""

    module: nn.Module
    channels: int
    kernel_size: int  # the heads' convolutions: 3 on a UNet's feature maps, 1 on a transformer's tokens (as PCM)
    read: Callable


class PatchHead(nn.Module):
    """Two conv-GroupNorm-LeakyReLU layers with a skip, then a 1x1 conv to one logit per position:
    [B, C, h, w] -> [B, 1, h, w]."""

    def __init__(self, channels, kernel_size):
        super().__init__()

        def layer():
            # No bias before a GroupNorm, which removes it in part (wholly where a group is one channel: there its
            # gradient is rounding noise, which Adam would turn into full-size steps).
            return nn.Sequential(nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=False),
                                 nn.GroupNorm(math.gcd(GROUPS, channels), channels), nn.LeakyReLU(0.2))

        self.first, self.second, self.out = layer(), layer(), nn.Conv2d(channels, 1, 1)

    def forward(self, x):
        x = self.first(x)
        return self.out(self.second(x) + x)


def _mean(logits):
    return torch.stack([x.float().mean() for x in logits]).mean()


class Adversary:
    """The discriminator (the backbone's taps and the heads), the heads' optimizer, and the numbers it logs.

    call(z, t, cond) runs the backbone (the method's teacher pass); every tap's module must belong to it."""

    def __init__(self, call, taps, weight, real, lr, weight_decay, device, seed, num_processes=1, eps=1e-8,
                 timesteps="uniform", fake="prediction"):
        if real not in REAL_SOURCES:
            raise ValueError(f"real must be one of {REAL_SOURCES}, got {real!r}")
        if fake not in FAKE_SOURCES or (fake == "x0" and real != "data"):
            raise ValueError(f"fake must be one of {FAKE_SOURCES} (x0 with real 'data'), got {fake!r}")
        self.fake = fake
        if timesteps not in TIME_POWERS:
            raise ValueError(f"timesteps must be one of {tuple(TIME_POWERS)}, got {timesteps!r}")
        self.call, self.taps, self.weight, self.real = call, list(taps), weight, real
        self.time_power = TIME_POWERS[timesteps]
        self.num_processes = num_processes
        with torch.random.fork_rng(devices=[]):  # the same heads on every process; the run's RNG untouched
            torch.manual_seed(seed)
            self.heads = nn.ModuleList(PatchHead(tap.channels, tap.kernel_size) for tap in self.taps)
        self.heads.to(device).train()
        settings = dict(lr=lr, betas=ADAM_BETAS, weight_decay=weight_decay, eps=eps)
        try:
            self.optimizer = torch.optim.AdamW(self.heads.parameters(), fused=True, **settings)
        except RuntimeError:  # no fused kernel on this device
            self.optimizer = torch.optim.AdamW(self.heads.parameters(), foreach=True, **settings)
        self._captured, self._shape = None, None
        self._hooks = [tap.module.register_forward_hook(self._reader(tap)) for tap in self.taps]
        # sums since the last look: discriminator loss, generator hinge, real logit, fake logit, count
        self.numbers = torch.zeros(5, device=device)

    def _reader(self, tap):
        def hook(module, inputs, output):
            if self._captured is not None:  # only inside features(): the same blocks serve the other passes
                self._captured.append(tap.read(output, self._shape))
        return hook

    def features(self, z, t, cond):
        """The taps' outputs [B, C_i, h_i, w_i] of one backbone pass at z [B, C, h, w], times t [B]."""
        self._captured, self._shape = [], z.shape
        try:
            self.call(z, t, cond)
            return self._captured
        finally:
            self._captured = None

    def logits(self, features, train_heads=True):
        """Each head's patch logits [B, 1, h_i, w_i], in fp32 outside autocast (the heads are small; their loss
        needs no scaler). train_heads False: no gradient reaches the heads (the generator's term)."""
        self.heads.requires_grad_(train_heads)
        try:
            with torch.autocast(features[0].device.type, enabled=False):
                return [head(feature.float()) for head, feature in zip(self.heads, features, strict=True)]
        finally:
            self.heads.requires_grad_(True)

    def terms(self, pair, z0, cond, schedule, objective, generator):
        """(weight * hinge_G(D(fake)), hinge_D(D(real), D(fake))) for a ConsistencyPair: the first joins the
        student's loss, the second is the heads' loss (call backward())."""
        if self.fake == "x0":  # a clean estimate: any time from the origin to the top of the grid
            fake_at, fake_point = pair.student_x0(), None
            low, high = torch.zeros_like(pair.start), schedule.grid[-1].expand_as(pair.start)
        else:
            fake_at, fake_point = pair.pred, pair.point
            low, high = objective.adversarial_span(pair.start, pair.point, schedule)
        u = schedule.draw_times(low, high, generator, self.time_power)
        noise_fake, noise_real = (torch.randn(z0.shape, generator=generator, device=generator.device).to(z0.device)
                                  for _ in range(2))
        fake = schedule.renoise(fake_at.float(), fake_point, u, noise_fake)
        if self.real == "target":
            real = schedule.renoise(pair.target.float(), pair.point, u, noise_real)
        else:
            real = schedule.renoise(z0.float(), None, u, noise_real)
        fake_features = self.features(fake, u, cond)
        with torch.no_grad():
            real_features = self.features(real, u, cond)
        g_loss = hinge_generator_loss(self.logits(fake_features, train_heads=False))
        real_logits = self.logits(real_features)
        fake_logits = self.logits([feature.detach() for feature in fake_features])
        d_loss = hinge_discriminator_loss(real_logits, fake_logits)
        with torch.no_grad():
            self.numbers += torch.stack([d_loss.detach(), g_loss.detach(), _mean(real_logits), _mean(fake_logits),
                                         torch.ones((), device=self.numbers.device)])
        return self.weight * g_loss, d_loss

    def backward(self, d_loss, accumulation_steps=1):
        """The heads' gradients of one micro-batch (averaged over gradient accumulation, as the student's are)."""
        (d_loss / accumulation_steps).backward()

    def step(self, max_grad_norm):
        """Average the heads' gradients over the processes, clip them, and step (every process alike)."""
        grads = [p.grad for p in self.heads.parameters() if p.grad is not None]
        if self.num_processes > 1 and grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= self.num_processes
            for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
                grad.copy_(mean.view_as(grad))
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.heads.parameters(), max_grad_norm)
        self.optimizer.step()

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def look(self):
        """The means since the last look (one device read), for the tracker: {name: float}; {} before any step."""
        d_loss, g_loss, real, fake, count = self.numbers.tolist()
        self.numbers.zero_()
        if not count:
            return {}
        return {"adv/d_loss": d_loss / count, "adv/g_loss": g_loss / count, "adv/real_logit": real / count,
                "adv/fake_logit": fake / count}

    def save(self, folder):
        """The heads and their optimizer into a checkpoint folder (main process: every process holds the same)."""
        save_tensors({name: t.detach() for name, t in self.heads.state_dict().items()},
                     os.path.join(folder, HEADS_FILE))
        save_torch(os.path.join(folder, OPTIMIZER_FILE), self.optimizer.state_dict())

    def load(self, folder):
        """Inverse of save (every process); False when the checkpoint has no discriminator (a run that turns the
        term on: the heads start fresh)."""
        heads_file = os.path.join(folder, HEADS_FILE)
        if not os.path.isfile(heads_file):
            return False
        self.heads.load_state_dict(load_tensors(heads_file))
        self.optimizer.load_state_dict(load_torch(os.path.join(folder, OPTIMIZER_FILE)))
        return True

    def remove(self):
        for hook in self._hooks:
            hook.remove()
