#!/usr/bin/env python3
"""Turn the repository's pinned requirements into what a Docker image installs.

    image_requirements.py [--skip FILE]... [--from-image NAME]... [--constraints OUT] REQUIREMENTS > OUT

(--skip and --from-image may be repeated, or take a comma-separated list.)

- follows `-r` includes from REQUIREMENTS (requirements.txt), leaving out the included files named by
  --skip (e.g. deploy.txt: linters are not part of an image);
- drops the packages named by --from-image (e.g. torch, triton, tensorrt on NVIDIA's PyTorch image: the
  image's own CUDA builds stay) and, with --constraints, writes `name==installed-version` for each of
  them that is installed, so that pip cannot replace them while it resolves the other pins;
- writes the remaining requirement lines, comments and blanks removed, to standard output.

Standard library only: it runs on the base image's Python before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: Path, skip: set[str], seen: set[Path] | None = None) -> list[str]:
    """Requirement lines of `path` and of the files it includes with -r, in order, without comments."""
    seen = set() if seen is None else seen
    path = path.resolve()
    if path in seen:
        return []
    seen.add(path)
    lines: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        include = re.match(r"^(?:-r|--requirement)[\s=]+(\S+)$", line)
        if include:
            target = path.parent / include.group(1)
            if target.name not in skip:
                lines.extend(read_requirements(target, skip, seen))
            continue
        lines.append(line)
    return lines


def requirement_name(line: str) -> str | None:
    if line.startswith("-"):  # an option line (--index-url, -c ...): kept as it is
        return None
    m = _NAME.match(line)
    return canonical(m.group(1)) if m else None


def split(lines: list[str], from_image: set[str]) -> tuple[list[str], list[str]]:
    """(lines to install, names of the packages the image provides)."""
    keep: list[str] = []
    dropped: list[str] = []
    for line in lines:
        name = requirement_name(line)
        if name is not None and name in from_image:
            dropped.append(name)
        elif line not in keep:  # the same pin in two files (e.g. tqdm in core and trainer) once
            keep.append(line)
    return keep, dropped


def installed_pins(names: list[str]) -> list[str]:
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def _names(values: list[str]) -> set[str]:
    """Repeated options, each of which may also hold a comma- or space-separated list."""
    return {n for v in values for n in re.split(r"[,\s]+", v) if n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("requirements", type=Path)
    ap.add_argument("--skip", action="append", default=[], metavar="FILE",
                    help="an included requirements file (by file name) to leave out")
    ap.add_argument("--from-image", action="append", default=[], metavar="NAME",
                    help="a package the base image provides: not installed, and constrained to its version")
    ap.add_argument("--constraints", type=Path, metavar="OUT",
                    help="write pins of the installed --from-image packages here")
    args = ap.parse_args(argv)

    from_image = {canonical(n) for n in _names(args.from_image)}
    keep, dropped = split(read_requirements(args.requirements, _names(args.skip)), from_image)
    if args.constraints is not None:
        names = sorted(from_image | set(dropped))
        args.constraints.write_text("".join(f"{p}\n" for p in installed_pins(names)))
    sys.stdout.write("".join(f"{line}\n" for line in keep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
