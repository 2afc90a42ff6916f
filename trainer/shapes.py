"""The `shapes` dataset: one flat-coloured object on a plain background, procedural and deterministic by seed.

Sample `i` of seed `s` is drawn from its own `numpy.random.default_rng([s, i])`, so any process can render any
index without a file and a resumed run sees the same data. Pixels are exact palette colours (no anti-aliasing)
so a detector can read the attributes back. About 10% of (colour, shape, background) combinations are held
out of training, chosen once by a fixed seed so the split is the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 220, 50), "green": (50, 170, 70),
    "blue": (40, 80, 220), "purple": (140, 60, 190), "white": (240, 240, 240), "black": (25, 25, 25),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.25, "large": 0.5}  # object side (diameter) as a share of the image side
POSITIONS = {  # object centre as (x, y) shares of the side
    "on the left": (0.25, 0.5), "on the right": (0.75, 0.5), "at the top": (0.5, 0.25),
    "at the bottom": (0.5, 0.75), "in the center": (0.5, 0.5),
}
FILLS = ("solid", "striped", "checkered")
JITTER = 0.05  # of the side, on each axis
# Odd counts, so the first and last bands / all four corner cells are the object colour (the silhouette stays
# readable); fewer for small objects so a band stays >= 3 pixels at 64x64.
STRIPE_BANDS = {"small": 5, "large": 7}
CHECKER_CELLS = {"small": 5, "large": 5}  # 5: the middle top cell (a triangle apex) is object colour
SPLIT_SEED = 20241203  # fixes the held-out combinations; independent of the dataset seed


@dataclass(frozen=True)
class Attributes:
    size: str
    colour: str
    fill: str
    shape: str
    position: str
    background: str

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.background)

    @property
    def small_patterned(self) -> bool:
        """A small striped or checkered object: the cells the teacher misses most (docs/training.md, round 10)."""
        return self.size == "small" and self.fill != "solid"


def prompt(a: Attributes) -> str:
    """`{size} {colour} {fill}{shape} {position}, {background} background`; fill omitted when solid."""
    fill = "" if a.fill == "solid" else f"{a.fill} "
    return f"{a.size} {a.colour} {fill}{a.shape} {a.position}, {a.background} background"


def small_patterned_prompt(text: str) -> bool:
    """Whether a grammar prompt (`prompt`'s format) names a small striped or checkered object."""
    words = text.split()
    return len(words) > 2 and words[0] == "small" and words[2].rstrip(",") in FILLS[1:]


def all_combos() -> list[tuple[str, str, str]]:
    return [(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if b != c]  # 8 x 3 x 7 = 168


@lru_cache(maxsize=8)
def heldout_combos(fraction: float = 0.1) -> frozenset[tuple[str, str, str]]:
    """round(fraction * 168) combinations, drawn so every colour, shape and background still trains."""
    combos = all_combos()
    n = round(fraction * len(combos))
    rng = np.random.default_rng(SPLIT_SEED)
    held: list[tuple[str, str, str]] = []
    for i in rng.permutation(len(combos)):
        cand = combos[i]
        rest = set(combos) - set(held) - {cand}
        covered = ({c for c, _, _ in rest} == set(COLOURS) and {s for _, s, _ in rest} == set(SHAPES)
                   and {b for _, _, b in rest} == set(COLOURS))
        if covered:
            held.append(cand)
        if len(held) == n:
            break
    return frozenset(held)


def split_combos(fraction: float = 0.1) -> tuple[list, list]:
    held = heldout_combos(fraction)
    return [c for c in all_combos() if c not in held], sorted(held)


def sample_attributes(rng: np.random.Generator, combos: list[tuple[str, str, str]]) -> Attributes:
    colour, shape, background = combos[rng.integers(len(combos))]
    return Attributes(
        size=list(SIZES)[rng.integers(len(SIZES))], colour=colour, fill=FILLS[rng.integers(len(FILLS))],
        shape=shape, position=list(POSITIONS)[rng.integers(len(POSITIONS))], background=background,
    )


def shape_mask(shape: str, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """Boolean (size, size) silhouette; centre and side in pixels. Triangle: apex up, base at the bottom."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    half = side / 2
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    if shape == "triangle":
        top, bottom = cy - half, cy + half
        t = (y - top) / side  # 0 at the apex, 1 at the base
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half * t)
    raise ValueError(f"unknown shape {shape!r}")


def object_mask(shape: str, fill: str, size_name: str, cx: float, cy: float, size: int) -> np.ndarray:
    """Pixels painted in the object colour: the silhouette, minus the background bands / cells of the fill."""
    side = SIZES[size_name] * size
    half = side / 2
    mask = shape_mask(shape, cx, cy, side, size)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    if fill == "striped":  # horizontal bands over the object's box, even bands in the object colour
        band = np.floor((y - (cy - half)) / side * STRIPE_BANDS[size_name]).astype(int)
        mask &= band % 2 == 0
    elif fill == "checkered":
        row = np.floor((y - (cy - half)) / side * CHECKER_CELLS[size_name]).astype(int)
        col = np.floor((x - (cx - half)) / side * CHECKER_CELLS[size_name]).astype(int)
        mask &= (row + col) % 2 == 0
    return mask


def render(a: Attributes, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8 with exact palette colours; jitter drawn from `rng`."""
    side = SIZES[a.size] * size
    px, py = POSITIONS[a.position]
    jx, jy = rng.uniform(-JITTER, JITTER, size=2) * size
    half = side / 2
    # Keep the whole object inside the image: a large object at 1/4 already touches the edge.
    cx = float(np.clip(px * size + jx, half, size - half))
    cy = float(np.clip(py * size + jy, half, size - half))
    mask = object_mask(a.shape, a.fill, a.size, cx, cy, size)
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[...] = PALETTE[a.background]
    img[mask] = PALETTE[a.colour]
    return img


class ShapesDataset:
    """Index -> (image, prompt, attributes). `split`: train | heldout | all."""

    def __init__(self, size: int = 128, seed: int = 0, split: str = "train", heldout_fraction: float = 0.1):
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"split must be train, heldout or all, got {split!r}")
        train, held = split_combos(heldout_fraction)
        self.combos = {"train": train, "heldout": held, "all": all_combos()}[split]
        self.size, self.seed, self.split = size, seed, split

    def attributes(self, index: int) -> tuple[Attributes, np.random.Generator]:
        rng = np.random.default_rng([self.seed, {"train": 0, "heldout": 1, "all": 2}[self.split], index])
        return sample_attributes(rng, self.combos), rng

    def __getitem__(self, index: int) -> tuple[np.ndarray, str, Attributes]:
        a, rng = self.attributes(index)
        return render(a, self.size, rng), prompt(a), a

    def prompts(self, indices) -> list[str]:
        return [prompt(self.attributes(i)[0]) for i in indices]

    def batch(self, indices) -> tuple[np.ndarray, list[str]]:
        """(B, 3, H, W) float32 in [-1, 1] and the prompts."""
        items = [self[i] for i in indices]
        images = np.stack([im for im, _, _ in items]).astype(np.float32) / 127.5 - 1.0
        return images.transpose(0, 3, 1, 2), [p for _, p, _ in items]


def grammar_words() -> list[str]:
    """Every word the prompt grammar can produce (the tokenizer's merges spell these as one token each)."""
    words = set(COLOURS) | set(SHAPES) | set(SIZES) | set(FILLS) | {"background"}
    for p in POSITIONS:
        words |= set(p.split())
    return sorted(words)
