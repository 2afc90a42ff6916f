"""The optional distribution-matching term of stage 3 (trainer/dmd.py, nitro.dmd_weight): its direction against
the formula written out by hand, its loss's gradient, and stage 3 with it: checkpointed fake score, exact resume,
and runs without it unchanged."""

import copy
import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from trainer.conditioning import Conditioning
from trainer.config import apply_overrides, recipe
from trainer.dmd import DMDDraws, dmd_direction, dmd_loss, fake_score_loss
from trainer.models import alphas_cumprod
from trainer.recipe import run

EARLIER = ["autoencoder", "text", "teacher", "cache", "init"]


@pytest.fixture(scope="module")
def tiny_work(tmp_path_factory):
    """The tiny recipe's stages before stage 3, two steps each."""
    work = tmp_path_factory.mktemp("dmd") / "work"
    run(recipe("tiny"), work, work.parent / "model", EARLIER)
    return work


def _unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                attention_head_dim=4, norm_num_groups=4, cross_attention_dim=8).eval()


def _inputs(b: int = 3):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(b, 4, 4, 4, generator=g)
    cond = Conditioning(torch.randn(b, 5, 8, generator=g))
    uncond = Conditioning(torch.zeros(b, 5, 8))
    draws = DMDDraws.draw(g, tuple(x0.shape), (20, 980), 1)
    return x0, cond, uncond, draws


def test_dmd_direction_is_the_guided_teachers_pull_written_out_by_hand():
    """With the fake score a copy of the teacher, guidance g: fake - real x0 = (g - 1) sqrt(1 - a) / sqrt(a)
    (eps_cond - eps_uncond), divided per row by mean |x0 - real x0|; at guidance 1 it is exactly 0."""
    teacher = _unet(0)
    fake = copy.deepcopy(teacher)
    abar = alphas_cumprod()
    x0, cond, uncond, d = _inputs()
    assert torch.equal(dmd_direction(teacher, fake, x0, cond, uncond, d.t, d.noise, abar, 1.0), torch.zeros_like(x0))

    got = dmd_direction(teacher, fake, x0, cond, uncond, d.t, d.noise, abar, 3.0)
    a = abar[d.t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * d.noise
    with torch.no_grad():
        e_c = teacher(x_t, d.t, encoder_hidden_states=cond.embeds).sample
        e_u = teacher(x_t, d.t, encoder_hidden_states=uncond.embeds).sample
    e_real = e_u + 3.0 * (e_c - e_u)
    real = (x_t - (1 - a).sqrt() * e_real) / a.sqrt()
    want = 2.0 * (1 - a).sqrt() / a.sqrt() * (e_c - e_u) / (x0 - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert got.abs().amax() > 0


def test_dmd_loss_gradient_on_x0_is_the_direction_over_its_size():
    x0 = torch.randn(2, 4, 4, 4, requires_grad=True)
    grad = torch.randn(2, 4, 4, 4)
    dmd_loss(x0, grad).backward()
    torch.testing.assert_close(x0.grad, grad / grad.numel())


def test_fake_score_loss_is_the_epsilon_objective_and_trains_toward_the_fakes():
    """A few AdamW steps on one batch of fakes lower the fake score's loss on it; the loss is plain epsilon MSE."""
    fake = _unet(2).train()
    abar = alphas_cumprod()
    x0, cond, _, d = _inputs(4)
    t, noise = d.fake_t[0], d.fake_noise[0]
    a = abar[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        eps = fake(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=cond.embeds).sample
    first = fake_score_loss(fake, x0, cond, t, noise, abar)
    torch.testing.assert_close(first, torch.nn.functional.mse_loss(eps, noise))
    opt = torch.optim.AdamW(fake.parameters(), lr=1e-2)
    for _ in range(10):
        opt.zero_grad()
        fake_score_loss(fake, x0, cond, t, noise, abar).backward()
        opt.step()
    assert fake_score_loss(fake, x0, cond, t, noise, abar) < 0.8 * first


def _stage3(tiny_work, root, name: str, sets: list[str], steps: int = 2):
    d = root / name
    if not d.exists():
        for n in EARLIER:
            shutil.copytree(tiny_work / n, d / n)
    cfg = apply_overrides(recipe("tiny"), [*sets, f"nitro.phase_steps=[{steps}]", "nitro.optim.lr=1e-2"])
    run(cfg, d, d / "model", ["nitro"])
    return d


def test_stage3_with_the_dmd_term_trains_a_fake_score_and_moves_the_student(tiny_work, tmp_path):
    plain = _stage3(tiny_work, tmp_path, "plain", [])
    dmd = _stage3(tiny_work, tmp_path, "dmd", ["nitro.dmd_weight=1", "nitro.dmd_fake_steps=2"])
    header = (dmd / "nitro" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[-2:] == ["loss_dmd", "loss_fake"]
    assert "loss_dmd" not in (plain / "nitro" / "metrics.csv").read_text()
    fake = load_file(dmd / "nitro" / "checkpoint" / "fake_score.safetensors")
    teacher = load_file(tiny_work / "teacher" / "unet" / "diffusion_pytorch_model.safetensors")
    assert fake.keys() == teacher.keys() and any(not torch.equal(fake[k], teacher[k].float()) for k in fake)
    assert not (plain / "nitro" / "checkpoint" / "fake_score.safetensors").exists()
    a = load_file(plain / "nitro" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(dmd / "nitro" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_stage3_with_the_dmd_term_resumes_to_the_uninterrupted_run(tiny_work, tmp_path):
    sets = ["nitro.dmd_weight=1"]
    straight = _stage3(tiny_work, tmp_path, "straight", sets, steps=3)
    resumed = _stage3(tiny_work, tmp_path, "resumed", sets, steps=1)
    (resumed / "nitro" / "DONE").unlink()  # as if killed after the step-1 checkpoint
    _stage3(tiny_work, tmp_path, "resumed", sets, steps=3)
    for module in ("student", "fake_score"):
        a = load_file(straight / "nitro" / "checkpoint" / f"{module}.safetensors")
        b = load_file(resumed / "nitro" / "checkpoint" / f"{module}.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_bad_dmd_settings_fail_with_the_key():
    for bad, key in ((["nitro.dmd_weight=-1"], "dmd_weight"), (["nitro.dmd_t_range=[500,20]"], "dmd_t_range"),
                     (["nitro.dmd_fake_steps=0"], "dmd_fake_steps"),
                     (["nitro.adv_weight=0", "nitro.reg_weight=0"], "dmd_weight")):
        with pytest.raises(ValueError, match=key):
            apply_overrides(recipe("tiny"), bad)
    assert apply_overrides(recipe("tiny"), ["nitro.adv_weight=0", "nitro.reg_weight=0",
                                            "nitro.dmd_weight=1"]).nitro.dmd_weight == 1
