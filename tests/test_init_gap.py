"""bench/init_gap.py: the one-step regression loss it reports is the init stage's own, averaged over every pair."""

import torch

from nitrofusion.backends.base import Conditioning
from nitrofusion.sampler import LCMSampler
from nitrofusion.tiny import tiny_unet
from trainer.config import recipe
from trainer.models import NOISE_SCHEDULE, alphas_cumprod
from trainer.stage2 import one_step_x0

from .helpers import load_script


def test_init_gap_mse_is_the_init_loss_averaged_over_uneven_batches():
    """Targets that are the UNet's own one-step outputs plus a per-pair offset d_i give MSE mean(d_i^2) exactly
    when every pair counts once, whatever the batch split (5 pairs in batches of 2: 2, 2, 1)."""
    mod = load_script("bench/init_gap.py")
    torch.manual_seed(0)
    unet = tiny_unet("sd").eval()
    cfg = recipe("shapes16")
    embeds = {f"p{i}": torch.randn(1, 7, 32) for i in range(5)}
    frozen = {"text": lambda prompts: Conditioning(torch.cat([embeds[p] for p in prompts]), None, None)}
    prompts = list(embeds)
    noise = torch.randn(5, 4, 16, 16)
    sampler = LCMSampler(alphas_cumprod(dict(NOISE_SCHEDULE)))
    with torch.no_grad():
        own = one_step_x0(unet, sampler, noise, frozen["text"](prompts), cfg.nitro.shift)
    offsets = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4])
    pairs = {"noise": noise, "x0": own + offsets.view(-1, 1, 1, 1), "prompts": prompts}
    got = mod.one_step_mse(unet, cfg, frozen, pairs, batch=2)
    assert abs(got - float((offsets ** 2).mean())) < 1e-5
    assert mod.one_step_mse(unet, cfg, frozen, {**pairs, "x0": own}, batch=2) < 1e-10
