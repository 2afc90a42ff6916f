"""Stage 2: teacher pairs (cached once, trainer/cache.py) and the one-step initialisation.

The paper starts NitroFusion from an already-distilled one-step model (DMD2 / Hyper-SD); `--init-unet FILE` does
that and skips this stage. Without one, the init is the simplest distillation that gives one: regression of the
student's one-step prediction on the teacher's 25-step sample from the *same* noise (as in Progressive/"knowledge"
distillation, Luhman & Luhman 2021). The student starts from the teacher's weights and is called exactly as at
inference: noise at level 999, UNet at the shifted timestep floor(999 * S / 1000), x0 through
`LCMSampler.denoise`. The cached teacher samples double as the "real" samples of stage 3 (the paper's reals are
teacher outputs too). `init.feature_weight` adds a perceptual term read through the frozen teacher's encoder
(`feature_distance`); the recipe leaves it off: measured at weights 100 and 1000 it moved neither the init nor the
student beyond the paired intervals (docs/training.md, round 24).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from nitrofusion.sampler import LCMSampler

from .cache import PairCache, build_cache, cache_batch, conditioning_of, load_cache
from .conditioning import Conditioning, unet_kwargs
from .config import TrainConfig
from .discriminator import FrozenEncoder
from .loop import Stage, autocast, set_lr
from .models import add_noise, alphas_cumprod
from .skeleton import StageJob, accumulate, make_optimizer, run_stage, step_optimizer

CACHE_PROMPT_OFFSET = 10**8  # shapes dataset indices for cache prompts: far from the teacher's training stream
__all__ = ["CACHE_PROMPT_OFFSET", "InitJob", "build_cache", "cache_batch", "load_cache", "one_step_x0", "train_init"]


def one_step_x0(unet, sampler: LCMSampler, noise: torch.Tensor, cond: Conditioning, shift: int) -> torch.Tensor:
    """The student's one-step output exactly as inference computes it (shifted timestep, LCM boundary)."""
    t = sampler.schedule(1, shift).model_timesteps[0]
    ts = torch.full((noise.shape[0],), t, dtype=torch.long, device=noise.device)
    eps = unet(noise, ts, **unet_kwargs(cond)).sample.float()
    return sampler.denoise(noise, eps, [t] * noise.shape[0])


def feature_distance(encoder: FrozenEncoder, pred: torch.Tensor, target: torch.Tensor, t: int, noise: torch.Tensor,
                     cond: Conditioning, abar: torch.Tensor) -> torch.Tensor:
    """LPIPS's distance with the frozen teacher encoder as the network: both x0 noised to level t with one noise,
    every feature level's vectors scaled to unit length over channels, squared differences averaged over space and
    channels, then over levels. Gradients reach `pred` only."""
    ts = torch.full((pred.shape[0],), t, dtype=torch.long, device=pred.device)
    fp = encoder(add_noise(pred, noise, ts, abar), ts, cond)
    with torch.no_grad():
        ft = encoder(add_noise(target, noise, ts, abar), ts, cond)
    terms = [(F.normalize(a.float(), dim=1) - F.normalize(b.float(), dim=1)).pow(2).mean() for a, b in zip(fp, ft)]
    return torch.stack(terms).mean()


class InitJob(StageJob):
    """Output: folder/unet, the one-step student the adversarial stage starts from."""

    name = "init"

    def __init__(self, cfg: TrainConfig, folder: Path, source, cache_dir: Path, accelerator):
        super().__init__(cfg, folder, accelerator)
        self.source, self.cache_dir = source, cache_dir

    @property
    def optim(self):
        return self.cfg.init.optim

    def outputs(self) -> Path:
        return self.folder / "unet"

    def build(self, stage: Stage) -> None:
        frozen = self.source.frozen(self.acc.device)  # the student starts as the teacher, fp32
        self.encoder = None
        if self.cfg.init.feature_weight:  # a frozen copy: the student trains the weights it starts from
            self.encoder = FrozenEncoder(copy.deepcopy(frozen.teacher)).to(self.acc.device)
        self.text, self.unet = frozen.text, frozen.teacher.requires_grad_(True)
        if self.cfg.init.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.opt = make_optimizer(self.unet.parameters(), self.optim)
        stage.register("unet", self.unet, self.opt)

    def start(self, stage: Stage) -> None:
        self.unet, self.opt = self.acc.prepare(self.unet, self.opt)
        self.unet.train()
        self.cache = PairCache(self.cache_dir, small_patterned_weight=self.cfg.cache_draw_weight("init"))
        self.abar = alphas_cumprod(self.source.noise_schedule)
        self.sampler = LCMSampler(self.abar)

    def iteration(self, stage: Stage) -> dict[str, float]:
        c, acc = self.cfg.init, self.acc
        set_lr(self.opt, c.optim, stage.step)
        gen = stage.gen()

        def micro(i: int):
            pairs = cache_batch(self.cache, gen, c.optim.batch_size)
            noise, x0 = pairs.noise.to(acc.device), pairs.x0.to(acc.device)
            emb = conditioning_of(pairs, self.text, acc.device)
            with autocast(acc):
                pred = one_step_x0(self.unet, self.sampler, noise, emb, self.cfg.nitro.shift)
                mse = F.mse_loss(pred.float(), x0)
                if self.encoder is None:
                    return mse, {"loss": mse}
                # the level and the noise from the stage's generator: a resumed run draws what an unbroken one would
                t = c.feature_timesteps[int(torch.randint(len(c.feature_timesteps), (1,), generator=gen))]
                fnoise = torch.randn(x0.shape, generator=gen).to(acc.device)
                feat = feature_distance(self.encoder, pred, x0, t, fnoise, emb, self.abar)
            loss = mse + c.feature_weight * feat
            return loss, {"loss": loss, "mse": mse, "feature": feat}

        logs = accumulate(acc, self.unet, c.optim.grad_accum, micro)
        step_optimizer(acc, self.opt, self.unet.parameters(), c.optim)
        return logs

    def save(self) -> None:
        self.acc.unwrap_model(self.unet).save_pretrained(self.folder / "unet")


def train_init(cfg: TrainConfig, folder: Path, source, cache_dir: Path, accelerator) -> Path:
    return run_stage(InitJob(cfg, folder, source, cache_dir, accelerator))
