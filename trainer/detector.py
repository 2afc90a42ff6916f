"""Deterministic attribute detector for `shapes` images (real or generated): the palette is known.

Steps: (1) map each pixel to its nearest palette colour; (2) background = the commonest colour on the border;
(3) object colour = the commonest other colour, object pixels = that colour, minus isolated specks (fewer than 2 neighbours);
(4) the object pixels' box gives the centre (every fill is symmetric about it: first/last stripes and corner
cells are the object colour) and the size (nearest of 1/4, 1/2 of the side); (5) each (shape, fill) is redrawn
there with the dataset's own renderer and the best IoU with the object pixels wins; (6) the centre picks the
nearest position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shapes import COLOURS, FILLS, PALETTE, POSITIONS, SHAPES, SIZES, Attributes, object_mask

_PAL = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)  # (8, 3)


@dataclass(frozen=True)
class Detection:
    background: str
    colour: str | None
    shape: str | None
    position: str | None
    size: str | None
    fill: str | None

    def matches(self, a: Attributes) -> dict[str, bool]:
        """Per attribute, plus `all` = background, colour, shape and position (the alignment criterion)."""
        got = {k: getattr(self, k) == getattr(a, k) for k in ("background", "colour", "shape", "position",
                                                                "size", "fill")}
        got["all"] = got["background"] and got["colour"] and got["shape"] and got["position"]
        return got


def _despeckle(mask: np.ndarray, min_neighbours: int = 2) -> np.ndarray:
    """Drop pixels with fewer than `min_neighbours` set pixels in their 3x3 neighbourhood (decoder noise)."""
    p = np.pad(mask.astype(np.int32), 1)
    h, w = mask.shape
    count = sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) - mask
    return mask & (count >= min_neighbours)


def detect(image: np.ndarray) -> Detection:
    """`image`: (H, W, 3) uint8."""
    size = image.shape[0]
    dist = ((image[..., None, :].astype(np.float32) - _PAL) ** 2).sum(-1)  # (H, W, 8)
    labels = dist.argmin(-1)  # (H, W)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    bg = int(np.bincount(border, minlength=len(COLOURS)).argmax())
    counts = np.bincount(labels.ravel(), minlength=len(COLOURS))
    counts[bg] = 0
    if counts.max() == 0:
        return Detection(COLOURS[bg], None, None, None, None, None)
    fg = int(counts.argmax())
    mask = _despeckle(labels == fg)
    if mask.sum() < 4:
        return Detection(COLOURS[bg], COLOURS[fg], None, None, None, None)

    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2  # every fill keeps the box symmetric about the object's centre
    side = max(x1 - x0, y1 - y0) / size
    size_name = min(SIZES, key=lambda k: abs(SIZES[k] - side))
    # The generator is known: redraw every (shape, fill) at this centre and size, keep the best IoU.
    best, best_iou = ("circle", "solid"), -1.0
    for shape in SHAPES:
        for fill in FILLS:
            tmpl = object_mask(shape, fill, size_name, cx, cy, size)
            iou = (tmpl & mask).sum() / max(1, (tmpl | mask).sum())
            if iou > best_iou:
                best, best_iou = (shape, fill), iou
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx / size) ** 2 + (POSITIONS[p][1] - cy / size) ** 2)
    return Detection(COLOURS[bg], COLOURS[fg], best[0], position, size_name, best[1])
