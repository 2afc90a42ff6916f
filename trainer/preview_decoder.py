"""Distil a tiny decoder (`<model>/vae_preview/`, a diffusers AutoencoderTiny) from the model's own AutoencoderKL.

The student decoder learns to map latents to the FULL decoder's images (not the dataset's): it stands in for
that decoder in progressive previews and for `decoder: fast`, so matching it is the goal.

Latent convention, the one TAESD / TAESDXL use: the tiny decoder reads UNet-space latents, i.e. the
AutoencoderKL's latents times its scaling_factor, exactly what TorchBackend.preview() hands it (predicted x0),
and returns an image in [-1, 1] like AutoencoderKL.decode. Its config keeps AutoencoderTiny's scaling_factor
1.0 (a diffusers pipeline divides by it: no-op) and its latent_magnitude / latent_shift defaults, which only
its encoder-side helpers use. The encoder half is a minimal untrained placeholder (4 channels, no blocks):
AutoencoderTiny has one; nothing here encodes with it.

Data: shapes images (train split) -> the encoder's posterior means x scaling_factor (what the teacher trained
on, trainer/stage1.py). Half of the pairs are perturbed, + N(0, s^2) with s ~ U(0, preview.noise) in UNet
space, with the full decoder's image of the perturbed latent as target: predicted x0 sits near, not on, the
encoder's latents. Targets are clamped to [-1, 1] (the postprocess clamps anyway). Loss: L1 + L2.

    python -m trainer.preview_decoder --model models/default        # writes models/default/vae_preview/
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import BUNDLED_RECIPE, DataConfig, PreviewConfig, TrainConfig, apply_overrides, recipe
from .loop import set_lr
from .shapes import ShapesDataset
from .skeleton import adamw
from .stage1 import decode_latents, encode_images

SETTINGS_FILE = "distill_config.json"  # beside config.json in vae_preview/: how it was made, and how well it does


def build_preview_decoder(cfg: PreviewConfig, latent_channels: int, levels: int):
    """AutoencoderTiny whose decoder goes through `levels` resolutions (2x nearest upsampling between them)."""
    from diffusers import AutoencoderTiny

    if len(cfg.blocks) != levels:
        raise ValueError(f"preview.blocks has {len(cfg.blocks)} entries; this VAE has {levels} resolution levels "
                         f"({2 ** (levels - 1)}x): give one block count per level")
    return AutoencoderTiny(
        latent_channels=latent_channels, decoder_block_out_channels=(cfg.channels,) * levels,
        num_decoder_blocks=tuple(cfg.blocks), encoder_block_out_channels=(4,) * levels,
        num_encoder_blocks=(0,) * levels, upsampling_scaling_factor=2,
    )


@torch.no_grad()
def make_pairs(vae, data: ShapesDataset, indices: range, noise: float, perturb: bool,
               gen: torch.Generator, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    lat, tgt = [], []
    for start in range(indices.start, indices.stop, batch):
        images, _ = data.batch(range(start, min(start + batch, indices.stop)))
        z = encode_images(vae, torch.from_numpy(images))
        if perturb:
            s = torch.rand(z.shape[0], 1, 1, 1, generator=gen) * noise
            z = z + s * torch.randn(z.shape, generator=gen)
        lat.append(z)
        tgt.append(decode_latents(vae, z))
    return torch.cat(lat), torch.cat(tgt)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """The backends' postprocess arithmetic, (B, 3, H, W) float -> uint8 (same layout)."""
    return ((image.float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def quality(tiny, latents: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The tiny decoder's uint8 images against the full decoder's: mean / max |difference| (levels), PSNR (dB)."""
    a = to_uint8(tiny.decode(latents).sample).float()
    b = to_uint8(targets).float()
    mse = F.mse_loss(a, b).item()
    return {"mean_abs": round((a - b).abs().mean().item(), 3), "max_abs": int((a - b).abs().max().item()),
            "psnr_db": round(10 * math.log10(255**2 / max(mse, 1e-12)), 2)}


def distil(vae, cfg: PreviewConfig, data_cfg: DataConfig, seed: int = 0, log=print):
    """Train the tiny decoder on CPU/GPU tensors of the VAE's device. Returns (AutoencoderTiny, metrics)."""
    t0 = time.monotonic()
    vae = vae.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 20241204)
    train = ShapesDataset(data_cfg.image_size, data_cfg.seed, "train", data_cfg.heldout_fraction)
    held = ShapesDataset(data_cfg.image_size, data_cfg.seed, "heldout", data_cfg.heldout_fraction)
    half = cfg.pairs // 2
    parts = [make_pairs(vae, train, range(half), cfg.noise, False, gen),
             make_pairs(vae, train, range(half, cfg.pairs), cfg.noise, True, gen)]
    lat, tgt = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    evals = {"heldout": make_pairs(vae, held, range(cfg.eval_pairs), cfg.noise, False, gen),
             "heldout_perturbed": make_pairs(vae, held, range(cfg.eval_pairs, 2 * cfg.eval_pairs), cfg.noise, True,
                                             gen)}
    t_data = time.monotonic() - t0
    torch.manual_seed(seed)
    tiny = build_preview_decoder(cfg, int(vae.config.latent_channels), len(vae.config.block_out_channels))
    o = cfg.optim
    opt = adamw(tiny.decoder.parameters(), fused=o.fused, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    tiny.train()
    losses: list[float] = []
    for step in range(o.steps):
        set_lr(opt, o, step)
        idx = torch.randint(lat.shape[0], (o.batch_size,), generator=gen)
        pred = tiny.decoder(lat[idx])
        loss = F.l1_loss(pred, tgt[idx]) + F.mse_loss(pred, tgt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tiny.decoder.parameters(), o.grad_clip)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % o.log_every == 0 or step + 1 == o.steps:
            log(f"[preview] step {step + 1}/{o.steps} loss {sum(losses[-o.log_every:]) / len(losses[-o.log_every:]):.4f}")
    tiny.eval().requires_grad_(False)
    k = max(1, min(len(losses) // 10, 50))  # loss averaged over the first and last tenth (up to 50 steps)
    metrics = {"loss_first": sum(losses[:k]) / k if losses else None,
               "loss_last": sum(losses[-k:]) / k if losses else None,
               "quality": {name: quality(tiny, z, t) for name, (z, t) in evals.items()},
               "data_s": round(t_data, 1), "wall_s": round(time.monotonic() - t0, 1)}
    return tiny, metrics


def write_preview(model_dir: Path, cfg: TrainConfig, log=print) -> Path:
    """Distil from `<model_dir>/vae` and save `<model_dir>/vae_preview/` with its settings and measurements."""
    from diffusers import AutoencoderKL

    model_dir = Path(model_dir)
    vae = AutoencoderKL.from_pretrained(model_dir / "vae", local_files_only=True)
    if vae.config.get("latents_mean") is not None:
        raise ValueError("this VAE normalises latents with latents_mean / latents_std: not supported here")
    tiny, metrics = distil(vae, cfg.preview, cfg.data, cfg.run.seed, log)
    out = model_dir / "vae_preview"
    tiny.save_pretrained(out)
    record = {"what": "AutoencoderTiny decoder distilled from ../vae by trainer/preview_decoder.py; reads UNet-space "
                      "latents (AutoencoderKL latents x scaling_factor), as TorchBackend.preview() passes them",
              "preview": cfg.to_dict()["preview"], "data": cfg.to_dict()["data"], "seed": cfg.run.seed,
              "metrics": metrics, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine()}
    (out / SETTINGS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    for f in out.iterdir():  # safetensors writes 0600; the serving images read models as another user (uid 10001)
        f.chmod(0o644)
    q = metrics["quality"]["heldout"]
    log(f"[preview] wrote {out} in {metrics['wall_s']} s: held-out mean |diff| {q['mean_abs']} levels, "
        f"PSNR {q['psnr_db']} dB vs the full decoder")
    return out


def run_stage(cfg: TrainConfig, folder: Path, out: Path, log=print) -> Path:
    """The recipe's last stage: a tiny decoder for the exported model `out` (skipped when done)."""
    folder = Path(folder)
    if (folder / "DONE").is_file() and (Path(out) / "vae_preview" / "config.json").is_file():
        return Path(out) / "vae_preview"
    if not (Path(out) / "vae" / "config.json").is_file():
        raise ValueError(f"{out} has no exported VAE: run the export stage first")
    folder.mkdir(parents=True, exist_ok=True)
    written = write_preview(Path(out), cfg, log)
    (folder / "DONE").write_text((written / SETTINGS_FILE).read_text())
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.preview_decoder", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a diffusers folder with vae/ (vae_preview/ is written into it)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set preview.optim.steps=300 (repeatable)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is faster on a "
                   "busy machine); recorded with the measurements, not in the model's config")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = Path(args.model)
    saved = model / "train_config.json"
    try:
        cfg = apply_overrides(TrainConfig.load(saved) if saved.is_file() else recipe(BUNDLED_RECIPE), args.overrides)
        write_preview(model, cfg)
    except (ValueError, OSError) as e:
        print(f"preview_decoder: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
