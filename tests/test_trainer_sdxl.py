"""Stage 3 on SDXL and SD1.x UNets (nitrofusion.tiny): SDXL conditioning reaching the student and the heads, gradient
accumulation equal to one big batch, 8-bit Adam's missing-dependency error, and the SDXL training benchmark."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from nitrofusion.sampler import LCMSampler
from nitrofusion.tiny import tiny_pipeline, tiny_unet
from trainer.conditioning import Conditioning, SDXLTextEncoder, expand, unet_kwargs
from trainer.config import NitroConfig, OptimConfig, PoolConfig, RunConfig
from trainer.discriminator import FrozenEncoder, HeadPool
from trainer.loop import make_accelerator
from trainer.models import TextEncoderWrapper, alphas_cumprod
from trainer.nitro_step import (
    Batch,
    NitroNets,
    Plan,
    discriminator_backward,
    discriminator_step,
    draw_noises,
    generator_backward,
    student_x0,
)
from trainer.skeleton import accumulate, make_optimizer

from .helpers import ROOT, load_script

LATENT, SIZE = 8, 64
PROMPTS = ["a red circle", "a blue square", "a photo of the cat", "a green dog"]


def build(family: str):
    """Tiny student, teacher encoder, head pool and text encoding of one family, on the CPU."""
    pipe = tiny_pipeline(family, seed=0)
    torch.manual_seed(1)
    encoder = FrozenEncoder(tiny_unet(family))
    if family == "sdxl":
        text = SDXLTextEncoder([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], SIZE,
                               "cpu")
    else:
        text = TextEncoderWrapper(pipe.tokenizer, pipe.text_encoder, "cpu")
    cfg = NitroConfig(pool=PoolConfig(heads_per_slot=1, head_channels=8), reg_weight=1.0, phase_steps=(4,))
    pool = HeadPool(cfg.pool, encoder.shapes(LATENT))
    student = pipe.unet.train()
    nets = NitroNets(make_accelerator(RunConfig(device="cpu")), student, student, encoder, pool, pool,
                     torch.optim.SGD(student.parameters(), lr=0.0), torch.optim.SGD(pool.parameters(), lr=0.0),
                     LCMSampler(alphas_cumprod()))
    return nets, text, cfg


def make_batch(nets, text, cfg, steps: int, seed: int = 0) -> tuple[Plan, Batch]:
    gen = torch.Generator().manual_seed(seed)
    heads = nets.raw_pool.sample(250, gen)
    plan = Plan(250, heads, steps, cfg.reg_weight, nets.raw_pool.tasks_of(heads))
    shape = (len(PROMPTS), 4, LATENT, LATENT)
    noise, target, real = (torch.randn(shape, generator=gen) for _ in range(3))
    cond = text(PROMPTS)
    return plan, Batch(noise, target, PROMPTS, cond, real, cond, expand(text([""]), len(PROMPTS)),
                       *draw_noises(gen, shape, plan, cfg))


def test_sdxl_text_encoding_has_pooled_time_ids_and_a_zero_empty_prompt():
    _, text, _ = build("sdxl")
    cond = text(PROMPTS[:2])
    assert cond.embeds.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)  # 32 + 32 wide encoders; projection
    assert cond.time_ids.tolist() == [[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2  # original size, crop (0, 0), target
    empty = text([""])
    assert not empty.embeds.any() and not empty.pooled.any()  # SDXL base's force_zeros_for_empty_prompt
    assert set(unet_kwargs(cond)) == {"encoder_hidden_states", "added_cond_kwargs"}
    assert set(unet_kwargs(Conditioning(cond.embeds))) == {"encoder_hidden_states"}


def test_sdxl_pooled_embedding_and_time_ids_reach_the_student_and_the_heads():
    """Changing only the pooled embedding, or only the time ids, must change the student's x0, every encoder level
    past conv_in and the heads' logits: a path that dropped either would leave them equal."""
    nets, text, cfg = build("sdxl")
    plan, batch = make_batch(nets, text, cfg, steps=1)
    cond = batch.cond
    variants = {"pooled": Conditioning(cond.embeds, cond.pooled + 1.0, cond.time_ids),
                "time_ids": Conditioning(cond.embeds, cond.pooled, cond.time_ids * 0.5)}
    t = torch.full((len(PROMPTS),), 250)
    with torch.no_grad():
        x0 = student_x0(nets.student, nets.sampler, batch.noise, cond, 1, 250, [])
        feats = nets.encoder(batch.real, t, cond)
        logits = nets.pool({task: feats for task in plan.tasks}, plan.heads)
        for name, other in variants.items():
            assert not torch.allclose(x0, student_x0(nets.student, nets.sampler, batch.noise, other, 1, 250, [])), name
            feats2 = nets.encoder(batch.real, t, other)
            assert torch.equal(feats[0], feats2[0])  # conv_in: before any conditioning
            assert nets.encoder.prompt_free_blocks == 0  # so the matching-aware pool reuses only conv_in
            assert all(not torch.allclose(a, b) for a, b in zip(feats[1:], feats2[1:])), name
            logits2 = nets.pool({task: feats2 for task in plan.tasks}, plan.heads)
            deep = [h for h in plan.heads if nets.raw_pool.slot_of(h)[1] > 0]
            assert all(not torch.allclose(logits[h], logits2[h]) for h in deep), name
    with pytest.raises(ValueError, match="pooled"):
        nets.encoder(batch.real, t, Conditioning(cond.embeds))


def grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("family", "steps", "mismatch"), [("sdxl", 1, 0), ("sdxl", 2, 0), ("sd", 2, 0), ("sd", 1, 1)])
def test_two_micro_batches_of_two_equal_one_batch_of_four(family, steps, mismatch):
    """Gradient accumulation: the generator's gradient into the student and the discriminator's into the heads are
    the same for one batch of 4 and for 2 accumulated micro-batches of 2 (same rows, same noise). With
    nitro.pool.mismatch the reals' borrowed prompts pair up over the whole batch, so that holds too."""
    nets, text, cfg = build(family)
    cfg.pool.mismatch = mismatch
    plan, batch = make_batch(nets, text, cfg, steps)
    results = []
    for micro in (4, 2):
        nets.student.zero_grad(set_to_none=True)
        nets.pool.zero_grad(set_to_none=True)
        fake, logs = generator_backward(nets, plan, batch, cfg, micro)
        g = grads(nets.student)
        nets.pool.zero_grad(set_to_none=True)
        loss_d = discriminator_backward(nets, plan, batch, fake, cfg, micro)
        results.append((fake, logs, g, grads(nets.pool), loss_d))
    (fake_a, logs_a, g_a, d_a, ld_a), (fake_b, logs_b, g_b, d_b, ld_b) = results
    torch.testing.assert_close(fake_a, fake_b, rtol=1e-5, atol=1e-5)
    assert logs_a["loss_g"] == pytest.approx(logs_b["loss_g"], rel=1e-5)
    assert logs_a["loss_reg"] == pytest.approx(logs_b["loss_reg"], rel=1e-5) and ld_a == pytest.approx(ld_b, rel=1e-5)
    assert g_a.keys() == g_b.keys() and len(g_a) > 10 and d_a.keys() == d_b.keys() and d_a
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], rtol=1e-4, atol=1e-6, msg=name)
    for name in d_a:
        torch.testing.assert_close(d_a[name], d_b[name], rtol=1e-4, atol=1e-6, msg=name)
    assert ("acc_mismatch" in ld_a) == bool(mismatch)
    with pytest.raises(ValueError, match="micro-batches of 3"):
        generator_backward(nets, plan, batch, cfg, 3)


def test_mismatched_prompts_train_only_the_conditional_heads():
    """nitro.pool.mismatch adds reals shown with another row's prompt as fakes: the conditional heads' gradients
    change, the unconditional heads' (which never see the prompt) stay exactly as without it."""
    nets, text, cfg = build("sd")
    plan, batch = make_batch(nets, text, cfg, 1)
    fake = batch.target.clone()
    out = {}
    for w in (0.0, 1.0):
        cfg.pool.mismatch = w
        nets.pool.zero_grad(set_to_none=True)
        logs = discriminator_backward(nets, plan, batch, fake, cfg, len(batch))
        out[w] = (grads(nets.pool), logs)
    (g0, logs0), (g1, logs1) = out[0.0], out[1.0]
    assert g0.keys() == g1.keys() and 0 <= logs1["acc_mismatch"] <= 1 and "acc_mismatch" not in logs0
    assert logs1["acc_real"] == logs0["acc_real"] and logs1["loss_d"] != logs0["loss_d"]
    tasks = {name: nets.raw_pool.slot_of(int(name.split(".")[1]))[2] for name in g0}
    cond = [n for n in g0 if tasks[n] != "local_uncond"]
    uncond = [n for n in g0 if tasks[n] == "local_uncond"]
    assert cond and uncond
    for n in uncond:
        torch.testing.assert_close(g0[n], g1[n], rtol=0, atol=0, msg=n)
    assert any(not torch.allclose(g0[n], g1[n], rtol=1e-3, atol=1e-5) for n in cond)


def test_skeleton_accumulation_equals_one_batch():
    """The single-network stages' accumulate(): k micro-batches of n == one batch of k*n."""
    acc = make_accelerator(RunConfig(device="cpu"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    got = []
    for n in (1, 4):
        model.zero_grad()
        rows = 8 // n
        logs = accumulate(acc, model, n, lambda i, r=rows: (
            loss := torch.nn.functional.mse_loss(model(x[i * r:(i + 1) * r]), y[i * r:(i + 1) * r]), {"loss": loss}))
        got.append(([p.grad.clone() for p in model.parameters()], logs["loss"]))
    for a, b in zip(got[0][0], got[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert got[0][1] == pytest.approx(got[1][1], rel=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_8bit_adam_without_bitsandbytes_says_what_to_install():
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], OptimConfig(optimizer="adamw8bit"))
    with pytest.raises(ValueError, match="optim.optimizer"):
        OptimConfig(optimizer="sgd")


def test_fused_adamw_takes_the_loops_steps():
    """optim.fused (the default): AdamW's fused kernel, the same update as the per-tensor loop up to rounding, over
    several steps with weight decay; off, or for parameters it cannot take, the loop."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    fused = make_optimizer([torch.nn.Parameter(p.detach().clone()) for p in ps], OptimConfig(weight_decay=0.01))
    loop = make_optimizer([torch.nn.Parameter(p.detach().clone()) for p in ps],
                          OptimConfig(weight_decay=0.01, fused=False))
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    for step in range(5):
        grads = [torch.randn_like(p) for p in ps]
        for opt in (fused, loop):
            for q, g in zip(opt.param_groups[0]["params"], grads):
                q.grad = g.clone()
            opt.step()
    for a, b, p in zip(fused.param_groups[0]["params"], loop.param_groups[0]["params"], ps):
        assert not torch.equal(a, p)  # they moved
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    mixed = make_optimizer([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)),
                           torch.nn.Parameter(torch.zeros(2))], OptimConfig())
    assert mixed.defaults["fused"]  # float64 and float32 alike
    meta = make_optimizer([torch.nn.Parameter(torch.zeros(2, device="meta"))], OptimConfig())
    assert not meta.defaults["fused"]


def test_training_benchmark_runs_tiny_on_the_cpu(tmp_path):
    """bench/train_sdxl.py --tiny: the GPU benchmark's code path (SDXL conditioning, bf16 autocast, bf16 frozen
    encoder, the largest-batch search) on tiny models. A subprocess: it sets its own accelerator and threads."""
    out, md = tmp_path / "r.json", tmp_path / "b.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_sdxl.py"), "--tiny", "--json", str(out),
                           "--markdown", str(md)], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = data["results"]
    assert {(r["size"], r["batch"]) for r in rows} == {(64, 1), (64, 2), (64, 3), (32, 1), (32, 2), (32, 3)}
    assert all(r["status"] == "ok" and r["s_per_iter"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert data["meta"]["complete"] and data["meta"]["largest"] == {"64": "3 (search stopped: max batch or budget)",
                                                                    "32": "3 (search stopped: max batch or budget)"}
    assert data["meta"]["params"]["64"]["pool_heads"] == 4 * 5 * 3 * 4  # t* x levels x tasks x replicas
    text = md.read_text()
    assert text.startswith("\n## Stage-3 training, SDXL architecture") and "| 64^2 | 3 |" in text


def test_benchmark_search_finds_the_largest_batch_that_fits_and_survives_out_of_memory():
    """The search grows x1.5 from the last fitting batch, then bisects; an out-of-memory case is recorded, not fatal."""
    from types import SimpleNamespace

    bench_mod = load_script("bench/train_sdxl.py")

    class FakeBench:
        cuda, size = False, 1024
        opt_g = opt_d = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
        def iteration(self, b):
            if b > 13:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return {"gen_s": 0.1 * b, "opt_s": 0.01, "disc_s": 0.05 * b}

    args = SimpleNamespace(warmup=1, iters=3, case_budget_s=60.0, max_batch=64)
    rows = []
    fake = FakeBench()
    largest = bench_mod.search(fake, 5, args, float("inf"), lambda r: rows.append(r) or r)
    assert largest == 13
    assert [(r["batch"], r["status"]) for r in rows] == [(8, "ok"), (12, "ok"), (18, "oom"), (15, "oom"),
                                                         (13, "ok"), (14, "oom")]
    assert all(r["runs"] == 1 for r in rows if r["status"] == "ok")  # one timed iteration per search case
    assert rows[0]["s_per_iter"] == pytest.approx(0.8 + 0.01 + 0.4)


@pytest.mark.slow  # a whole --smoke run in a process (~12 s)
def test_from_smoke_benchmark_runs_tiny_on_the_cpu(tmp_path):
    """bench/train_from_smoke.py --tiny --lean-disk: every stage of `train --from --smoke` and one image from the
    export; init's checkpoint sized and then deleted, stage 3's never written (as on the GPU's 64 GiB disk)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_from_smoke.py"), "--tiny", "--lean-disk",
                           "--dir", str(tmp_path / "run"), "--json", str(tmp_path / "r.json"), "--markdown",
                           str(tmp_path / "r.md")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert list(result["stages"]) == ["cache", "init", "nitro", "export", "generate"] and result["image_size"] == 32
    assert result["stages"]["generate"]["shape"] == [32, 32, 3]
    assert "| nitro |" in (tmp_path / "r.md").read_text()
    assert "checkpoint_gb" in result["stages"]["init"] and "checkpoint_gb" not in result["stages"]["nitro"]
    assert not (tmp_path / "run" / "work" / "init" / "checkpoint").exists()
    assert not (tmp_path / "run" / "work" / "nitro" / "checkpoint").exists()
    assert (tmp_path / "run" / "work" / "nitro" / "DONE").is_file()


def test_discriminator_step_logs_what_the_heads_made_of_the_batch_before_training_on_it():
    """With nitro.disc_steps > 1 the heads update several times on one batch; the logged loss and accuracy are the
    first update's (rows the heads have not fitted), not the last's, which judged rows they had just trained on."""
    nets, text, cfg = build("sd")
    cfg.disc_steps = 4
    plan, batch = make_batch(nets, text, cfg, 1)
    fake = batch.target.clone()
    before = {k: v.clone() for k, v in nets.pool.state_dict().items()}
    fresh = discriminator_backward(nets, plan, batch, fake, cfg, len(batch))  # update 0's views, no step taken
    nets.pool.zero_grad(set_to_none=True)
    nets.opt_d = torch.optim.SGD(nets.pool.parameters(), lr=0.5)
    logs = discriminator_step(nets, plan, batch, fake, cfg, len(batch))
    assert logs == fresh
    after = nets.pool.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in before.items())  # the heads did train, four times
    fitted = discriminator_backward(nets, plan, batch, fake, cfg, len(batch), 3)
    assert fitted["loss_d"] < fresh["loss_d"]


def test_replayed_fakes_join_the_heads_update_but_not_its_logged_accuracy():
    """nitro.pool.replay: `DiscBatch.with_past` appends earlier iterations' fakes (and as many more reals, with fresh
    views) after this iteration's rows, which keep their own views. The heads' loss and gradient then include the
    replayed rows, while the logged accuracy is the one the heads score on this iteration's rows alone."""
    nets, text, cfg = build("sd")
    plan, batch = make_batch(nets, text, cfg, 1)
    fake = batch.target.clone()
    _, past = make_batch(nets, text, cfg, 1, seed=1)
    gen = torch.Generator().manual_seed(2)
    longer, longer_fake = batch.disc().with_past(fake, [(past.target, past.cond), (past.noise, past.cond)],
                                                 torch.cat([past.real, past.real]), Conditioning.cat([past.cond] * 2),
                                                 gen, plan.tasks, cfg.pool.crop_fraction)
    n = len(batch)
    assert len(longer) == 3 * n and longer_fake.shape[0] == 3 * n and longer.fresh == n
    assert torch.equal(longer_fake[:n], fake) and torch.equal(longer_fake[n:2 * n], past.target)
    head = longer.rows(slice(0, n))
    assert torch.equal(head.real, batch.real)
    assert torch.equal(head.d_views[0][1].noise, batch.d_views[0][1].noise)
    assert head.d_views[0][0].ys == batch.d_views[0][0].ys
    alone = discriminator_backward(nets, plan, batch, fake, cfg, n)
    g_alone = grads(nets.pool)
    nets.pool.zero_grad(set_to_none=True)
    replayed = discriminator_backward(nets, plan, longer, longer_fake, cfg, n)
    assert (replayed["acc_real"], replayed["acc_fake"]) == pytest.approx((alone["acc_real"], alone["acc_fake"]))
    assert replayed["loss_d"] != pytest.approx(alone["loss_d"])
    g_replayed = grads(nets.pool)
    assert any(not torch.allclose(g_alone[k], g_replayed[k]) for k in g_alone)
    with pytest.raises(ValueError, match="as many reals"):
        batch.disc().with_past(fake, [(past.target, past.cond)], past.real[:1], past.cond, gen, plan.tasks, 0.5)
    with pytest.raises(ValueError, match="replay"):
        PoolConfig(replay=-1)
