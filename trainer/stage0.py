"""Stage 0: the autoencoder (AutoencoderKL, 8x down) and the text encoder + tokenizer for the prompt grammar."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .loop import Stage, autocast, micro_contexts, set_lr
from .models import build_text_encoder, build_tokenizer, build_vae, count_params
from .shapes import COLOURS, FILLS, POSITIONS, SHAPES, SIZES, ShapesDataset


def batch_indices(stage: Stage, batch_size: int, micro: int, accum: int) -> range:
    """Disjoint dataset indices per (step, micro-step, rank): a resumed run continues the same stream."""
    acc = stage.acc
    start = ((stage.step * accum + micro) * acc.num_processes + acc.process_index) * batch_size
    return range(start, start + batch_size)


def random_crop(x: torch.Tensor, side: int, gen: torch.Generator) -> torch.Tensor:
    """One random (side x side) crop per image, on the 8-pixel latent grid: (B, C, side, side)."""
    cells = (x.shape[-1] - side) // 8 + 1
    ys, xs = (torch.randint(cells, (x.shape[0],), generator=gen) * 8 for _ in range(2))
    return torch.stack([im[:, y:y + side, xx:xx + side] for im, y, xx in zip(x, ys.tolist(), xs.tolist())])


class VAETrainee(torch.nn.Module):
    """encode -> reparameterised sample -> decode in one forward, so DDP wraps a single call."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * eps  # (B, 4, H/8, W/8)
        return self.vae.decode(z).sample, posterior.kl().mean() / x[0].numel()


def train_autoencoder(cfg: TrainConfig, folder: Path, accelerator) -> Path:
    """L1 + L2 reconstruction + a tiny KL. Flat colours need no perceptual or GAN loss at this size.
    Output: folder/vae (diffusers AutoencoderKL) with scaling_factor set so latents have unit std."""
    c = cfg.autoencoder
    stage = Stage("autoencoder", folder, cfg, accelerator, c.optim.steps)
    stage.log_every = c.optim.log_every
    if stage.done:
        return folder / "vae"
    torch.manual_seed(cfg.run.seed)
    vae = VAETrainee(build_vae(c, cfg.data.image_size))
    opt = torch.optim.AdamW(vae.parameters(), lr=c.optim.lr, betas=c.optim.betas, weight_decay=c.optim.weight_decay)
    stage.register("vae", vae, opt)
    stage.load_checkpoint()
    if accelerator.is_main_process and stage.step == 0:
        print(f"[autoencoder] {count_params(vae) / 1e6:.2f}M params", flush=True)
    vae, opt = accelerator.prepare(vae, opt)
    data = ShapesDataset(cfg.data.image_size, cfg.data.seed, "train", cfg.data.heldout_fraction)
    vae.train()
    while stage.step < stage.total:
        set_lr(opt, c.optim, stage.step)
        gen = stage.gen()
        logs = {"rec": 0.0, "kl": 0.0}
        for micro, ctx in micro_contexts(accelerator, vae, c.optim.grad_accum):
            images, _ = data.batch(batch_indices(stage, c.optim.batch_size, micro, c.optim.grad_accum))
            x = torch.from_numpy(images)  # (B, 3, H, W) in [-1, 1]
            if c.crop_size and c.crop_size < x.shape[-1]:
                x = random_crop(x, c.crop_size, gen)
            x = x.to(accelerator.device)
            eps = torch.randn((x.shape[0], c.latent_channels, *(d // 8 for d in x.shape[2:])), generator=gen)
            with ctx, autocast(accelerator):
                rec, kl = vae(x, eps.to(x.device))
                rec_loss = F.l1_loss(rec.float(), x) + F.mse_loss(rec.float(), x)
                loss = (rec_loss + c.kl_weight * kl) / c.optim.grad_accum
                accelerator.backward(loss)
            logs["rec"] += rec_loss.item() / c.optim.grad_accum
            logs["kl"] += kl.item() / c.optim.grad_accum
        stage.optimizer_step(opt, vae.parameters(), c.optim, logs)
    stage.close()

    # Latent scale: 1 / std of the latent means over a fixed batch (as SD's 0.18215 was chosen).
    model = accelerator.unwrap_model(vae).vae.eval()
    with torch.no_grad():
        images, _ = data.batch(range(10**7, 10**7 + 64))
        z = model.encode(torch.from_numpy(images).to(accelerator.device)).latent_dist.mean
        model.register_to_config(scaling_factor=float(1.0 / z.float().std().clamp_min(1e-6)))
    if accelerator.is_main_process:
        model.save_pretrained(folder / "vae")
    stage.mark_done()
    return folder / "vae"


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


def train_text(cfg: TrainConfig, folder: Path, accelerator) -> tuple[Path, Path]:
    """Output: folder/tokenizer and folder/text_encoder (transformers CLIPTokenizer / CLIPTextModel)."""
    c = cfg.text
    stage = Stage("text", folder, cfg, accelerator, c.optim.steps)
    stage.log_every = c.optim.log_every
    if stage.done:
        return folder / "tokenizer", folder / "text_encoder"
    torch.manual_seed(cfg.run.seed)
    tok = build_tokenizer(c.max_length)
    model = TextTrainee(build_text_encoder(c, tok), AttributeProbe(c.hidden_size))
    opt = torch.optim.AdamW(model.parameters(), lr=c.optim.lr, betas=c.optim.betas, weight_decay=c.optim.weight_decay)
    stage.register("text", model, opt)
    stage.load_checkpoint()
    model, opt = accelerator.prepare(model, opt)
    data = ShapesDataset(cfg.data.image_size, cfg.data.seed, "train", cfg.data.heldout_fraction)
    while stage.step < stage.total:
        set_lr(opt, c.optim, stage.step)
        total = 0.0
        for micro, ctx in micro_contexts(accelerator, model, c.optim.grad_accum):
            idx = batch_indices(stage, c.optim.batch_size, micro, c.optim.grad_accum)
            attrs = [data.attributes(i)[0] for i in idx]
            prompts = data.prompts(idx)
            ids = tok(prompts, padding="max_length", max_length=c.max_length, truncation=True,
                      return_tensors="pt").input_ids.to(accelerator.device)
            with ctx, autocast(accelerator):
                loss = model(ids, attrs) / c.optim.grad_accum
                accelerator.backward(loss)
            total += loss.item()
        stage.optimizer_step(opt, model.parameters(), c.optim, {"loss": total})
    stage.close()
    if accelerator.is_main_process:
        tok.save_pretrained(folder / "tokenizer")
        accelerator.unwrap_model(model).encoder.save_pretrained(folder / "text_encoder")
    stage.mark_done()
    return folder / "tokenizer", folder / "text_encoder"
