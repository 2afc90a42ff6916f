"""`nitrofusion eval`: prompt alignment and shapes-FID for the teacher, the one-step init, NitroFusion at 1-4
steps, held-out prompts, and the 1-step ablations; writes EVAL.md with sample grids and loss curves.

Every row uses the same prompts and the same initial noise (fixed seeds), so rows differ only by the model and
the sampler. Rows are cached as JSON under <work>/eval/, so a rerun only computes what is missing (or changed:
the cache key holds the row's definition and image count).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig, apply_overrides
from .detector import detect
from .eval_stats import RESAMPLES, cell, fid_ci, paired_difference_ci, paired_fid_difference_ci, proportion_ci
from .features import extract, frechet_distance, load_feature_net
from .shapes import Attributes, ShapesDataset, prompt

EVAL_OFFSET = 3 * 10**8  # dataset indices of eval prompts: disjoint from every training stream
REAL_OFFSET = 4 * 10**8  # dataset images of the FID reference side: other indices than the prompts'
SEED0 = 10**6  # image i of every row starts from the noise of seed SEED0 + i
# The validation set (bench/pick_run.py, bench/teacher_guidance.py --validation): for choosing among runs without
# choosing on the eval set. Prompts, reals and noise seeds disjoint from training streams and from the above.
VAL_OFFSET = 5 * 10**8
VAL_REAL_OFFSET = 6 * 10**8
VAL_SEED0 = 2 * 10**6
ATTRS = ("background", "colour", "shape", "position", "size", "fill")

# 1-step ablations (paper Sec. 3.2 design choices), each a stage-3 run of phase 1 only from the same init.
ABLATIONS: dict[str, list[str]] = {
    "single head": ["nitro.pool.single_head=true"],
    "pool without refresh": ["nitro.pool.refresh_fraction=0"],
    "global heads only": ['nitro.pool.tasks=["global_cond"]'],
    "conditional heads only": ['nitro.pool.tasks=["global_cond","local_cond"]'],
    "adversarial only (the paper: no L2 term)": ["nitro.reg_weight=0"],
    # Named for what is taken away: the other terms (the L2 anchor, and the DMD term where the recipe has one) stay.
    "no discriminator signal": ["nitro.adv_weight=0"],
}
# Controls trained on the main run's whole schedule (every bottom-up phase), scored at 1 and 4 steps: does the
# discriminator's signal matter there, where the phase-1 ablations cannot tell?
CONTROLS: dict[str, list[str]] = {
    "no discriminator signal, every phase": ["nitro.adv_weight=0"],
}


@dataclass
class Row:
    name: str
    kind: str  # teacher | student
    unet: str  # folder, relative to the work dir
    steps: int
    split: str = "train"  # prompts from the training combinations or the held-out ones
    group: str = "main"  # main | heldout | ablation

    @property
    def slug(self) -> str:
        return slug(self.name)


@dataclass
class Result:
    row: Row
    images: int
    alignment: float
    per_attribute: dict[str, float]
    fid: float
    seconds: float
    # 95% percentile-bootstrap intervals over the row's images (trainer/eval_stats.py); None in old caches.
    alignment_ci: tuple[float, float] | None = None
    fid_ci: tuple[float, float] | None = None
    hits: list[bool] | None = None  # per image: all attributes right (for paired comparisons); None in old caches
    # Per image: the 128-d shapes-FID features, and the reference side's, for paired FID comparisons. Kept beside
    # the JSON cache as eval/<row>.feats.npy (not in it); None in old caches.
    features: np.ndarray | None = field(default=None, repr=False, compare=False)
    reference: np.ndarray | None = field(default=None, repr=False, compare=False)

    def record(self) -> dict:
        """What the JSON cache keeps: everything but the feature arrays."""
        return {k: v for k, v in asdict(self).items() if k not in ("features", "reference")}


def default_rows(cfg: TrainConfig, work: Path, ablations: bool) -> list[Row]:
    from .stage3 import PHASE1_DIR

    t = cfg.teacher.sample_steps
    rows = [Row(f"teacher ({t} steps, guidance {cfg.teacher.guidance_scale:g})", "teacher", "teacher/unet", t),
            Row("one-step init", "student", "init/unet", 1)]
    rows += [Row(f"NitroFusion {k} step{'s' if k > 1 else ''}", "student", "nitro/unet", k) for k in (1, 2, 3, 4)]
    rows += [Row(f"held-out: teacher ({t} steps)", "teacher", "teacher/unet", t, "heldout", "heldout"),
             Row("held-out: one-step init", "student", "init/unet", 1, "heldout", "heldout"),
             Row("held-out: NitroFusion 1 step", "student", "nitro/unet", 1, "heldout", "heldout"),
             Row("held-out: NitroFusion 4 steps", "student", "nitro/unet", 4, "heldout", "heldout")]
    if ablations:
        rows.append(Row("full pool, phase 1 only (reference)", "student", f"nitro/{PHASE1_DIR}", 1,
                        group="ablation"))
        rows += [Row(name, "student", f"ablations/{slug(name)}/unet", 1, group="ablation") for name in ABLATIONS]
        rows += [Row(f"{name}, {k} step{'s' if k > 1 else ''}", "student", f"ablations/{slug(name)}/unet", k,
                     group="control") for name in CONTROLS for k in (1, 4)]
    return rows


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def dataset(cfg: TrainConfig, split: str) -> ShapesDataset:
    return ShapesDataset(cfg.data.image_size, cfg.data.seed, split, cfg.data.heldout_fraction)


def run_config_file(work: Path) -> Path | None:
    """The config a training work folder ran with: its latest stage's train_config.json (None: no trained stage)."""
    return next((work / s / "train_config.json" for s in ("nitro", "init", "teacher")
                 if (work / s / "train_config.json").is_file()), None)


def eval_attributes(cfg: TrainConfig, split: str, n: int, offset: int = EVAL_OFFSET) -> list[Attributes]:
    """The attributes of the first n eval prompts of `split`, in the order every row scores them."""
    data = dataset(cfg, split)
    return [data.attributes(offset + i)[0] for i in range(n)]


def eval_set(cfg: TrainConfig, split: str, n: int, offset: int = EVAL_OFFSET,
             seed0: int = SEED0) -> tuple[list[str], list[Attributes], torch.Tensor]:
    """Prompts, their attributes and one fixed noise tensor per image (seeded by the image's index). `offset`,
    `seed0`: VAL_OFFSET, VAL_SEED0 for the validation set."""
    attrs = eval_attributes(cfg, split, n, offset)
    latent = cfg.data.image_size // cfg.autoencoder.scale_factor
    noise = torch.stack([torch.randn((cfg.autoencoder.latent_channels, latent, latent),
                                     generator=torch.Generator().manual_seed(seed0 + i)) for i in range(n)])
    return [prompt(a) for a in attrs], attrs, noise


def real_images(cfg: TrainConfig, split: str, n: int, offset: int = REAL_OFFSET) -> np.ndarray:
    """The FID reference side; `offset`: VAL_REAL_OFFSET for the validation set."""
    data = dataset(cfg, split)
    return np.stack([data[offset + i][0] for i in range(n)])


@torch.no_grad()
def generate(row: Row, cfg: TrainConfig, work: Path, model_dir: Path, frozen: dict, prompts: list[str],
             noise: torch.Tensor, batch: int = 200, device: str = "cpu") -> np.ndarray:
    """(N, H, W, 3) uint8 images for one row.

    Students run through the inference pipeline itself (`nitrofusion.pipeline`, the exported model with the
    row's UNet swapped in), so image i is exactly `nitrofusion generate --backend torch --seed SEED0+i --steps k`. The teacher
    runs the trainer's DPM-Solver++ with classifier-free guidance from the same initial noise."""
    if row.kind == "student":
        from nitrofusion.generation import GenerationRequest
        from nitrofusion.pipeline import load_pipeline

        pipe = load_pipeline(model_dir, work / row.unet / "diffusion_pytorch_model.safetensors", device=device,
                             backend="torch", dtype="float32")
        side = cfg.data.image_size
        reqs = [GenerationRequest(p, row.steps, SEED0 + i, side, side) for i, p in enumerate(prompts)]
        return np.stack([im for start in range(0, len(reqs), batch) for im in pipe(reqs[start:start + batch])])

    from diffusers import UNet2DConditionModel

    from .stage1 import decode_latents, sample_teacher

    unet = UNet2DConditionModel.from_pretrained(work / row.unet).eval().requires_grad_(False)
    out = []
    for start in range(0, len(prompts), batch):
        x0 = sample_teacher(unet, frozen["text"], prompts[start:start + batch], noise[start:start + batch],
                            row.steps, cfg.teacher.guidance_scale)
        img = decode_latents(frozen["vae"], x0)
        out.append(((img.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())
    return np.concatenate(out)


def detections(images: np.ndarray, attrs: list[Attributes]) -> dict[str, np.ndarray]:
    """Per image, per attribute (and "all"): did the detector read back what the prompt asked for."""
    hits = {k: np.zeros(len(attrs), bool) for k in (*ATTRS, "all")}
    for i, (im, a) in enumerate(zip(images, attrs)):
        for k, ok in detect(im).matches(a).items():
            hits[k][i] = bool(ok)
    return hits


def alignment(images: np.ndarray, attrs: list[Attributes]) -> tuple[float, dict[str, float]]:
    hits = detections(images, attrs)
    n = max(1, len(attrs))
    return hits["all"].sum() / n, {k: hits[k].sum() / n for k in ATTRS}


def score(row: Row, images: np.ndarray, attrs: list[Attributes], net, real_feats: np.ndarray,
          seconds: float = 0.0) -> Result:
    """Alignment and shapes-FID of one row's images, each with its bootstrap interval."""
    hits = detections(images, attrs)
    n = max(1, len(attrs))
    feats = extract(net, images)
    return Result(row, len(images), float(hits["all"].sum() / n), {k: float(hits[k].sum() / n) for k in ATTRS},
                  frechet_distance(feats, real_feats), seconds, proportion_ci(hits["all"]),
                  fid_ci(feats, real_feats), [bool(h) for h in hits["all"]], feats, real_feats)


def train_ablations(cfg: TrainConfig, work: Path, log=print, names: list[str] | None = None) -> None:
    """Each ablation: stage 3 for phase 1 only (as many iterations as the main run's phase 1); each control: the
    whole schedule. All from the same init and seeds, into <work>/ablations/<name>/. Resumable like every stage.
    `names`: a subset (to spread the runs over processes)."""
    from .loop import make_accelerator
    from .recipe import stage_dirs
    from .source import ShapesSource
    from .stage3 import train_nitro

    acc = make_accelerator(cfg.run)
    d = stage_dirs(work)
    phase1 = f"nitro.phase_steps=[{cfg.nitro.phase_steps[0]}]"
    runs = {**{n: [*o, phase1] for n, o in ABLATIONS.items()}, **CONTROLS}
    for name, overrides in runs.items():
        if names is not None and name not in names:
            continue
        folder = work / "ablations" / slug(name)
        if (folder / "unet").is_dir():
            continue
        log(f"[eval] training ablation: {name} ({', '.join(overrides)})")
        sub = apply_overrides(cfg, overrides)
        train_nitro(sub, folder, ShapesSource(sub, work), d["init"] / "unet", d["cache"], acc)


def evaluate(cfg: TrainConfig, work: Path, model_dir: Path, n: int, ablations: bool, assets: Path,
             log=print, ablation_names: list[str] | None = None) -> list[Result]:
    """`ablation_names`: train only these ablations / controls (rows of the others are skipped unless trained
    earlier)."""
    from .recipe import frozen_dirs
    from .stage1 import load_frozen

    work = Path(work)
    if ablations:
        train_ablations(cfg, work, log, ablation_names)
    frozen = load_frozen(frozen_dirs(work), "cpu")
    net = load_feature_net()
    cache_dir = work / "eval"
    cache_dir.mkdir(parents=True, exist_ok=True)
    sets: dict[str, tuple] = {}
    real_feats: dict[str, np.ndarray] = {}
    grids: dict[str, np.ndarray] = {}
    results = []
    for row in default_rows(cfg, work, ablations):
        if not (work / row.unet).is_dir():
            log(f"[eval] skipping {row.name}: {work / row.unet} does not exist")
            continue
        if row.split not in sets:
            sets[row.split] = eval_set(cfg, row.split, n)
            real_feats[row.split] = extract(net, real_images(cfg, row.split, n))
            # for bench/compare_runs.py's paired FID differences between work folders
            np.save(cache_dir / f"reference_{row.split}.feats.npy", real_feats[row.split].astype(np.float32))
        prompts, attrs, noise = sets[row.split]
        key = {"row": asdict(row), "images": n, "unet_mtime": (work / row.unet).stat().st_mtime,
               "bootstrap": RESAMPLES}
        cached = cache_dir / f"{row.slug}.json"
        grid_file = cache_dir / f"{row.slug}.npy"
        if cached.is_file() and grid_file.is_file() and json.loads(cached.read_text()).get("key") == key:
            r = json.loads(cached.read_text())["result"]
            fields = ("images", "alignment", "per_attribute", "fid", "seconds", "alignment_ci", "fid_ci")
            feats_file = cache_dir / f"{row.slug}.feats.npy"
            feats = np.load(feats_file) if feats_file.is_file() else None
            results.append(Result(row=row, **{k: r[k] for k in fields}, hits=r.get("hits"), features=feats,
                                  reference=real_feats[row.split] if feats is not None else None))
            grids[row.slug] = np.load(grid_file)
            log(f"[eval] {row.name}: cached")
            continue
        t0 = time.monotonic()
        images = generate(row, cfg, work, Path(model_dir), frozen, prompts, noise)
        res = score(row, images, attrs, net, real_feats[row.split])
        res.seconds = round(time.monotonic() - t0, 1)
        cached.write_text(json.dumps({"key": key, "result": res.record()}, indent=1) + "\n")
        np.save(cache_dir / f"{row.slug}.feats.npy", res.features.astype(np.float32))
        np.save(grid_file, images[:32])
        grids[row.slug] = images[:32]
        results.append(res)
        log(f"[eval] {row.name}: alignment {cell(res.alignment, res.alignment_ci, 100, unit='%')}, "
            f"FID {cell(res.fid, res.fid_ci, fmt='.2f')} ({res.seconds:.0f} s)")
    # The floor: FID between two independent sets of dataset images (the eval prompts' own images vs the
    # reference side); their alignment is the detector's accuracy on real images.
    data = dataset(cfg, "train")
    data_imgs = np.stack([data[EVAL_OFFSET + i][0] for i in range(n)])
    if "train" not in real_feats:
        sets["train"] = eval_set(cfg, "train", n)
        real_feats["train"] = extract(net, real_images(cfg, "train", n))
    results.insert(0, score(Row("dataset images (FID floor)", "data", "", 0), data_imgs, sets["train"][1], net,
                            real_feats["train"]))
    grids["dataset"] = data_imgs[:32]
    write_pictures(results, grids, assets, work)
    return results


def write_pictures(results: list[Result], grids: dict[str, np.ndarray], assets: Path, work: Path) -> None:
    """assets/samples_<row>.png (4 x 8, first 32 eval seeds), assets/compare.png (a row per model, the same 8
    prompts and seeds), assets/loss_curves.png."""
    from PIL import Image, ImageDraw

    assets.mkdir(parents=True, exist_ok=True)
    scale = 2  # 64-pixel images are small on a screen; nearest-neighbour keeps pixels honest

    def tile(images: np.ndarray, cols: int) -> Image.Image:
        h, w = images.shape[1:3]
        rows = -(-len(images) // cols)
        canvas = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
        for i, im in enumerate(images):
            r, c = divmod(i, cols)
            canvas[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = im
        img = Image.fromarray(canvas)
        return img.resize((img.width * scale, img.height * scale), Image.NEAREST)

    for res in results:
        key = "dataset" if res.row.kind == "data" else res.row.slug
        if key in grids:
            tile(grids[key], 8).save(assets / f"samples_{key}.png")
    main = [r for r in results if r.row.group in ("main",) or r.row.kind == "data"]
    main += [r for r in results if r.row.group in ("ablation", "control")]
    label_w = 300
    strips = []
    for r in main:
        key = "dataset" if r.row.kind == "data" else r.row.slug
        strip = tile(grids[key][:8], 8)
        canvas = Image.new("RGB", (label_w + strip.width, strip.height), "white")
        canvas.paste(strip, (label_w, 0))
        ImageDraw.Draw(canvas).text((6, strip.height // 2 - 6), r.row.name, fill="black")
        strips.append(canvas)
    if strips:
        out = Image.new("RGB", (strips[0].width, sum(s.height for s in strips)), "white")
        y = 0
        for s in strips:
            out.paste(s, (0, y))
            y += s.height
        out.save(assets / "compare.png")
    from .eval_plots import plot_losses

    plot_losses(work, assets / "loss_curves.png")


CONTROL_1, CONTROL_4 = (f"{next(iter(CONTROLS))}, {k}" for k in ("1 step", "4 steps"))


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def _difference(a: Result, b: Result) -> str:
    """a's alignment minus b's, in points, with the paired 95% interval when both rows kept their per-image hits."""
    d = (a.alignment - b.alignment) * 100
    if a.hits is None or b.hits is None or len(a.hits) != len(b.hits):
        return f"{d:+.1f} points"
    lo, hi = paired_difference_ci(a.hits, b.hits)
    return f"{d:+.1f} points [{lo * 100:+.1f}, {hi * 100:+.1f}] (paired)"


def _fid_difference(a: Result, b: Result) -> tuple[str, tuple[float, float] | None]:
    """a's FID minus b's with the paired 95% interval (trainer/eval_stats.paired_fid_difference_ci) when both rows
    kept their per-image features against the same reference; else the plain difference and None."""
    d = a.fid - b.fid
    if a.features is None or b.features is None or a.reference is None or a.features.shape != b.features.shape:
        return f"{d:+.2f}", None
    ci = paired_fid_difference_ci(a.features, b.features, a.reference)
    return f"{d:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}] (paired)", ci


def target_lines(by_name: dict[str, Result], teacher: Result) -> list[str]:
    """Issue 15's targets, each with its measured value and whether it is met. "Beyond the interval": the paired
    95% interval of the difference excludes 0, for alignment and (rows with per-image features) for FID, the same
    images resampled for both rows as they share prompts and seeds. Rows without features (old caches) fall back
    to "the two rows' own FID intervals do not overlap", which is far stricter than a 95% test of the difference
    (before 2026-12-01 EVAL.md judged FID only that way)."""
    one, four = by_name["NitroFusion 1 step"], by_name.get("NitroFusion 4 steps")
    init, held = by_name.get("one-step init"), by_name.get("held-out: NitroFusion 1 step")
    out = [f"- 1-step alignment >= 95%: **{one.alignment * 100:.1f}%** ({_met(one.alignment >= 0.95)})"]
    if held:
        out.append(f"- held-out combinations, 1 step, >= 85%: **{held.alignment * 100:.1f}%** "
                   f"({_met(held.alignment >= 0.85)})")
    if four:
        out.append(f"- 4-step alignment >= the 1-step figure: **{four.alignment * 100:.1f}% vs "
                   f"{one.alignment * 100:.1f}%**, {_difference(four, one)} ({_met(four.alignment >= one.alignment)})")
    out.append(f"- 1-step FID within 1.25x of the teacher: **{one.fid:.2f} vs {teacher.fid:.2f} = "
               f"{one.fid / teacher.fid:.2f}x** ({_met(one.fid <= 1.25 * teacher.fid)})")
    if init:
        out.append(f"- 1-step FID better than the one-step init: **{one.fid:.2f} vs {init.fid:.2f}**, "
                   f"{_fid_difference(one, init)[0]} ({_met(one.fid < init.fid)})")
    for name, mine in ((CONTROL_1, one), (CONTROL_4, four)):
        control = by_name.get(name)
        if control is None or mine is None:
            continue
        steps = name.rsplit(", ", 1)[1]
        beyond_align = control.hits is not None and mine.hits is not None and \
            paired_difference_ci(mine.hits, control.hits)[0] > 0
        fid_text, fid_paired = _fid_difference(mine, control)
        if fid_paired is not None:
            beyond_fid = fid_paired[1] < 0
        else:
            beyond_fid = mine.fid_ci is not None and control.fid_ci is not None and mine.fid_ci[1] < control.fid_ci[0]
        out.append(f"- full method vs the no-discriminator control, {steps}, better beyond the 95% interval: "
                   f"alignment **{mine.alignment * 100:.1f}% vs {control.alignment * 100:.1f}%**, "
                   f"{_difference(mine, control)}; FID **{cell(mine.fid, mine.fid_ci, fmt='.2f')} vs "
                   f"{cell(control.fid, control.fid_ci, fmt='.2f')}**, {fid_text} "
                   f"({_met(beyond_align or beyond_fid)})")
    return out


def write_markdown(results: list[Result], path: Path, assets: Path, command: str, cfg: TrainConfig) -> None:
    from .stage3 import stage3_seed

    rel = Path(assets).relative_to(Path(path).parent) if Path(assets).is_relative_to(Path(path).parent) else assets
    by_name = {r.row.name: r for r in results}
    teacher = next((r for r in results if r.row.kind == "teacher" and r.row.group == "main"), None)
    lines = [
        f"# Measured quality of the bundled model (`{cfg.recipe}` recipe)",
        "",
        (f"Made by `{command}` on {time.strftime('%Y-%m-%d')}. {results[0].images} images per row, the same "
        "prompts and seeds in every row. Images are "
        f"{cfg.data.image_size}x{cfg.data.image_size}."),
        "",
        ("- **alignment**: share of images whose background colour, object colour, shape and position all match "
        "the prompt, read back by the deterministic detector `trainer/detector.py`; then each attribute alone."),
        ("- **shapes-FID**: Frechet distance between 128-d features of generated images and of other dataset "
        "images, features from the frozen CNN `trainer/assets/shapes_features.safetensors` "
        "(`trainer/features.py`). Lower is better; the first row is the floor (two independent dataset sets)."),
        "",
        ("- **[lo, hi]**: 95% percentile-bootstrap interval over images (1,000 resamples, fixed seed; "
        "`trainer/eval_stats.py`). Alignment resamples the row's images; FID resamples the generated images' "
        "features against the fixed reference set, so it covers the generated side's sampling noise only."),
        ("- **Targets** compare two rows by the paired 95% interval of their difference: the same images (prompt and "
        "seed) resampled for both rows, for alignment and for FID; \"beyond the interval\" means it excludes 0."),
        (f"- **one training run per row** (stage 3 seed {stage3_seed(cfg)}): the intervals cover the images, not "
        "run-to-run variation of training, which can be larger; docs/training.md compares seeds."),
        "",
        "| row | alignment | bg | colour | shape | position | size | fill | shapes-FID | FID / teacher |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    group_titles = {"heldout": "**held-out (colour, shape, background) combinations, never trained on**",
                    "ablation": "**ablations at 1 step: stage 3 phase 1 only, same init, seeds and iterations**",
                    "control": "**control: the whole stage 3 schedule without the discriminator's signal**"}
    seen_group = "main"
    for r in results:
        if r.row.group != seen_group and r.row.group in group_titles:
            lines.append(f"| {group_titles[r.row.group]} | | | | | | | | | |")
            seen_group = r.row.group
        ref = teacher
        if r.row.group == "heldout":
            ref = next((x for x in results if x.row.group == "heldout" and x.row.kind == "teacher"), teacher)
        ratio = f"{r.fid / ref.fid:.2f}x" if ref and r.row.kind != "data" and ref.fid > 0 else ""
        per = [f"{r.per_attribute.get(k, float('nan')) * 100:.1f}%" for k in ATTRS]
        align, fid = cell(r.alignment, r.alignment_ci, 100, unit="%"), cell(r.fid, r.fid_ci, fmt=".2f")
        lines.append(f"| {r.row.name} | {align} | {' | '.join(per)} | {fid} | {ratio} |")
    lines.append("")
    student = by_name.get("NitroFusion 1 step")
    if student and teacher:
        lines += ["## Targets", "", *target_lines(by_name, teacher), ""]
    lines += [
        "## Pictures",
        "",
        f"![same 8 prompts and seeds, one strip per row]({rel}/compare.png)",
        "",
        f"Training losses (raw and smoothed): ![loss curves]({rel}/loss_curves.png)",
        "",
        "Per-row grids (first 32 eval prompts): "
        + ", ".join(f"[{r.row.name}]({rel}/samples_{'dataset' if r.row.kind == 'data' else r.row.slug}.png)"
                    for r in results),
        "",
    ]
    Path(path).write_text("\n".join(lines))


__all__ = ["ABLATIONS", "CONTROLS", "Row", "default_rows", "evaluate", "frechet_distance", "write_markdown"]
