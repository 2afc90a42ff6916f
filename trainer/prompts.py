"""`--prompts`: where a `--from` run's prompts (and, optionally, real images) come from.

The paper's reals are teacher samples, so prompts are all the data it needs (docs/nitrofusion-method.md,
"Training"). Two forms:
- a UTF-8 text file, one prompt a line; blank lines and lines starting with `#` are skipped. Only the byte offset
  of each prompt is kept (8 bytes a prompt), and a prompt is read from the file when it is needed, so a
  million-prompt file costs 8 MB of memory, not the strings.
- a folder of images with same-named `.txt` captions (`cat.png` + `cat.txt`, the usual fine-tuning layout): the
  captions are the prompts, and with `--set nitro.real=data` the discriminator's reals are those images, VAE-encoded
  at the training size, instead of teacher samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nitrofusion.errors import NitroError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class PromptFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise NitroError(f"prompts file not found: {self.path}")
        offsets = []
        with self.path.open("rb") as f:
            pos = 0
            for number, line in enumerate(f, start=1):
                try:
                    text = line.decode("utf-8").strip()
                except UnicodeDecodeError:
                    raise NitroError(f"prompts file {self.path} is not UTF-8 (line {number})") from None
                if text and not text.startswith("#"):
                    offsets.append(pos)
                pos += len(line)
        if not offsets:
            raise NitroError(f"prompts file {self.path} has no prompts (one a line; blank lines and # comments "
                             "are skipped)")
        self.offsets = np.asarray(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> str:
        return self.take([index])[0]

    def take(self, indices) -> list[str]:
        out = []
        with self.path.open("rb") as f:
            for i in indices:
                f.seek(int(self.offsets[i]))
                out.append(f.readline().decode("utf-8").strip())
        return out


class CaptionFolder:
    """Images with `.txt` captions beside them, in name order; images without a caption are skipped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        images = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        self.items: list[tuple[Path, str]] = []
        for image in images:
            caption = image.with_suffix(".txt")
            if caption.is_file():
                try:
                    text = " ".join(caption.read_text(encoding="utf-8").split())
                except UnicodeDecodeError:
                    raise NitroError(f"caption {caption} is not UTF-8") from None
                self.items.append((image, text))
        if not self.items:
            raise NitroError(f"prompts folder {self.path} has no image + caption pairs (e.g. cat.png and cat.txt)")

    def __len__(self) -> int:
        return len(self.items)

    def take(self, indices) -> list[str]:
        return [self.items[i][1] for i in indices]

    def image(self, index: int, size: int) -> np.ndarray:
        """(3, size, size) float32 in [-1, 1]: the image's centre square, resized (what SDXL's crop (0, 0) time id
        describes closely enough for a training set)."""
        from PIL import Image

        with Image.open(self.items[index][0]) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        return arr.transpose(2, 0, 1)


def open_prompts(path: str | Path) -> PromptFile | CaptionFolder:
    p = Path(path)
    if p.is_dir():
        return CaptionFolder(p)
    return PromptFile(p)
