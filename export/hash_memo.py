"""Remembered file digests, so a 7 GB SDXL folder is not re-read on every start.

The export cache is keyed on content (export/cache.py), which means hashing every byte of the model folder and
of the cached graphs each time a server starts: gigabytes for SDXL, read again for nothing. A digest is reused while the
file's size, mtime (ns) and inode are unchanged, as git's index and make do; anything else is hashed again.
Rewriting a file in place with the same size and a forged mtime would fool it: `NITRO_REHASH=1` ignores the memo.
The memo lives beside the cache entries; a memo that cannot be read or written only costs the hashing.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from nitrofusion.artifacts.manifest import sha256_file

log = logging.getLogger(__name__)


class HashMemo:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.enabled = os.environ.get("NITRO_REHASH", "") not in ("1", "true")
        self._entries: dict[str, list] = {}
        self._dirty = False
        if self.enabled:
            try:
                data = json.loads(self.path.read_text())
                if isinstance(data, dict):
                    self._entries = data
            except (OSError, ValueError):
                pass  # absent or damaged: start empty

    def digest(self, path: Path) -> str:
        st = path.stat()
        key = str(path.resolve())
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = self._entries.get(key)
        if self.enabled and isinstance(hit, list) and len(hit) == 4 and hit[:3] == stamp:
            return hit[3]
        digest = sha256_file(path)
        self._entries[key] = [*stamp, digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        """Write the memo (atomically), dropping entries whose files are gone."""
        if not (self.enabled and self._dirty):
            return
        entries = {k: v for k, v in self._entries.items() if os.path.exists(k)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".hashes-", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f)
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError as e:
            log.debug("file-hash memo not saved (%s): the next start hashes again", e)
