"""shapes-FID's feature network: a small CNN trained once to read the dataset's six attributes, then frozen.

Inception features (standard FID) know nothing about flat shapes on 64x64 plain backgrounds; a network trained
on exactly this dataset's attributes puts its feature space where the differences that matter are (colour,
shape, fill, position, size). Its weights are committed (`trainer/assets/shapes_features.safetensors`), so every
eval uses the same frozen features; `train_feature_net` rebuilds them deterministically if the file is missing.
Images of any side are resized to 64 first, so the same weights serve the 128 recipe.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .shapes import COLOURS, FILLS, POSITIONS, SHAPES, SIZES, ShapesDataset

ASSET = Path(__file__).resolve().parent / "assets" / "shapes_features.safetensors"
SIDE = 64
FEATURES = 128
GROUPS = {"size": list(SIZES), "colour": list(COLOURS), "fill": list(FILLS), "shape": list(SHAPES),
          "position": list(POSITIONS), "background": list(COLOURS)}
TRAIN_OFFSET = 5 * 10**8  # dataset indices the feature net trains on: disjoint from every trainer stage and eval


class FeatureNet(nn.Module):
    """4 stride-2 conv blocks (64 -> 4), flatten (keeps where things are), linear -> 128-d features."""

    def __init__(self):
        super().__init__()
        chans = [3, 32, 64, 128, 128]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(chans):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.GroupNorm(8, b), nn.SiLU(),
                       nn.Conv2d(b, b, 3, padding=1), nn.GroupNorm(8, b), nn.SiLU()]
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(128 * 4 * 4, FEATURES)
        self.heads = nn.ModuleDict({k: nn.Linear(FEATURES, len(v)) for k, v in GROUPS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 128)."""
        if x.shape[-1] != SIDE:
            x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", antialias=True, align_corners=False)
        return F.silu(self.proj(self.convs(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}


def to_input(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _targets(attrs) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([v.index(getattr(a, k)) for a in attrs]) for k, v in GROUPS.items()}


def train_feature_net(path: Path = ASSET, steps: int = 800, batch: int = 64, seed: int = 0,
                      log=print) -> FeatureNet:
    """Deterministic (fixed seeds); a few minutes on 2 CPU cores. Trains on all 168 combinations (it is a
    measuring instrument, not a generator), then reports held-out-index accuracy per attribute."""
    torch.manual_seed(seed)
    net = FeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    data = ShapesDataset(SIDE, seed, "all")
    for step in range(steps):
        idx = range(TRAIN_OFFSET + step * batch, TRAIN_OFFSET + (step + 1) * batch)
        items = [data[i] for i in idx]
        x = to_input(np.stack([im for im, _, _ in items]))
        tgt = _targets([a for _, _, a in items])
        out = net(x)
        loss = sum(F.cross_entropy(out[k], tgt[k]) for k in GROUPS) / len(GROUPS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"[features] step {step} loss {loss.item():.4f}")
    net.eval()
    acc = attribute_accuracy(net, data, range(TRAIN_OFFSET - 2000, TRAIN_OFFSET))
    log("[features] accuracy on unseen indices: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return net


@torch.no_grad()
def attribute_accuracy(net: FeatureNet, data: ShapesDataset, indices) -> dict[str, float]:
    items = [data[i] for i in indices]
    out = net(to_input(np.stack([im for im, _, _ in items])))
    tgt = _targets([a for _, _, a in items])
    return {k: float((out[k].argmax(1) == tgt[k]).float().mean()) for k in GROUPS}


def load_feature_net(path: Path = ASSET) -> FeatureNet:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing: run `nitrofusion eval --train-features` to rebuild it")
    net = FeatureNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)


@torch.no_grad()
def extract(net: FeatureNet, images: np.ndarray, batch: int = 250) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 128) float64."""
    return np.concatenate([net.features(to_input(images[i:i + batch])).double().numpy()
                           for i in range(0, len(images), batch)])


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2), with symmetric eigendecompositions only
    (numerically steadier than a general sqrtm, and no scipy)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_a @ sb @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())
