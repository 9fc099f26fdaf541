"""The VAE's latent normalisation in one place: scale only for SD and SDXL (bit for bit as before), shift and scale
for a VAE that has a shift_factor (SD3's), the same on the fly, from precomputed shards and when decoding."""

from types import SimpleNamespace

import torch

from lcm_utils.data import latents_from_posterior
from lcm_utils.evaluation import vae_input
from lcm_utils.families import encode_images
from lcm_utils.tensors import from_latent_space, to_latent_space


def tiny_vae(shift_factor):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=32, scaling_factor=1.5, shift_factor=shift_factor).eval()


def test_without_a_shift_the_scaling_is_bit_for_bit_the_old_one():
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(to_latent_space(z, 0.18215), z * 0.18215)
    assert torch.equal(from_latent_space(z, 0.18215, None), z / 0.18215)
    assert torch.allclose(from_latent_space(to_latent_space(z, 1.5305, 0.0609), 1.5305, 0.0609), z, atol=1e-6)
    assert torch.allclose(to_latent_space(z, 2.0, 0.5), (z - 0.5) * 2.0)


def test_a_shifted_vae_is_shifted_on_the_fly_from_shards_and_when_decoding():
    vae = tiny_vae(shift_factor=0.25)
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z0 = encode_images(SimpleNamespace(vae=vae), pixels, chunk_size=2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    raw = posterior.sample(generator=torch.Generator().manual_seed(2))
    assert torch.allclose(z0, (raw - 0.25) * 1.5, atol=1e-6)
    # Precomputed shards store the posterior; the draw from them is the same latent.
    batch = {"latent_mean": posterior.mean, "latent_std": posterior.std}
    stored = latents_from_posterior(batch, 1.5, 2, torch.Generator().manual_seed(2), torch.device("cpu"), 0.25)
    assert torch.allclose(stored, z0, atol=1e-6)
    assert torch.allclose(vae_input(vae, z0), raw, atol=1e-6)  # what the VAE decodes
