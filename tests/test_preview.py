"""Progressive previews use the model's tiny decoder (`vae_preview/`) when it has one, else the full VAE."""

import numpy as np
import torch

from nitrofusion.generation import GenerationRequest, new_row, step_rows
from nitrofusion.pipeline import load_pipeline
from nitrofusion.tiny import save_tiny_model


def _x0_after_one_step(pipe):
    row = new_row(GenerationRequest("a red circle", 2, 5, 64, 48), pipe.sampler, pipe.backend, pipe.shift)
    step_rows(pipe.backend, pipe.sampler, [row])
    return row.x0


def test_preview_uses_the_tiny_decoder_when_present(tmp_path):
    pipe = load_pipeline(save_tiny_model(tmp_path / "m", "sd", preview=True), device="cpu", backend="torch")
    assert pipe.model.preview_vae is not None
    x0 = _x0_after_one_step(pipe)
    preview, full = pipe.backend.preview(x0), pipe.backend.decode(x0)
    assert preview.shape == full.shape == (1, 48, 64, 3) and preview.dtype == np.uint8
    assert not np.array_equal(preview, full)
    with torch.inference_mode():
        direct = pipe.model.preview_vae.decode(x0, return_dict=False)[0]
    expected = ((direct * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(preview, expected)


def test_preview_falls_back_to_the_full_vae(pipelines):
    pipe = pipelines["sd"]
    assert pipe.model.preview_vae is None
    x0 = _x0_after_one_step(pipe)
    assert np.array_equal(pipe.backend.preview(x0), pipe.backend.decode(x0))


def test_decoder_fast_decodes_the_final_latents_with_the_tiny_decoder(tmp_path):
    """`decoder: fast` per request: the same latents as `full`, decoded by vae_preview/; alone or in a batch
    with a `full` request, each gets its own decoder."""
    from nitrofusion.engine import Engine, EngineConfig, Job

    pipe = load_pipeline(save_tiny_model(tmp_path / "m", "sd", preview=True), device="cpu", backend="torch")
    full = GenerationRequest("a red circle", 2, 5, 64, 48)
    fast = GenerationRequest("a red circle", 2, 5, 64, 48, decoder="fast")
    img_full, img_fast = pipe([full])[0], pipe([fast])[0]
    rows = [new_row(full, pipe.sampler, pipe.backend, pipe.shift)]
    while not rows[0].done:
        step_rows(pipe.backend, pipe.sampler, rows)
    assert np.array_equal(img_fast, pipe.backend.decode_fast(rows[0].latents)[0])
    assert np.array_equal(img_full, pipe.backend.decode(rows[0].latents)[0])
    assert not np.array_equal(img_fast, img_full)
    engine = Engine(pipe.backend, pipe.sampler, pipe.shift, EngineConfig(batch_wait_ms=2000, max_batch=2,
                                                                         buckets=(1, 2))).start()
    try:
        jobs = [engine.submit(Job([r])) for r in (full, fast)]  # one UNet batch, two decoders
        got = [j.future.result(timeout=120)[0] for j in jobs]
    finally:
        engine.stop()
    for a, b in zip(got, (img_full, img_fast)):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
