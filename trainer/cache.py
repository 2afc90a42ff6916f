"""Stage 2a: the teacher-sample cache, on disk in chunks, read back a batch of rows at a time.

The paper's reals are the teacher's multi-step samples (docs/nitrofusion-method.md, "Training"); the init stage
regresses on them and stage 3's heads call them real. Each chunk file holds `cache.batch_size` pairs: the noise,
the teacher's x0 from it, the prompts and (`cache.store_embeddings`) their text conditioning in fp16. Later stages
open chunks memory-mapped and gather the rows a batch draws, keeping a few chunks open, so a million-pair cache
(about 0.8 MB a pair for SDXL at 1024^2: two 4x128x128 fp32 latents and 77x2048 fp16 embeddings) is never held in
memory, and the text encoders need not be loaded after this stage. Resume: an existing chunk is never rebuilt.
"""

from __future__ import annotations

import bisect
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from .conditioning import Conditioning, expand, to
from .config import TrainConfig
from .loop import Stage, autocast, step_generator
from .shapes import small_patterned_prompt
from .stage1 import TeacherSampler, draw_pool, draw_weights

INDEX, UNCOND = "index.json", "uncond.pt"


def chunk_path(folder: Path, i: int) -> Path:
    return Path(folder) / f"chunk_{i:05d}.pt"


def build_cache(cfg: TrainConfig, folder: Path, source, accelerator) -> Path:
    """Chunks of (noise, x0, prompts[, conditioning]) under folder/, split over ranks; then index.json."""
    c, acc = cfg.cache, accelerator
    num = source.num_pairs()
    stage = Stage("cache", folder, cfg, acc, -(-num // c.batch_size))
    if stage.done:
        return folder
    frozen = source.frozen(acc.device)  # fp32: one frozen UNet in inference fits; autocast computes in bf16
    unet = frozen.teacher.to(acc.device).eval().requires_grad_(False)
    sampler = TeacherSampler.from_config(cfg.teacher, source.noise_schedule)
    side = source.latent_size
    if c.store_embeddings and acc.is_main_process and not (folder / UNCOND).is_file():
        uncond = frozen.text([""])
        torch.save({"embeds": uncond.embeds.cpu(), "pooled": None if uncond.pooled is None else uncond.pooled.cpu(),
                    "time_ids": None if uncond.time_ids is None else uncond.time_ids.cpu()}, folder / UNCOND)
    for i in range(stage.total):
        stage.step = i + 1
        path = chunk_path(folder, i)
        if i % acc.num_processes != acc.process_index or path.exists():
            continue
        n = min(c.batch_size, num - i * c.batch_size)
        prompts = source.prompts(range(i * c.batch_size, i * c.batch_size + n))
        gen = step_generator(cfg.run.seed, "cache", i)
        noise = torch.randn((n, source.latent_channels, side, side), generator=gen)
        with autocast(acc):
            cond = frozen.text(prompts)
            x0 = sampler(unet, cond, expand(frozen.text([""]), n), noise.to(acc.device), generator=gen)
        item = {"noise": noise, "x0": x0.float().cpu(), "prompts": prompts}
        if c.store_embeddings:
            item["embeds"] = cond.embeds.half().cpu()
            if cond.pooled is not None:
                item["pooled"], item["time_ids"] = cond.pooled.half().cpu(), cond.time_ids.float().cpu()
        tmp = path.with_suffix(".tmp")
        torch.save(item, tmp)
        tmp.rename(path)
        stage.log({"pairs": min((i + 1) * c.batch_size, num)})
    stage.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        (folder / INDEX).write_text(json.dumps({"pairs": num, "chunk_size": c.batch_size}) + "\n")
    stage.mark_done()
    return folder


@dataclass
class Pairs:
    noise: torch.Tensor  # (B, C, h, w)
    x0: torch.Tensor  # (B, C, h, w) the teacher's sample from that noise
    prompts: list[str]
    cond: Conditioning | None  # stored conditioning (cache.store_embeddings), else None: encode the prompts


def _conditioning(d: dict | None) -> Conditioning | None:
    if d is None or d.get("embeds") is None:
        return None
    opt = lambda t: None if t is None else t.float()  # noqa: E731
    return Conditioning(d["embeds"].float(), opt(d.get("pooled")), opt(d.get("time_ids")))


class PairCache:
    """The cache's rows by global index; chunk files opened memory-mapped on demand, `max_open` at a time.
    `small_patterned_weight` != 1 (cache.small_patterned_weight): `cache_batch` draws the rows whose prompt names a
    small striped or checkered object that many times as often as the rest."""

    def __init__(self, folder: str | Path, max_open: int = 32, small_patterned_weight: float = 1.0):
        self.folder, self.max_open = Path(folder), max_open
        index = self.folder / INDEX
        if index.is_file():
            meta = json.loads(index.read_text())
            n, size = meta["pairs"], meta["chunk_size"]
            sizes = [min(size, n - s) for s in range(0, n, size)]
            self.paths = [chunk_path(self.folder, i) for i in range(len(sizes))]
        else:  # a cache written before index.json: count each chunk's rows once
            self.paths = sorted(self.folder.glob("chunk_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
            sizes = [len(torch.load(p, mmap=True, weights_only=False)["prompts"]) for p in self.paths]
        if not self.paths:
            raise FileNotFoundError(f"no teacher pairs in {self.folder}: run the cache stage first")
        self.starts = [0]
        for s in sizes:
            self.starts.append(self.starts[-1] + s)
        self._open: OrderedDict[int, dict] = OrderedDict()
        uncond = self.folder / UNCOND
        self.uncond = _conditioning(torch.load(uncond, weights_only=False)) if uncond.is_file() else None
        self.weights = None
        if small_patterned_weight != 1:
            flags = torch.tensor([small_patterned_prompt(p) for p in self.prompts()])
            if not flags.any():
                raise ValueError(f"cache.small_patterned_weight: no prompt in {self.folder} names a small striped or "
                                 "checkered object (a setting for the shapes recipe's grammar)")
            self.weights = draw_weights(flags, small_patterned_weight)

    def __len__(self) -> int:
        return self.starts[-1]

    def prompts(self) -> list[str]:
        """Every row's prompt, in row order."""
        return [p for c in range(len(self.paths)) for p in self._chunk(c)["prompts"]]

    def _chunk(self, c: int) -> dict:
        if c in self._open:
            self._open.move_to_end(c)
        else:
            self._open[c] = torch.load(self.paths[c], mmap=True, weights_only=False)
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)  # unmapped once nothing references its tensors
        return self._open[c]

    def rows(self, indices: list[int]) -> Pairs:
        noise, x0, prompts, conds = [], [], [], []
        for k in indices:
            c = bisect.bisect_right(self.starts, k) - 1
            j, ch = k - self.starts[c], self._chunk(c)
            noise.append(ch["noise"][j])
            x0.append(ch["x0"][j])
            prompts.append(ch["prompts"][j])
            conds.append({key: ch[key][j:j + 1] if ch.get(key) is not None else None
                          for key in ("embeds", "pooled", "time_ids")})
        parts = [_conditioning(d) for d in conds]
        cond = None if any(p is None for p in parts) else Conditioning.cat(parts)
        return Pairs(torch.stack(noise), torch.stack(x0), prompts, cond)


def cache_batch(cache: PairCache, gen: torch.Generator, n: int) -> Pairs:
    """n rows drawn with replacement by `gen`: uniform (the same draw as when the whole cache was one tensor), or in
    proportion to the cache's draw weights."""
    return cache.rows(draw_pool(len(cache), n, cache.weights, gen).tolist())


def load_cache(folder: Path) -> dict:
    """Every pair in memory (small caches: tests and evaluation)."""
    cache = PairCache(folder)
    p = cache.rows(list(range(len(cache))))
    return {"noise": p.noise, "x0": p.x0, "prompts": p.prompts}


def conditioning_of(pairs: Pairs, text, device) -> Conditioning:
    """The rows' conditioning: stored in the cache, else encoded now."""
    return to(pairs.cond, device) if pairs.cond is not None else text(pairs.prompts)
