"""NitroFusion's discriminator: the frozen teacher encoder and a dynamic pool of small heads (paper Sec. 3.2).

`FrozenEncoder` runs the teacher UNet's conv_in, down blocks and mid block and returns every feature map
(conv_in, each down-block resnet and downsampler output, the mid block): 10 for SDXL, 9 for the shapes16
recipe's 4-block UNet. `HeadPool` keeps `heads_per_slot` heads for every (t*, feature level, task) slot; each
iteration samples one head per (level, task) of the drawn t*, and re-initialises ~1% of all heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .conditioning import Conditioning, zero_conditioning
from .config import PoolConfig
from .models import add_noise

COND_TASKS = ("global_cond", "local_cond")  # the tasks whose features are computed with the prompt


class FrozenEncoder(nn.Module):
    """The teacher UNet's encoder (down blocks + mid block), frozen; gradients still flow to its input.

    Conditioned as the whole UNet is: cross-attention on the prompt embeddings and, for SDXL (`text_time`), the
    pooled embedding and the size/crop time ids added to the timestep embedding (diffusers' `add_embedding`
    path), so the heads judge an SDXL image against its full conditioning. `dtype` (bf16/fp16 on GPUs) stores the
    frozen weights at half the memory; inputs are cast to it, features come out in it."""

    def __init__(self, unet, dtype: torch.dtype | None = None):
        super().__init__()
        self.conv_in, self.time_proj, self.time_embedding = unet.conv_in, unet.time_proj, unet.time_embedding
        self.down_blocks, self.mid_block = unet.down_blocks, unet.mid_block
        self.config = unet.config
        kind = getattr(unet.config, "addition_embed_type", None)
        extras = [n for n in ("class_embedding", "time_embed_act", "encoder_hid_proj") if getattr(unet, n, None)]
        if kind not in (None, "text_time") or extras:
            raise ValueError(f"FrozenEncoder supports SD1.x/SDXL UNets, not addition_embed_type={kind!r} {extras}")
        self.add_time_proj = unet.add_time_proj if kind == "text_time" else None
        self.add_embedding = unet.add_embedding if kind == "text_time" else None
        if dtype is not None:
            self.to(dtype)
        self.requires_grad_(False).eval()
        self.latent_channels = unet.config.in_channels

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def embed(self, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Timestep embedding (B, C_t), plus SDXL's pooled + time-id embedding (as UNet2DConditionModel)."""
        emb = self.time_embedding(self.time_proj(t).to(self.dtype))
        if self.add_embedding is not None:
            if cond.pooled is None or cond.time_ids is None:
                raise ValueError("an SDXL encoder needs the pooled embedding and the time ids")
            time_embeds = self.add_time_proj(cond.time_ids.flatten()).reshape(cond.pooled.shape[0], -1)
            add = torch.cat([cond.pooled.to(time_embeds.dtype), time_embeds], dim=-1).to(self.dtype)
            emb = emb + self.add_embedding(add)
        return emb

    @property
    def prompt_free_blocks(self) -> int:
        """How many leading down blocks never read the prompt: those before the first cross-attention block, none
        for SDXL (its pooled embedding enters the timestep embedding every block reads). Their features are the
        same for one noisy input under any prompt."""
        if self.add_embedding is not None:
            return 0
        n = 0
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                break
            n += 1
        return n

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, upto: int | None = None,
                reuse: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Every feature level, or (upto) at least levels 0..upto: blocks past the deepest level the heads read
        are not run (the shapes16 recipe's heads read up to level 5 of 9; stage 3 takes 0.84x the time,
        bench/stage3_ab.sh). `reuse`: this encoder's features of the same x and t under another prompt; the
        prompt-free blocks' levels are taken from it, not recomputed (the matching-aware pool's reals shown with a
        wrong prompt)."""
        emb = self.embed(t, cond)
        ctx = cond.embeds.to(self.dtype)
        start = self.prompt_free_blocks if reuse is not None else 0
        if start:
            kept = 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in self.down_blocks[:start])
            feats = list(reuse[:kept])
            h = feats[-1]  # a block's last output is its h: the downsampler's, or its last resnet's
        else:
            h = self.conv_in(x.to(self.dtype))
            feats = [h]
        for block in self.down_blocks[start:]:
            if upto is not None and len(feats) > upto:
                return feats
            if getattr(block, "has_cross_attention", False):
                h, res = block(h, temb=emb, encoder_hidden_states=ctx)
            else:
                h, res = block(h, temb=emb)
            feats.extend(res)  # each resnet output, then the downsampler's (== h) when there is one
        if self.mid_block is not None and (upto is None or len(feats) <= upto):
            h = self.mid_block(h, emb, encoder_hidden_states=ctx)
            feats.append(h)
        return feats

    @torch.no_grad()
    def shapes(self, latent: int) -> list[tuple[int, int]]:
        """(channels, side) of each feature level for a latent side, from one dry run."""
        dev = next(self.parameters()).device
        x = torch.zeros(1, self.latent_channels, latent, latent, device=dev)
        feats = self(x, torch.zeros(1, dtype=torch.long, device=dev),
                     zero_conditioning(self.config, size=latent * 8, device=dev))
        return [(f.shape[1], f.shape[-1]) for f in feats]


def _groups(ch: int, side: int) -> int:
    """GroupNorm groups for a head layer. DMD2's 32 groups suit SDXL's 128-px maps, but on the few-pixel maps
    of a small latent a one-channel group is instance norm over 4-16 values: it erases each channel's level,
    and the shapes recipe's whole pool sat at chance (loss exactly 2 ln 2 after 150 dedicated updates,
    measured; with one group the same heads learned). So: one group below 16x16."""
    if side < 16:
        return 1
    return math.gcd(ch, 32) if ch >= 8 else 1


class Head(nn.Module):
    """DMD2-style head: strided 4x4 convs + GroupNorm + SiLU down to a small map, then a 1x1 conv to logits."""

    def __init__(self, in_ch: int, side: int, width: int, min_map: int, norm: str = "group"):
        super().__init__()
        layers: list[nn.Module] = []
        ch, s = in_ch, side

        def norm_layer(side: int) -> nn.Module:  # "none": keep each image's feature level and scale for the head
            return nn.GroupNorm(_groups(width, side), width) if norm == "group" else nn.Identity()

        while s > min_map:
            s //= 2
            layers += [nn.Conv2d(ch, width, 4, stride=2, padding=1), norm_layer(s), nn.SiLU()]
            ch = width
        if not layers:  # already small: one 3x3 layer so the head still has capacity
            layers += [nn.Conv2d(ch, width, 3, padding=1), norm_layer(s), nn.SiLU()]
            ch = width
        layers.append(nn.Conv2d(ch, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, learn: bool = False) -> torch.Tensor:
        """(B, 1, h, w) logit map. `learn` is the pool's flag for stats heads; a patch head keeps no statistics."""
        return self.net(x.to(self.net[0].weight.dtype))

    @torch.no_grad()
    def reinit(self, gen: torch.Generator) -> None:
        """PyTorch's default init, drawn from `gen` so every DDP rank re-initialises identically."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) and the bias share this bound
                m.weight.copy_((torch.rand(m.weight.shape, generator=gen) * 2 - 1) * bound)
                m.bias.copy_((torch.rand(m.bias.shape, generator=gen) * 2 - 1) * bound)
            elif isinstance(m, nn.GroupNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()


def channel_stats(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, 2C): each channel's mean and std over the map (a one-pixel map's std is 0)."""
    x = x.float()
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3), correction=0)], dim=1)


class StatsHead(nn.Module):
    """A head that judges each image's feature statistics, not patches: every channel's mean and std over the map
    (2C numbers), standardised by running estimates, then a two-layer MLP to one logit per image. Why: on shapes16 a
    converged logistic regression on these statistics tells the student from dataset latents (AUC up to 0.80) where
    the patch heads, trained online, sit at chance (0.51; docs/training.md, round 8). The running mean and variance
    are updated only on the heads' own updates (`learn`), from real and fake rows together, so the generator is judged
    by the scale the heads learned on and cannot move it."""

    def __init__(self, in_ch: int, width: int, momentum: float = 0.05):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * in_ch, width), nn.SiLU(), nn.Linear(width, 1))
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(2 * in_ch))
        self.register_buffer("var", torch.ones(2 * in_ch))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, learn: bool = False) -> torch.Tensor:
        stats = channel_stats(x)
        if learn:
            with torch.no_grad():
                m = 1.0 if self.seen == 0 else self.momentum  # the first batch sets the scale outright
                self.mean.lerp_(stats.mean(0), m)
                self.var.lerp_(stats.var(0, correction=0), m)
                self.seen += 1
        z = (stats - self.mean) / (self.var + 1e-6).sqrt()
        return self.net(z.to(self.net[0].weight.dtype))[:, :, None, None]  # (B, 1, 1, 1): one verdict per image

    @torch.no_grad()
    def reinit(self, gen: torch.Generator) -> None:
        """PyTorch's default Linear init, drawn from `gen` (as Head.reinit); the running statistics stay: they
        describe the features, not what the head learned."""
        for m in self.net:
            if isinstance(m, nn.Linear):
                bound = 1 / math.sqrt(m.in_features)
                m.weight.copy_((torch.rand(m.weight.shape, generator=gen) * 2 - 1) * bound)
                m.bias.copy_((torch.rand(m.bias.shape, generator=gen) * 2 - 1) * bound)


def make_head(cfg: PoolConfig, in_ch: int, side: int) -> nn.Module:
    if cfg.head_kind == "stats":
        return StatsHead(in_ch, cfg.head_channels)
    return Head(in_ch, side, cfg.head_channels, cfg.min_map, cfg.head_norm)


class HeadPool(nn.Module):
    """All heads, indexed by slot (t*, level, task) x replica. Only sampled heads run (and so get gradients)."""

    def __init__(self, cfg: PoolConfig, level_shapes: list[tuple[int, int]]):
        super().__init__()
        self.cfg = cfg
        self.level_shapes = level_shapes
        if cfg.single_head:
            # Ablation: one head (deepest level, whole image, with the prompt) used for every t*.
            self.slots = [(None, len(level_shapes) - 1, "global_cond")]
            k = 1
        else:
            bad = [lv for lv in cfg.levels if lv >= len(level_shapes)]
            if bad:
                raise ValueError(f"nitro.pool.levels {bad}: the encoder has {len(level_shapes)} feature levels "
                                 f"(0 to {len(level_shapes) - 1})")
            levels = cfg.levels or tuple(range(len(level_shapes)))
            self.slots = [(t, lvl, task) for t in cfg.timesteps for lvl in levels for task in cfg.tasks]
            k = cfg.heads_per_slot
        self.replicas = k
        self.heads = nn.ModuleList(
            make_head(cfg, *level_shapes[lvl]) for (_, lvl, _) in self.slots for _ in range(k)
        )

    def __len__(self) -> int:
        return len(self.heads)

    def slot_of(self, head: int) -> tuple[int | None, int, str]:
        return self.slots[head // self.replicas]

    def deepest(self, heads: list[int]) -> int:
        """The deepest feature level these heads read: the encoder need not run past it."""
        return max(self.slot_of(h)[1] for h in heads)

    def tasks_of(self, heads: list[int]) -> set[str]:
        return {self.slot_of(h)[2] for h in heads}

    def sample(self, t_star: int, gen: torch.Generator) -> list[int]:
        """One random replica per (level, task) slot of this t* (all of the pool's slots for single_head)."""
        chosen = []
        for s, (t, _, _) in enumerate(self.slots):
            if t is None or t == t_star:
                chosen.append(s * self.replicas + int(torch.randint(self.replicas, (1,), generator=gen)))
        return chosen

    def refresh(self, gen: torch.Generator, optimizer: torch.optim.Optimizer | None = None) -> list[int]:
        """Re-initialise refresh_fraction * pool random heads, on average: the integer part every iteration and
        one more with the probability of the fraction left (on an 84-head pool 1% is 0.84 heads; rounding up to
        one, as this did before, made 1% and 0.1% the same 1.2%, measured by bench/pool_probe.py). Drops the
        heads' AdamW moments so they restart as new heads."""
        if self.cfg.refresh_fraction <= 0:
            return []
        expected = self.cfg.refresh_fraction * len(self.heads)
        n = int(expected) + int(torch.rand((), generator=gen).item() < expected - int(expected))
        ids = torch.randperm(len(self.heads), generator=gen)[:n].tolist()
        for i in ids:
            self.heads[i].reinit(gen)
            if optimizer is not None:
                for p in self.heads[i].parameters():
                    optimizer.state.pop(p, None)
        return sorted(ids)

    def forward(self, feats: dict[str, list[torch.Tensor]], heads: list[int],
                learn: bool = False) -> dict[int, torch.Tensor]:
        """feats[task][level]: (B, C, h, w). Returns each sampled head's logit map (B, 1, h', w'). `learn`: this is
        the heads' own update (stats heads then move their running feature statistics; patch heads ignore it)."""
        out = {}
        for i in heads:
            head, (_, level, task) = self.heads[i], self.slot_of(i)
            out[i] = head(feats[task][level], learn=learn)
        return out


def crop_side(h: int, w: int, fraction: float) -> int:
    return max(1, round(fraction * min(h, w)))


def crop_offsets(b: int, h: int, w: int, side: int, gen: torch.Generator) -> tuple[list[int], list[int]]:
    ys = torch.randint(0, h - side + 1, (b,), generator=gen).tolist()
    xs = torch.randint(0, w - side + 1, (b,), generator=gen).tolist()
    return ys, xs


def take_crops(x: torch.Tensor, ys: list[int], xs: list[int], side: int) -> torch.Tensor:
    return torch.stack([x[i, :, y:y + side, xx:xx + side] for i, (y, xx) in enumerate(zip(ys, xs))])


def random_crops(x: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """One random square crop per row, side = fraction of the latent side: (B, C, c, c)."""
    b, _, h, w = x.shape
    side = crop_side(h, w, fraction)
    return take_crops(x, *crop_offsets(b, h, w, side, gen), side)


@dataclass
class Views:
    """The randomness of one discriminator look at a batch: the noise that takes x0 to t*, and (local heads)
    each row's crop offset. Drawn before the look, so a batch split into micro-batches sees exactly the views the
    whole batch would (gradient accumulation), in the order one call used to draw them."""

    noise: torch.Tensor  # (B, C, h, w)
    ys: list[int] | None = None
    xs: list[int] | None = None
    side: int = 0

    @staticmethod
    def draw(gen: torch.Generator, shape: tuple[int, ...], tasks: set[str], crop_fraction: float) -> Views:
        noise = torch.randn(shape, generator=gen)
        if not tasks & {"local_cond", "local_uncond"}:
            return Views(noise)
        b, _, h, w = shape
        side = crop_side(h, w, crop_fraction)
        return Views(noise, *crop_offsets(b, h, w, side, gen), side)

    def rows(self, index: slice) -> Views:
        crop = (self.ys[index], self.xs[index]) if self.ys is not None else (None, None)
        return Views(self.noise[index], *crop, self.side)

    def split(self, n: int) -> tuple[Views, Views]:
        """Rows [:n] and [n:]: one draw for a real-then-fake batch, as two."""
        return self.rows(slice(0, n)), self.rows(slice(n, None))

    @staticmethod
    def cat(a: Views, b: Views) -> Views:
        crop = (a.ys + b.ys, a.xs + b.xs) if a.ys is not None else (None, None)
        return Views(torch.cat([a.noise, b.noise]), *crop, a.side)


def encoder_features(encoder: FrozenEncoder, x0: torch.Tensor, t_star: int, cond: Conditioning,
                     uncond: Conditioning, tasks: set[str], abar: torch.Tensor, views: Views, upto: int | None = None,
                     reuse: dict[str, list[torch.Tensor]] | None = None) -> dict[str, list[torch.Tensor]]:
    """Noise x0 to t*, then run the frozen encoder once per needed view: whole image with the prompt
    (global_cond), random crops with the prompt (local_cond) and the same crops with "" (local_uncond). Crops keep
    the whole image's SDXL time ids (a choice: the paper gives none; the prompt describes the whole image too).
    `upto`: the deepest feature level any head reads (FrozenEncoder.forward). `reuse[task]`: features of the same
    x0 and views under other prompts, whose prompt-free levels are taken as they are."""
    b = x0.shape[0]
    t = torch.full((b,), t_star, dtype=torch.long, device=x0.device)
    xt = add_noise(x0, views.noise.to(x0.device, x0.dtype), t, abar)
    reuse = reuse or {}
    feats: dict[str, list[torch.Tensor]] = {}
    if "global_cond" in tasks:
        feats["global_cond"] = encoder(xt, t, cond, upto, reuse.get("global_cond"))
    if tasks & {"local_cond", "local_uncond"}:
        crops = take_crops(xt, views.ys, views.xs, views.side)
        if "local_cond" in tasks:
            feats["local_cond"] = encoder(crops, t, cond, upto, reuse.get("local_cond"))
        if "local_uncond" in tasks:
            feats["local_uncond"] = encoder(crops, t, uncond, upto, reuse.get("local_uncond"))
    return feats


def _combine(terms: list[torch.Tensor], reduce: str) -> torch.Tensor:
    stacked = torch.stack(terms)
    return stacked.sum() if reduce == "sum" else stacked.mean()


def d_loss(real: dict[int, torch.Tensor], fake: dict[int, torch.Tensor], kind: str, reduce: str = "mean",
           mismatched: dict[int, torch.Tensor] | None = None, mismatch: float = 0.0) -> torch.Tensor:
    """Mean (or sum, nitro.pool.reduce) over sampled heads of the per-head loss (mean over the logit map).
    `mismatched`: conditional heads' logits on reals shown with another row's prompt (nitro.pool.mismatch). For
    those heads the fake side is (fake + mismatch x mismatched) / (1 + mismatch), the matching-aware form of Reed
    et al. 2016 at mismatch 1: real and fake sides weigh the same, so calling everything fake does not pay (adding
    the term instead, as first tried, drove the conditional heads to call every input fake: accuracy on reals
    0.2, on mismatched reals 1.0)."""
    def fake_side(x: torch.Tensor) -> torch.Tensor:
        return F.relu(1 + x).mean() if kind == "hinge" else F.softplus(x).mean()

    terms = []
    for i, r in real.items():
        real_side = F.relu(1 - r).mean() if kind == "hinge" else F.softplus(-r).mean()  # DMD2's softplus form
        if mismatched is not None and i in mismatched:
            terms.append(real_side + (fake_side(fake[i]) + mismatch * fake_side(mismatched[i])) / (1 + mismatch))
        else:
            terms.append(real_side + fake_side(fake[i]))
    return _combine(terms, reduce)


def g_loss(fake: dict[int, torch.Tensor], kind: str, reduce: str = "mean") -> torch.Tensor:
    terms = [(-f).mean() if kind == "hinge" else F.softplus(-f).mean() for f in fake.values()]
    return _combine(terms, reduce)


@torch.no_grad()
def head_accuracy(real: dict[int, torch.Tensor], fake: dict[int, torch.Tensor]) -> tuple[float, float]:
    """Share of the sampled heads' logits on the right side of 0 (real > 0, fake < 0), each head weighing the
    same: 0.5 on both is chance, whatever the loss reads."""
    acc_r = torch.stack([(r > 0).float().mean() for r in real.values()]).mean()
    acc_f = torch.stack([(f < 0).float().mean() for f in fake.values()]).mean()
    return acc_r.item(), acc_f.item()
