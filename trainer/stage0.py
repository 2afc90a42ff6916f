"""Stage 0: the autoencoder (AutoencoderKL, 8x or 4x down) and the text encoder + tokenizer for the prompt grammar."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .loop import Stage, autocast, set_lr
from .models import build_text_encoder, build_tokenizer, build_vae, count_params
from .shapes import COLOURS, FILLS, POSITIONS, SHAPES, SIZES, ShapesDataset
from .skeleton import StageJob, accumulate, make_optimizer, run_stage, step_optimizer


def batch_indices(stage: Stage, batch_size: int, micro: int, accum: int) -> range:
    """Disjoint dataset indices per (step, micro-step, rank): a resumed run continues the same stream."""
    acc = stage.acc
    start = ((stage.step * accum + micro) * acc.num_processes + acc.process_index) * batch_size
    return range(start, start + batch_size)


def random_crop(x: torch.Tensor, side: int, gen: torch.Generator, grid: int = 8) -> torch.Tensor:
    """One random (side x side) crop per image, on the latent grid (`grid` pixels a latent pixel): (B, C, side, side)."""
    cells = (x.shape[-1] - side) // grid + 1
    ys, xs = (torch.randint(cells, (x.shape[0],), generator=gen) * grid for _ in range(2))
    return torch.stack([im[:, y:y + side, xx:xx + side] for im, y, xx in zip(x, ys.tolist(), xs.tolist())])


class VAETrainee(torch.nn.Module):
    """encode -> reparameterised sample -> decode in one forward, so DDP wraps a single call."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * eps  # (B, latent channels, H/f, W/f)
        return self.vae.decode(z).sample, posterior.kl().mean() / x[0].numel()


class AutoencoderJob(StageJob):
    """L1 + L2 reconstruction + a tiny KL. Flat colours need no perceptual or GAN loss at this size.
    Output: folder/vae (diffusers AutoencoderKL) with scaling_factor set so latents have unit std."""

    name = "autoencoder"

    @property
    def optim(self):
        return self.cfg.autoencoder.optim

    def outputs(self) -> Path:
        return self.folder / "vae"

    def build(self, stage: Stage) -> None:
        torch.manual_seed(self.cfg.run.seed)
        self.vae = VAETrainee(build_vae(self.cfg.autoencoder, self.cfg.data.image_size))
        self.opt = make_optimizer(self.vae.parameters(), self.optim)
        stage.register("vae", self.vae, self.opt)

    def describe(self) -> str:
        return f"{count_params(self.vae) / 1e6:.2f}M params"

    def start(self, stage: Stage) -> None:
        self.vae, self.opt = self.acc.prepare(self.vae, self.opt)
        cfg = self.cfg
        self.data = ShapesDataset(cfg.data.image_size, cfg.data.seed, "train", cfg.data.heldout_fraction)
        self.vae.train()

    def iteration(self, stage: Stage) -> dict[str, float]:
        c, acc = self.cfg.autoencoder, self.acc
        set_lr(self.opt, c.optim, stage.step)
        gen = stage.gen()

        def micro(i: int):
            images, _ = self.data.batch(batch_indices(stage, c.optim.batch_size, i, c.optim.grad_accum))
            x = torch.from_numpy(images)  # (B, 3, H, W) in [-1, 1]
            if c.crop_size and c.crop_size < x.shape[-1]:
                x = random_crop(x, c.crop_size, gen, c.scale_factor)
            x = x.to(acc.device)
            eps = torch.randn((x.shape[0], c.latent_channels, *(d // c.scale_factor for d in x.shape[2:])),
                              generator=gen)
            with autocast(acc):
                rec, kl = self.vae(x, eps.to(x.device))
                rec_loss = F.l1_loss(rec.float(), x) + F.mse_loss(rec.float(), x)
                return rec_loss + c.kl_weight * kl, {"rec": rec_loss, "kl": kl}

        logs = accumulate(acc, self.vae, c.optim.grad_accum, micro)
        step_optimizer(acc, self.opt, self.vae.parameters(), c.optim)
        return logs

    def finish(self, stage: Stage) -> None:
        # Latent scale: 1 / std of the latent means over a fixed batch (as SD's 0.18215 was chosen).
        self.model = self.acc.unwrap_model(self.vae).vae.eval()
        with torch.no_grad():
            images, _ = self.data.batch(range(10**7, 10**7 + 64))
            z = self.model.encode(torch.from_numpy(images).to(self.acc.device)).latent_dist.mean
            self.model.register_to_config(scaling_factor=float(1.0 / z.float().std().clamp_min(1e-6)))

    def save(self) -> None:
        self.model.save_pretrained(self.folder / "vae")


def train_autoencoder(cfg: TrainConfig, folder: Path, accelerator) -> Path:
    return run_stage(AutoencoderJob(cfg, folder, accelerator))


class AttributeProbe(torch.nn.Module):
    """Linear heads on the pooled text state predicting each grammar attribute (the text encoder's objective)."""

    GROUPS: ClassVar[dict[str, list[str]]] = {"size": list(SIZES), "colour": list(COLOURS), "fill": list(FILLS), "shape": list(SHAPES),
              "position": list(POSITIONS), "background": list(COLOURS)}

    def __init__(self, width: int):
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in self.GROUPS.items()})

    def loss(self, pooled: torch.Tensor, attrs) -> torch.Tensor:
        total = 0.0
        for k, head in self.heads.items():
            target = torch.tensor([self.GROUPS[k].index(getattr(a, k)) for a in attrs], device=pooled.device)
            total = total + F.cross_entropy(head(pooled), target)
        return total / len(self.heads)


class TextTrainee(torch.nn.Module):
    """Encoder + probe as one module so DDP sees one set of parameters."""

    def __init__(self, encoder, probe):
        super().__init__()
        self.encoder, self.probe = encoder, probe

    def forward(self, ids, attrs):
        out = self.encoder(ids)
        # Also push the per-token states (what the UNet cross-attends to) to carry the attributes: probe the
        # mean of the non-padding tokens as well as the pooled EOS state.
        mask = (ids != self.encoder.config.eos_token_id).float().unsqueeze(-1)
        mean = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.probe.loss(out.pooler_output, attrs) + self.probe.loss(mean, attrs)


class TextJob(StageJob):
    """Output: folder/tokenizer and folder/text_encoder (transformers CLIPTokenizer / CLIPTextModel)."""

    name = "text"

    @property
    def optim(self):
        return self.cfg.text.optim

    def outputs(self) -> tuple[Path, Path]:
        return self.folder / "tokenizer", self.folder / "text_encoder"

    def build(self, stage: Stage) -> None:
        c = self.cfg.text
        torch.manual_seed(self.cfg.run.seed)
        self.tok = build_tokenizer(c.max_length)
        self.model = TextTrainee(build_text_encoder(c, self.tok), AttributeProbe(c.hidden_size))
        self.opt = make_optimizer(self.model.parameters(), c.optim)
        stage.register("text", self.model, self.opt)

    def start(self, stage: Stage) -> None:
        self.model, self.opt = self.acc.prepare(self.model, self.opt)
        cfg = self.cfg
        self.data = ShapesDataset(cfg.data.image_size, cfg.data.seed, "train", cfg.data.heldout_fraction)

    def iteration(self, stage: Stage) -> dict[str, float]:
        c, acc = self.cfg.text, self.acc
        set_lr(self.opt, c.optim, stage.step)

        def micro(i: int):
            idx = batch_indices(stage, c.optim.batch_size, i, c.optim.grad_accum)
            attrs = [self.data.attributes(j)[0] for j in idx]
            ids = self.tok(self.data.prompts(idx), padding="max_length", max_length=c.max_length, truncation=True,
                           return_tensors="pt").input_ids.to(acc.device)
            with autocast(acc):
                loss = self.model(ids, attrs)
            return loss, {"loss": loss}

        logs = accumulate(acc, self.model, c.optim.grad_accum, micro)
        step_optimizer(acc, self.opt, self.model.parameters(), c.optim)
        return logs

    def save(self) -> None:
        self.tok.save_pretrained(self.folder / "tokenizer")
        self.acc.unwrap_model(self.model).encoder.save_pretrained(self.folder / "text_encoder")


def train_text(cfg: TrainConfig, folder: Path, accelerator) -> tuple[Path, Path]:
    return run_stage(TextJob(cfg, folder, accelerator))
