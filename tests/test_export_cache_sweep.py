"""An ONNX export killed midway leaves its work folder in the cache; the next export's start removes it, and
never the folder of an export that is still running."""

import os
import signal
import subprocess
import sys
import time

from safetensors.torch import save_file

from export import cache as export_cache

DAY = 24 * 3600


def test_sweep_removes_dead_owners_and_old_orphans_only(tmp_path):
    root = tmp_path / "onnx"
    root.mkdir()
    live, live_fd = export_cache._work_dir(root, ".live-")  # held by this process: a running export
    dead = root / ".dead-1"
    dead.mkdir()
    (dead / export_cache.OWNER_LOCK).touch()  # what a killed owner leaves: the lock file, nobody holding it
    (dead / "export").mkdir()
    fresh = root / ".fresh-1"  # no lock yet: its owner may be about to take it
    fresh.mkdir()
    old = root / ".old-1"
    old.mkdir()
    os.utime(old, (time.time() - 2 * DAY, time.time() - 2 * DAY))
    entry = root / ("0" * 32)  # a finished entry is never a work folder
    entry.mkdir()
    try:
        assert sorted(export_cache.sweep_stale(root)) == sorted([dead, old])
        assert sorted(p.name for p in root.iterdir()) == sorted([live.name, fresh.name, entry.name])
    finally:
        export_cache._release(live_fd)
    assert export_cache.sweep_stale(root) == [live]  # its owner is done (or gone): now it goes


def test_a_killed_export_leaves_nothing_behind_the_next_start(pipelines, auto_pipelines, tiny_sd_dir, tmp_path):
    """A real export in another process (the tiny SD model with its own UNet file swapped in, so a new cache
    entry), killed with SIGKILL once its work folder exists; then a start that finds its entry cached."""
    unet_file = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in pipelines["sd"].model.unet.state_dict().items()}, unet_file)
    root = export_cache.cache_root() / "onnx"
    before = {p.name for p in root.glob(".*")} if root.is_dir() else set()
    code = ("import sys; from export.cache import ensure_onnx_export; "
            "ensure_onnx_export(sys.argv[1], sys.argv[2], progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tiny_sd_dir), str(unet_file)], env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not [p for p in root.glob(".*") if p.name not in before and (p / "export").exists()]:
            assert proc.poll() is None, "the export ended before it could be killed"
            assert time.monotonic() < deadline, "no export work folder appeared"
            time.sleep(0.05)  # polling for the folder, not timing anything
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    left = [p for p in root.glob(".*") if p.name not in before]
    assert left, "the killed export left no work folder (nothing to sweep)"
    assert auto_pipelines["sd"].backend.name == "onnxruntime"  # so the tiny SD model's own entry is cached
    export_cache.ensure_onnx_export(tiny_sd_dir, progress=False)  # cached: only the sweep does anything
    assert not [p for p in left if p.exists()]
