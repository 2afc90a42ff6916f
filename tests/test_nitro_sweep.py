"""bench/nitro_sweep.py: variant folders reuse the base's stages they do not change, and every variant's
overrides are valid config."""

from trainer.config import apply_overrides, recipe

from .helpers import load_script


def sweep_module():
    return load_script("bench/nitro_sweep.py")


def test_every_variant_is_valid_config():
    sweep = sweep_module()
    for overrides in sweep.VARIANTS.values():
        apply_overrides(recipe("shapes"), [*overrides, "nitro.phase_steps=[10]", "nitro.snapshot_every=5"])


def test_variant_folders_link_unchanged_stages_and_rebuild_what_they_override(tmp_path):
    sweep = sweep_module()
    base = tmp_path / "base"
    for stage in ("autoencoder", "text", "teacher", "cache", "init"):
        (base / stage).mkdir(parents=True)
    stages = sweep.prepare(base, tmp_path / "a", ["nitro.reg_weight=3"])
    assert stages == ["nitro"]
    for stage in ("autoencoder", "text", "teacher", "cache", "init"):
        assert (tmp_path / "a" / stage).resolve() == (base / stage).resolve()
    assert not (tmp_path / "a" / "nitro").exists()  # trained fresh in the variant's folder

    stages = sweep.prepare(base, tmp_path / "b", ["cache.num_pairs=4096"])
    assert stages == ["cache", "init", "nitro"]  # a new cache needs a new init
    assert (tmp_path / "b" / "teacher").is_symlink()
    assert not (tmp_path / "b" / "cache").exists() and not (tmp_path / "b" / "init").exists()

    assert sweep.prepare(base, tmp_path / "c", ["init.optim.steps=9"]) == ["init", "nitro"]
    assert (tmp_path / "c" / "cache").is_symlink() and not (tmp_path / "c" / "init").exists()
