"""Two-step smoke test of every stage on tiny models, resume after a stop and after a kill, the exported student."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nitrofusion.generation import GenerationRequest
from nitrofusion.pipeline import load_pipeline
from trainer.config import STAGES, TrainConfig, apply_overrides, recipe
from trainer.recipe import run

from .helpers import CLI, kill_after_checkpoint

TRAINED = ["autoencoder", "text", "teacher", "init", "nitro"]  # stages with an optimizer and a step count
CHECKPOINT_FILES = {"autoencoder": ["vae"], "text": ["text"], "teacher": ["unet"], "init": ["unet"],
                    "nitro": ["student", "pool"]}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole tiny recipe, every stage, two steps each."""
    root = tmp_path_factory.mktemp("train")
    cfg = recipe("tiny")
    exported = run(cfg, root / "work", root / "model")
    return cfg, root / "work", exported


def test_stage3_logs_the_heads_accuracy_on_reals_and_fakes(tiny_run):
    """Every stage-3 row of metrics.csv carries the sampled heads' accuracy: the share of real logits > 0 and of
    fake logits < 0, each a fraction in [0, 1] (what says whether the pool learns; 0.5 is chance)."""
    import csv

    _, work, _ = tiny_run
    rows = list(csv.DictReader((work / "nitro" / "metrics.csv").open()))
    assert rows and {"acc_real", "acc_fake", "loss_d"} <= set(rows[0])
    for r in rows:
        assert 0.0 <= float(r["acc_real"]) <= 1.0 and 0.0 <= float(r["acc_fake"]) <= 1.0, r


def copy_stages(src: Path, dst: Path, names: list[str]) -> None:
    for n in names:
        shutil.copytree(src / n, dst / n)


def test_every_stage_leaves_checkpoint_config_and_metrics(tiny_run):
    cfg, work, _ = tiny_run
    for name in TRAINED:
        folder = work / name
        assert (folder / "DONE").is_file(), name
        state = json.loads((folder / "checkpoint" / "state.json").read_text())
        assert state["step"] == 2 and state["stage"] == name
        for module in CHECKPOINT_FILES[name]:
            assert (folder / "checkpoint" / f"{module}.safetensors").is_file()
            assert (folder / "checkpoint" / f"{module}_optimizer.pt").is_file()
        assert (folder / "checkpoint" / "rng_0.pt").is_file()
        saved = json.loads((folder / "checkpoint" / "train_config.json").read_text())
        assert saved == json.loads(json.dumps(cfg.to_dict()))
        rows = (folder / "metrics.csv").read_text().splitlines()
        assert rows[0].startswith("step,time_s") and [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    assert len(list((work / "cache").glob("chunk_*.pt"))) == 2  # 4 pairs in chunks of 2
    assert (work / "autoencoder" / "vae" / "config.json").is_file()
    assert (work / "text" / "tokenizer").is_dir() and (work / "text" / "text_encoder").is_dir()
    assert set(STAGES) == {"autoencoder", "text", "teacher", "cache", "init", "nitro", "export", "preview"}


def test_the_recipe_records_each_stage_wall_time(tiny_run):
    """WORK/stage_times.csv: one row per stage the run made, in pipeline order, each with its seconds."""
    import csv

    _, work, _ = tiny_run
    rows = list(csv.DictReader((work / "stage_times.csv").open()))
    assert [r["stage"] for r in rows] == list(STAGES)
    assert all(float(r["seconds"]) > 0 and r["finished_utc"].endswith("Z") for r in rows)


def test_exported_student_is_a_diffusers_folder_with_the_shift(tiny_run):
    cfg, _, model = tiny_run
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert comp in index and (model / comp).is_dir()
    sched = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert sched["shifted_timestep"] == cfg.nitro.shift and sched["beta_schedule"] == "scaled_linear"
    assert (model / "train_config.json").is_file()
    assert (model / "vae_preview" / "distill_config.json").is_file(), "the preview stage's tiny decoder"


def test_student_loads_through_load_pipeline_and_generates_1_to_4_steps(tiny_run):
    cfg, _, model = tiny_run
    pipe = load_pipeline(model, device="cpu")
    assert pipe.shift == cfg.nitro.shift and pipe.model.native_size == cfg.data.image_size
    prompt = "large red striped circle on the left, blue background"
    images = [pipe([GenerationRequest(prompt, s, 7, 32, 32)])[0] for s in (1, 2, 3, 4)]
    for im in images:
        assert im.shape == (32, 32, 3) and im.dtype == np.uint8
    assert not np.array_equal(images[0], images[3])
    assert np.array_equal(images[1], pipe([GenerationRequest(prompt, 2, 7, 32, 32)])[0])


def test_a_stage_without_its_final_checkpoint_keeps_the_one_before_and_the_same_output(tiny_run, tmp_path):
    """optim.checkpoint_final=false (a run short of disk at SDXL size): the stage ends DONE with the same output,
    and its checkpoint is the last periodic one (step 1 of 2), not the final one."""
    _, work, _ = tiny_run
    copy_stages(work, tmp_path, ["autoencoder", "text"])
    run(apply_overrides(recipe("tiny"), ["teacher.optim.checkpoint_final=false"]), tmp_path, tmp_path / "m", ["teacher"])
    assert (tmp_path / "teacher" / "DONE").is_file()
    assert json.loads((tmp_path / "teacher" / "checkpoint" / "state.json").read_text())["step"] == 1
    a = load_file(str(work / "teacher" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "teacher" / "unet" / "diffusion_pytorch_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("stage", ["teacher", "nitro"])
def test_resume_continues_and_matches_an_uninterrupted_run(tiny_run, tmp_path, stage, capsys):
    """Stop after step 1, resume to step 3: the same weights as three steps in one go."""
    _, work, _ = tiny_run
    deps = ["autoencoder", "text"] + (["teacher", "cache", "init"] if stage == "nitro" else [])
    key = "teacher.optim.steps" if stage == "teacher" else "nitro.phase_steps"
    value = lambda n: str(n) if stage == "teacher" else f"[{n}]"  # noqa: E731
    module = "unet" if stage == "teacher" else "student"

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for w in (straight, resumed):
        copy_stages(work, w, deps)
    run(apply_overrides(recipe("tiny"), [f"{key}={value(3)}"]), straight, tmp_path / "m1", [stage])

    run(apply_overrides(recipe("tiny"), [f"{key}={value(1)}"]), resumed, tmp_path / "m2", [stage])
    (resumed / stage / "DONE").unlink()  # as if it had been killed after the step-1 checkpoint
    capsys.readouterr()
    run(apply_overrides(recipe("tiny"), [f"{key}={value(3)}"]), resumed, tmp_path / "m2", [stage])
    assert "resumed from step 1/3" in capsys.readouterr().out
    rows = (resumed / stage / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["1", "2", "3"]  # continued, not restarted
    a = load_file(str(straight / stage / "checkpoint" / f"{module}.safetensors"))
    b = load_file(str(resumed / stage / "checkpoint" / f"{module}.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_cli_train_resumes_after_sigkill(tiny_run, tmp_path):
    """A real `nitrofusion train` process killed mid-stage picks up from its last checkpoint."""
    _, work, _ = tiny_run
    copy_stages(work, tmp_path, ["autoencoder", "text"])
    args = [*CLI, "train", "--recipe", "tiny", "--work", str(tmp_path), "--stage", "teacher"]
    state = tmp_path / "teacher" / "checkpoint" / "state.json"
    step = kill_after_checkpoint(args + ["--set", "teacher.optim.steps=100000"], state)
    done = subprocess.run(args + ["--set", f"teacher.optim.steps={step + 1}"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resumed from step {step}/{step + 1}" in done.stdout
    assert json.loads(state.read_text())["step"] == step + 1 and (tmp_path / "teacher" / "DONE").is_file()


def test_cli_rejects_bad_config_in_one_line(tmp_path):
    proc = subprocess.run([*CLI, "train", "--recipe", "tiny", "--work", str(tmp_path), "--set", "nitro.loss=l2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nitro.loss" in proc.stderr


def test_cli_names_the_missing_stage_instead_of_failing_in_a_model_load(tmp_path):
    """`--stage nitro` on a fresh work folder used to end in diffusers' OSError traceback ("couldn't connect to
    huggingface.co ... autoencoder/vae"); it now says which stage to run, before any work."""
    proc = subprocess.run([*CLI, "train", "--recipe", "tiny", "--work", str(tmp_path / "w"), "--stage", "nitro"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "stage 'nitro' needs the autoencoder stage, which has not run" in proc.stderr
    assert "--stage autoencoder" in proc.stderr
    assert not (tmp_path / "w" / "nitro").exists()


def test_missing_stage_reads_done_markers_and_what_the_call_runs_itself(tmp_path):
    """Only a stage's DONE marker counts (an interrupted stage is a folder without one); a stage run earlier in the
    same call counts as there; --init-unet drops the init stage; with --from the frozen components are the model's."""
    from trainer.recipe import missing_stage

    cfg, out = recipe("tiny"), tmp_path / "model"
    for name in ("autoencoder", "text"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "DONE").write_text("{}")
    (tmp_path / "teacher").mkdir()  # interrupted: a checkpoint, no DONE
    assert "the teacher stage, which has not finished" in missing_stage(cfg, tmp_path, out, ["cache"], STAGES)
    assert missing_stage(cfg, tmp_path, out, ["teacher", "cache", "init", "nitro"], STAGES) is None
    assert "the init stage, which has not run" in missing_stage(cfg, tmp_path, out, ["teacher", "cache", "nitro"],
                                                                STAGES)
    cfg.source.init_unet = "student.safetensors"
    assert missing_stage(cfg, tmp_path, out, ["teacher", "cache", "nitro"], STAGES) is None
    assert "needs the exported student" in missing_stage(cfg, tmp_path, out, ["preview"], STAGES)
    assert "the nitro stage, which has not run" in missing_stage(cfg, tmp_path, out, ["export"], STAGES)
    (tmp_path / "nitro").mkdir()
    (tmp_path / "nitro" / "DONE").write_text("{}")
    assert missing_stage(cfg, tmp_path, out, ["export", "preview"], STAGES) is None
    assert missing_stage(cfg, tmp_path / "fresh", out, ["cache"], ("cache", "init", "nitro", "export")) is None


def one_step_error(unet_dir: Path, work: Path, cfg) -> float:
    """MSE of a UNet's one-step output from the cached teacher noises against their teacher samples."""
    from diffusers import UNet2DConditionModel

    from nitrofusion.sampler import LCMSampler
    from trainer.models import alphas_cumprod
    from trainer.recipe import frozen_dirs
    from trainer.stage1 import load_frozen
    from trainer.stage2 import load_cache, one_step_x0

    cache = load_cache(work / "cache")
    text = load_frozen(frozen_dirs(work), "cpu")["text"]
    unet = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    with torch.no_grad():
        x0 = one_step_x0(unet, LCMSampler(alphas_cumprod()), cache["noise"], text(cache["prompts"]), cfg.nitro.shift)
    return torch.nn.functional.mse_loss(x0, cache["x0"]).item()


@pytest.mark.slow
def test_l2_term_alone_pulls_the_student_to_its_teacher_samples(tiny_run, tmp_path):
    """nitro.adv_weight=0 leaves only the L2 term: the student must get closer to the teacher's samples from the
    same noises than the init it starts from (measured: MSE 189 -> 146 on the tiny recipe)."""
    _, work, _ = tiny_run
    copy_stages(work, tmp_path, ["autoencoder", "text", "teacher", "cache", "init"])
    cfg = apply_overrides(recipe("tiny"), ["nitro.adv_weight=0", "nitro.reg_weight=1", "nitro.phase_steps=[30]",
                                           "nitro.optim.lr=1e-2"])
    run(cfg, tmp_path, tmp_path / "model", ["nitro"])
    before = one_step_error(tmp_path / "init" / "unet", tmp_path, cfg)
    after = one_step_error(tmp_path / "nitro" / "unet", tmp_path, cfg)
    assert after < 0.9 * before, (before, after)
    header = (tmp_path / "nitro" / "metrics.csv").read_text().splitlines()[0]
    assert "loss_reg" in header.split(",")


def test_dataset_reals_run_with_their_own_prompts(tiny_run, tmp_path):
    """nitro.real=data: the heads' reals come from the teacher stage's encoded dataset latents."""
    _, work, _ = tiny_run
    copy_stages(work, tmp_path, ["autoencoder", "text", "teacher", "cache", "init"])
    run(apply_overrides(recipe("tiny"), ["nitro.real=data"]), tmp_path, tmp_path / "model", ["nitro"])
    rows = (tmp_path / "nitro" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and all(np.isfinite(float(r.split(",")[3])) for r in rows[1:])  # loss_d
    with pytest.raises(ValueError, match="teacher.latent_pool"):
        shutil.rmtree(tmp_path / "nitro")
        run(apply_overrides(recipe("tiny"), ["nitro.real=data", "teacher.latent_pool=0"]), tmp_path,
            tmp_path / "model", ["nitro"])


def test_teacher_sampler_from_a_start_timestep(tiny_run):
    """sample_teacher(start=999) is the from-noise sampler exactly (same trailing timesteps); from a low start it
    keeps what the partly noised input already holds (closer to that x0 than to another sample's)."""
    from diffusers import UNet2DConditionModel

    from trainer.models import add_noise, alphas_cumprod
    from trainer.recipe import frozen_dirs
    from trainer.stage1 import load_frozen, sample_teacher

    cfg, work, _ = tiny_run
    text = load_frozen(frozen_dirs(work), "cpu")["text"]
    unet = UNet2DConditionModel.from_pretrained(work / "teacher" / "unet").eval()
    prompts = ["large red circle in the center, blue background", "small green square on the left, black background"]
    noise = torch.randn((2, cfg.autoencoder.latent_channels, 4, 4), generator=torch.Generator().manual_seed(0))
    a = sample_teacher(unet, text, prompts, noise, 5, 2.0)
    b = sample_teacher(unet, text, prompts, noise, 5, 2.0, start=999)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    x0 = torch.randn_like(noise) * 2
    t = torch.full((2,), 20)
    x = sample_teacher(unet, text, prompts, add_noise(x0, noise, t, alphas_cumprod()), 2, 2.0, start=20)
    assert (x - x0).abs().mean() < 0.5 * (x - x0.flip(0)).abs().mean()


@pytest.mark.slow
def test_multistep_l2_targets_log_only_where_they_apply(tiny_run, tmp_path):
    """reg_multistep=off: the L2 term (and its log) on 1-step iterations only; =teacher: on k-step ones too."""
    import csv

    _, work, _ = tiny_run
    seen = {}
    for mode in ("off", "teacher"):
        w = tmp_path / mode
        copy_stages(work, w, ["autoencoder", "text", "teacher", "cache", "init"])
        cfg = apply_overrides(recipe("tiny"), [f"nitro.reg_multistep={mode}", "nitro.phase_steps=[1,5]"])
        cfg.nitro.optim.log_every = 1
        run(cfg, w, w / "model", ["nitro"])
        rows = list(csv.DictReader((w / "nitro" / "metrics.csv").open()))
        multi = [float(r["loss_reg"]) for r in rows if int(r["steps"]) > 1]
        assert multi, "phase 2 drew no 2-step iteration"
        seen[mode] = multi
        assert all(np.isfinite(float(r["loss_reg"])) for r in rows if int(r["steps"]) == 1)
    assert all(np.isnan(v) for v in seen["off"]) and all(np.isfinite(v) for v in seen["teacher"])


def test_ema_student_is_exported_and_stage3_accumulates(tiny_run, tmp_path):
    """nitro.ema_decay > 0: nitro/unet is the student's moving average (decay 0.5: after two iterations the mean of
    the first two students; snapshots are the average too) and nitro/unet_raw the trained weights, the average in
    the checkpoint for resuming. With nitro.optim.grad_accum=2 each iteration runs two micro-batches."""
    _, work, _ = tiny_run
    copy_stages(work, tmp_path, ["autoencoder", "text", "teacher", "cache", "init"])
    cfg = apply_overrides(recipe("tiny"), ["nitro.ema_decay=0.5", "nitro.phase_steps=[2]", "nitro.snapshot_every=1",
                                           "nitro.optim.grad_accum=2"])
    run(cfg, tmp_path, tmp_path / "model", ["nitro"])
    weights = lambda name: load_file(str(tmp_path / "nitro" / name / "diffusion_pytorch_model.safetensors"))  # noqa: E731
    first, raw, ema = weights("unet_step1"), weights("unet_raw"), weights("unet")
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    for k in raw:
        torch.testing.assert_close(ema[k], 0.5 * first[k] + 0.5 * raw[k], rtol=1e-5, atol=1e-6, msg=k)
    assert (tmp_path / "nitro" / "checkpoint" / "student_ema.safetensors").is_file()


def test_init_feature_term_adds_the_distance_read_through_a_frozen_copy_of_the_teacher(tiny_run, tmp_path):
    """init.feature_weight > 0: each logged loss is the MSE plus the weight times the teacher-feature distance, which
    is positive for a student whose x0 differs from its target, and the frozen encoder the distance is read through
    shares no tensor with the student and trains nothing (the student starts as the teacher). Switched on when a plain init
    is resumed for more steps, metrics.csv's header widens to the new columns, the plain rows' cells left empty.
    The distance is zero for equal inputs and its gradient reaches the student's x0."""
    import csv

    from trainer.discriminator import FrozenEncoder
    from trainer.models import alphas_cumprod
    from trainer.stage2 import feature_distance

    _, work, _ = tiny_run
    copy_stages(work, tmp_path, ["autoencoder", "text", "teacher", "cache", "init"])
    steps = recipe("tiny").init.optim.steps
    (tmp_path / "init" / "DONE").unlink()
    featured_cfg = apply_overrides(recipe("tiny"), [f"init.optim.steps={steps + 2}", "init.feature_weight=0.5",
                                                    "init.feature_timesteps=[10,250]"])
    run(featured_cfg, tmp_path, tmp_path / "model", ["init"])
    rows = list(csv.DictReader((tmp_path / "init" / "metrics.csv").open()))
    assert list(rows[0]) == ["step", "time_s", "loss", "mse", "feature"]
    plain, featured = [r for r in rows if int(r["step"]) <= steps], rows[-1]
    assert plain and all(r["mse"] == r["feature"] == "" and float(r["loss"]) > 0 for r in plain)
    assert int(featured["step"]) == steps + 2 and float(featured["feature"]) > 0
    assert float(featured["loss"]) == pytest.approx(float(featured["mse"]) + 0.5 * float(featured["feature"]), rel=1e-4)

    from trainer.loop import Stage, make_accelerator
    from trainer.source import make_source
    from trainer.stage2 import InitJob

    acc = make_accelerator(featured_cfg.run)
    job = InitJob(featured_cfg, tmp_path / "probe", make_source(featured_cfg, tmp_path), tmp_path / "cache", acc)
    job.build(Stage("init", tmp_path / "probe", featured_cfg, acc, 1))
    student = {p.data_ptr() for p in job.unet.parameters()}
    assert student.isdisjoint(p.data_ptr() for p in job.encoder.parameters())
    assert all(p.requires_grad for p in job.unet.parameters())
    assert not any(p.requires_grad for p in job.encoder.parameters())

    from diffusers import UNet2DConditionModel

    from trainer.conditioning import zero_conditioning

    unet = UNet2DConditionModel.from_pretrained(work / "teacher" / "unet")
    enc = FrozenEncoder(unet)
    side = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    cond = zero_conditioning(unet.config, size=side * 8, batch=2)
    abar = alphas_cumprod()  # the shapes recipes' schedule (SDXL's)
    assert feature_distance(enc, x, x.clone(), 250, noise, cond, abar).item() == 0.0
    pred = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).requires_grad_(True)
    d = feature_distance(enc, pred, x, 250, noise, cond, abar)
    d.backward()
    assert d.item() > 0 and pred.grad.abs().sum() > 0


def test_ema_teacher_is_what_later_stages_sample(tiny_run, tmp_path):
    """teacher.ema_decay > 0: teacher/unet is the teacher's moving average (decay 0.5 over two steps: the mean of the
    one-step teacher, made by a one-step run of the same seed, and the trained weights, saved as teacher/unet_raw),
    kept in the checkpoint for resuming."""
    _, work, _ = tiny_run
    one, two = tmp_path / "one", tmp_path / "two"
    for dst in (one, two):
        copy_stages(work, dst, ["autoencoder", "text"])
    run(apply_overrides(recipe("tiny"), ["teacher.optim.steps=1"]), one, one / "model", ["teacher"])
    run(apply_overrides(recipe("tiny"), ["teacher.ema_decay=0.5"]), two, two / "model", ["teacher"])
    weights = lambda d, name: load_file(str(d / "teacher" / name / "diffusion_pytorch_model.safetensors"))  # noqa: E731
    first, raw, ema = weights(one, "unet"), weights(two, "unet_raw"), weights(two, "unet")
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    for k in raw:
        torch.testing.assert_close(ema[k], 0.5 * first[k] + 0.5 * raw[k], rtol=1e-5, atol=1e-6, msg=k)
    assert (two / "teacher" / "checkpoint" / "unet_ema.safetensors").is_file()


def test_a_4x_down_autoencoder_runs_every_stage_and_exports_its_latent_side(tmp_path):
    """Three autoencoder blocks = 4x down (issue 15: 16x16 latents at 64x64): every stage sizes its latents from
    the autoencoder, the exported pipeline reads the factor back, and the student generates full-size images."""
    cfg = apply_overrides(recipe("tiny"), ["autoencoder.block_out_channels=[8,8,8]", "autoencoder.crop_size=20",
                                           "preview.blocks=[1,0,0]"])
    assert cfg.autoencoder.scale_factor == 4
    exported = run(cfg, tmp_path / "work", tmp_path / "model")
    from diffusers import UNet2DConditionModel

    assert UNet2DConditionModel.load_config(exported / "unet")["sample_size"] == 8  # 32 px / 4
    pipe = load_pipeline(exported, device="cpu", backend="torch", dtype="float32")
    (image,) = pipe([GenerationRequest("small red solid circle in the centre, white background", 1, 0, 32, 32)])
    assert image.shape == (32, 32, 3)
    with pytest.raises(ValueError, match="multiple of 4"):
        apply_overrides(recipe("tiny"), ["autoencoder.block_out_channels=[8,8,8]", "autoencoder.crop_size=18"])


def test_pool_probe_and_teacher_guidance_benches_run_on_a_trained_work_dir(tiny_run, tmp_path, capsys):
    """bench/pool_probe.py trains each variant from the run's init and reports the heads' accuracy from its
    metrics.csv; bench/teacher_guidance.py scores the teacher at each guidance scale (issue 15's measurements)."""
    from .helpers import load_script

    _, work, _ = tiny_run
    copy_stages(work, tmp_path, ["autoencoder", "text", "teacher", "cache", "init"])
    assert load_script("bench/pool_probe.py").main(
        ["--work", str(tmp_path), "--iters", "2", "--variant", "summed=nitro.pool.reduce=sum;nitro.disc_steps=2"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| summed |"))
    acc_real, acc_fake, loss_d = (float(v) for v in row.split("|")[2:5])
    assert 0 <= acc_real <= 1 and 0 <= acc_fake <= 1 and loss_d > 0
    saved = json.loads((tmp_path / "probes" / "summed" / "train_config.json").read_text())
    assert saved["nitro"]["pool"]["reduce"] == "sum" and saved["nitro"]["disc_steps"] == 2
    assert load_script("bench/teacher_guidance.py").main(
        ["--work", str(tmp_path), "--images", "4", "--guidance", "1", "3", "--steps", "2"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "%" in line]
    assert [line.split(" | ")[0] for line in table] == ["| 1", "| 3"]
    # --unet scores another teacher folder (an EMA teacher's raw weights, or another run's teacher by its absolute
    # path); --by-fill adds each row's alignment per object size and fill; a folder that is not there fails
    shutil.copytree(tmp_path / "teacher" / "unet", tmp_path / "teacher" / "unet_raw")
    other = str(tmp_path / "teacher" / "unet_raw")
    assert load_script("bench/teacher_guidance.py").main(
        ["--work", str(tmp_path), "--images", "4", "--guidance", "3", "--steps", "2", "--unet", "teacher/unet",
         other, "--by-fill"]) == 0
    out = capsys.readouterr().out
    assert f"{other}, 4 train prompts" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| 3 |")]
    assert [r[2] for r in rows] == ["teacher/unet", other] * 2  # the main table, then the by-fill one
    assert rows[0][4] == "" and rows[1][4].startswith("+0.0 [")  # the same weights: no difference, paired
    header = next(line for line in out.splitlines() if "small striped" in line)
    assert header.startswith("| guidance | steps | unet | small solid | small striped |")
    from trainer.eval_stats import FILL_CELLS
    from trainer.evaluate import eval_set

    _, attrs, _ = eval_set(TrainConfig.load(tmp_path / "teacher" / "train_config.json"), "train", 4)
    filled = [any(a.size == s and a.fill == f for a in attrs) for s, f in FILL_CELLS]
    fill_rows = [[c.strip() for c in line.strip().strip("|").split("|")][3:]
                 for line in out.splitlines()[out.splitlines().index(header):] if line.startswith("| 3 |")]
    assert len(fill_rows) == 2 and fill_rows[0] == fill_rows[1]  # the same weights and images: the same cells
    assert [c != "" for c in fill_rows[0]] == filled and all(c.endswith("]") for c in fill_rows[0] if c)
    # --validation: the validation prompts, noise and reals (trainer.evaluate.VAL_*), not the eval set's, so the same
    # teacher gets another FID than on the eval set above
    assert load_script("bench/teacher_guidance.py").main(
        ["--work", str(tmp_path), "--images", "4", "--guidance", "3", "--steps", "2", "--validation"]) == 0
    out = capsys.readouterr().out
    assert "4 train validation prompts" in out
    (val_row,) = [line.split(" | ") for line in out.splitlines() if line.startswith("| 3 |")]
    assert val_row[2] == "teacher/unet" and val_row[5] != rows[0][5]
    from trainer.evaluate import VAL_OFFSET, VAL_REAL_OFFSET, VAL_SEED0, eval_set, real_images
    cfg = TrainConfig.load(tmp_path / "teacher" / "train_config.json")
    val_prompts, _, val_noise = eval_set(cfg, "train", 4, offset=VAL_OFFSET, seed0=VAL_SEED0)
    eval_prompts, _, eval_noise = eval_set(cfg, "train", 4)
    assert val_noise.shape == eval_noise.shape and not torch.equal(val_noise, eval_noise)
    assert len(val_prompts) == 4 and val_prompts != eval_prompts
    assert not np.array_equal(real_images(cfg, "train", 4, offset=VAL_REAL_OFFSET), real_images(cfg, "train", 4))
    with pytest.raises(OSError):
        load_script("bench/teacher_guidance.py").main(
            ["--work", str(tmp_path), "--images", "4", "--guidance", "3", "--steps", "2", "--unet", "teacher/none"])


def test_shapes16_recipe_is_4x_down_and_its_parts_agree(tmp_path):
    """`--recipe shapes16`: 16x16 latents at 64x64, a decoder level count the preview decoder matches, a UNet whose
    widths fit its GroupNorm, offset noise for its teacher; `shapes` (the bundled model's recipe) is untouched."""
    cfg = recipe("shapes16")
    assert cfg.recipe == "shapes16" and cfg.data.image_size // cfg.autoencoder.scale_factor == 16
    assert len(cfg.preview.blocks) == len(cfg.autoencoder.block_out_channels) == 3
    u = cfg.teacher.unet
    assert len(u.cross_attn) == len(u.block_out_channels) and all(c % u.norm_num_groups == 0 for c in u.block_out_channels)
    assert cfg.teacher.offset_noise > 0 and cfg.teacher.min_snr_gamma > 0
    # round 2 (docs/training.md): a bigger cache, a longer init; round 11: the init twice as long again, its last
    # 1,000 steps decaying; round 15: matching-aware whole-image heads at t* 10 on five levels, replayed fakes
    assert cfg.cache.num_pairs == 8192 and (cfg.init.optim.steps, cfg.init.optim.decay_steps) == (6000, 1000)
    pool = cfg.nitro.pool
    assert pool.tasks == ("global_cond",) and pool.timesteps == (10,) and pool.levels == (0, 1, 2, 3, 5)
    assert pool.mismatch == 1 and pool.replay == 7 and cfg.nitro.disc_steps == 1
    # rounds 19-20: the DMD term (three fake-score updates) beside heads at three times the weight
    assert (cfg.nitro.adv_weight, cfg.nitro.dmd_weight, cfg.nitro.dmd_fake_steps) == (3, 3, 3)
    shapes = recipe("shapes")
    assert shapes.autoencoder.scale_factor == 8 and shapes.teacher.offset_noise == 0 and shapes.nitro.disc_steps == 1
    cfg.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == cfg


def _stage3_students(tiny_run, tmp_path, variants: dict[str, list[str]]) -> dict[str, dict]:
    """Stage 3 (2 iterations, a high lr so small differences show) per variant, over the tiny run's earlier stages."""
    _, work, _ = tiny_run
    students = {}
    for name, sets in variants.items():
        d = tmp_path / name
        copy_stages(work, d, ["autoencoder", "text", "teacher", "cache", "init"])
        cfg = apply_overrides(recipe("tiny"), [*sets, "nitro.phase_steps=[2]", "nitro.optim.lr=1e-2"])
        run(cfg, d, d / "model", ["nitro"])
        students[name] = load_file(d / "nitro" / "unet" / "diffusion_pytorch_model.safetensors")
    return students


def test_adv_min_steps_keeps_the_heads_off_one_step_iterations(tiny_run, tmp_path):
    """nitro.adv_min_steps=2: a phase of 1-step iterations trains the student exactly as the no-discriminator
    control does (the heads still train beside it), while the full method's heads move it elsewhere."""
    students = _stage3_students(tiny_run, tmp_path, {"control": ["nitro.adv_weight=0"],
                                                      "adv2": ["nitro.adv_min_steps=2"], "full": []})
    for k, v in students["control"].items():
        torch.testing.assert_close(students["adv2"][k], v, rtol=0, atol=0, msg=k)
    assert any(not torch.equal(students["full"][k], v) for k, v in students["control"].items())
    with pytest.raises(ValueError, match="adv_min_steps"):
        apply_overrides(recipe("tiny"), ["nitro.adv_min_steps=2", "nitro.reg_weight=0"])


def test_reg_weight_end_fades_the_l2_anchor_linearly_over_stage_3(tiny_run, tmp_path):
    """nitro.reg_weight_end: the L2 weight runs linearly from reg_weight (first iteration) to it (last). A fade to
    reg_weight itself trains the same student, bit for bit, as no fade; a fade to 0 trains another."""
    c = apply_overrides(recipe("shapes16"), ["nitro.reg_weight_end=1"]).nitro
    n = sum(c.phase_steps)
    assert [c.reg_weight_at(i) for i in (0, n - 1)] == [10.0, 1.0]
    assert c.reg_weight_at((n - 1) // 2) == pytest.approx(5.5, abs=0.01) and c.reg_weight_at(n + 5) == 1.0
    assert recipe("shapes16").nitro.reg_weight_at(n - 1) == 10.0  # default: no fade
    students = _stage3_students(tiny_run, tmp_path, {"plain": [], "same": ["nitro.reg_weight_end=10"],
                                                      "to0": ["nitro.reg_weight_end=0"]})
    for k, v in students["plain"].items():
        torch.testing.assert_close(students["same"][k], v, rtol=0, atol=0, msg=k)
    assert any(not torch.equal(students["to0"][k], v) for k, v in students["plain"].items())
    for bad in (["nitro.reg_weight_end=-1"], ["nitro.reg_weight=0", "nitro.reg_weight_end=1"]):
        with pytest.raises(ValueError, match="reg_weight_end"):
            apply_overrides(recipe("tiny"), bad)


def test_replay_changes_only_the_heads_update_and_stats_heads_train_end_to_end(tiny_run, tmp_path):
    """nitro.pool.replay=1: over 2 iterations the student is the plain run's, bit for bit (the first iteration has
    nothing to replay, and the replayed rows' draws come after the iteration's own), while the heads, trained on the
    second iteration with the first's fakes too, end elsewhere. nitro.pool.head_kind=stats runs stage 3 end to end
    and its heads move the student."""
    students = _stage3_students(tiny_run, tmp_path, {"plain": [], "replay": ["nitro.pool.replay=1"],
                                                      "stats": ["nitro.pool.head_kind=stats"]})
    for k, v in students["plain"].items():
        torch.testing.assert_close(students["replay"][k], v, rtol=0, atol=0, msg=k)
    assert any(not torch.equal(students["stats"][k], v) for k, v in students["plain"].items())
    pools = {name: load_file(tmp_path / name / "nitro" / "checkpoint" / "pool.safetensors") for name in students}
    assert pools["plain"].keys() == pools["replay"].keys()
    assert any(not torch.equal(pools["replay"][k], v) for k, v in pools["plain"].items())
    assert any(k.endswith(".mean") for k in pools["stats"])  # the stats heads' running statistics are checkpointed


def test_nitro_seed_reseeds_stage_3_alone(tiny_run, tmp_path):
    """nitro.seed=3 trains stage 3 exactly as run.seed=3 would (the same student, bit for bit) over the same earlier
    stages, and differently from run.seed=0: a recipe can name the stage-3 run behind its model."""
    students = _stage3_students(tiny_run, tmp_path, {"nitro3": ["nitro.seed=3"], "run3": ["run.seed=3"],
                                                      "run0": []})
    for k, v in students["run3"].items():
        torch.testing.assert_close(students["nitro3"][k], v, rtol=0, atol=0, msg=k)
    assert any(not torch.equal(students["run0"][k], v) for k, v in students["run3"].items())
    with pytest.raises(ValueError, match="nitro.seed"):
        apply_overrides(recipe("tiny"), ["nitro.seed=-1"])


def test_nitro_small_patterned_weight_weights_stage_3_draws_alone(tiny_run, tmp_path):
    """nitro.small_patterned_weight=2 trains stage 3 exactly as cache.small_patterned_weight=2 does over the same
    init (bit for bit), and nitro.small_patterned_weight=1 undoes a cache weight of 2 for stage 3, while the init
    keeps the cache's weight (round 28 measured it; docs/training.md)."""
    students = _stage3_students(tiny_run, tmp_path, {
        "nitro2": ["nitro.small_patterned_weight=2"], "cache2": ["cache.small_patterned_weight=2"],
        "plain": [], "cache2_nitro1": ["cache.small_patterned_weight=2", "nitro.small_patterned_weight=1"]})
    for k, v in students["cache2"].items():
        torch.testing.assert_close(students["nitro2"][k], v, rtol=0, atol=0, msg=k)
        torch.testing.assert_close(students["cache2_nitro1"][k], students["plain"][k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(students["plain"][k], v) for k, v in students["nitro2"].items())
    cfg = apply_overrides(recipe("tiny"), ["cache.small_patterned_weight=3", "nitro.small_patterned_weight=2"])
    assert (cfg.cache_draw_weight("init"), cfg.cache_draw_weight("nitro")) == (3, 2)

    from trainer.cache import PairCache
    from trainer.loop import Stage, make_accelerator
    from trainer.source import make_source
    from trainer.stage2 import InitJob

    work, acc = tmp_path / "plain", make_accelerator(cfg.run)
    init = InitJob(cfg, tmp_path / "probe", make_source(cfg, work), work / "cache", acc)
    stage = Stage("init", tmp_path / "probe", cfg, acc, 1)
    init.build(stage)
    init.start(stage)  # the init's own cache draws: the cache's weight 3, not stage 3's 2
    torch.testing.assert_close(init.cache.weights, PairCache(work / "cache", small_patterned_weight=3).weights)
    assert recipe("tiny").cache_draw_weight("nitro") == recipe("tiny").cache_draw_weight("init") == 1
    with pytest.raises(ValueError, match="nitro.small_patterned_weight"):
        apply_overrides(recipe("tiny"), ["nitro.small_patterned_weight=0"])


def test_head_probe_shows_a_trained_pool_fresh_latents_from_each_source(tiny_run, capsys):
    """bench/head_probe.py: the run's pool judges dataset latents, teacher samples and students' one-step outputs
    with one shared noise and crop draw, so the run's own student shown again under another name gets the very same
    row; AUCs are fractions; --linear adds the converged logistic-regression table. A folder that is not a finished
    stage-3 run is a message and exit code 2."""
    from .helpers import load_script

    _, work, _ = tiny_run
    probe = load_script("bench/head_probe.py")
    assert probe.main(["--work", str(work), "--images", "8", "--batch", "4", "--linear",
                       "--student", f"again={work / 'nitro' / 'unet'}"]) == 0
    out = capsys.readouterr().out
    out, per_column = out.split("AUC vs dataset latents per column")
    table = [line for line in out.splitlines() if line.startswith("| ") and "dataset latents" not in line]
    shares = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in table if line.startswith(("| teacher", "| this",
                                                                                                   "| its", "| again"))}
    assert shares["this run's student, 1 step"] == shares["again, 1 step"]
    assert {"teacher samples (the cache)", "its one-step init, 1 step"} <= set(shares)
    for row in shares.values():
        assert 0.0 <= float(row[-1].strip(" |")) <= 1.0, row
    assert "logistic regression" in out and "| again, 1 step |" in out
    columns = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in per_column.splitlines()
               if line.startswith(("| this", "| again"))}
    assert columns["this run's student, 1 step"] == columns["again, 1 step"]
    assert all(0.0 <= float(v.strip(" |")) <= 1.0 for v in columns["again, 1 step"])
    assert probe.main(["--work", str(work / "teacher")]) == 2
    assert "not found" in capsys.readouterr().err
    assert probe.main(["--work", str(work), "--student", str(work / "nitro" / "unet")]) == 2
    assert "NAME=UNET_DIR" in capsys.readouterr().err


def test_head_learnability_trains_both_head_kinds_on_fixed_features_and_is_reproducible(tiny_run, capsys):
    """bench/head_learnability.py: patch and stats heads trained online on one fixed set of encoder features, held-out
    AUCs as "median / best" fractions for each optimiser setting, beside the converged logistic regression; seeded,
    so a second run prints the same table. A folder that is not a finished run, or too few images, is exit code 2."""
    from .helpers import load_script

    _, work, _ = tiny_run
    bench = load_script("bench/head_learnability.py")
    args = ["--work", str(work), "--images", "64", "--updates", "3", "--batch", "32"]
    assert bench.main(args) == 0
    first = capsys.readouterr().out
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in first.splitlines()
            if line.startswith(("| patch", "| stats"))}
    assert set(rows) == {"patch", "stats"}
    for cells in rows.values():
        assert len(cells) == len(bench.SETTINGS)
        for cell in cells:
            median, best = (float(v) for v in cell.strip(" |").split(" / "))
            assert 0.0 <= median <= best <= 1.0
    assert "converged logistic regression" in first
    assert bench.main(args) == 0
    assert capsys.readouterr().out == first
    assert bench.main([*args, "--per-level"]) == 0  # one AUC per encoder level, for nitro.pool.levels
    levels = [line for line in capsys.readouterr().out.splitlines() if line[:3] in {f"| {i}" for i in range(10)}]
    assert [int(line.split(" | ")[0][2:]) for line in levels] == list(range(len(levels))) and len(levels) >= 2
    assert all(0.0 <= float(c) <= 1.0 for line in levels for c in line.strip(" |").split(" | ")[2:])
    assert bench.main(["--work", str(work / "teacher")]) == 2
    assert "not found" in capsys.readouterr().err
    assert bench.main(["--work", str(work), "--images", "8"]) == 2
    assert "at least 64" in capsys.readouterr().err


def test_phase_draw_decides_which_step_counts_each_phase_trains():
    """nitro.phase_draw: phase 1 always trains 1 step. Phase p >= 2 draws k ~ U{1..p} ("all", the recipe: the same
    draws as before the option), k ~ U{2..p} ("multi": the 1-step map trains in phase 1 only), k = p ("newest") or
    k = 1 half the time and else k ~ U{2..p} ("half_one")."""
    from trainer.stage3 import draw_steps

    def counts(mode: str) -> dict[int, set[int]]:
        c = apply_overrides(recipe("shapes16"), [f"nitro.phase_draw={mode}", "nitro.phase_steps=[5,200,200,200]"]).nitro
        gen, seen = torch.Generator().manual_seed(0), {}
        for i in range(sum(c.phase_steps)):
            seen.setdefault(c.max_steps_at(i), set()).add(draw_steps(c, i, gen))
        return seen

    assert recipe("shapes16").nitro.phase_draw == "all"
    assert counts("all") == {1: {1}, 2: {1, 2}, 3: {1, 2, 3}, 4: {1, 2, 3, 4}}
    assert counts("multi") == {1: {1}, 2: {2}, 3: {2, 3}, 4: {2, 3, 4}}
    assert counts("newest") == {1: {1}, 2: {2}, 3: {3}, 4: {4}}
    assert counts("half_one") == counts("all")
    c = apply_overrides(recipe("shapes16"), ["nitro.phase_draw=half_one"]).nitro
    gen, last = torch.Generator().manual_seed(0), sum(c.phase_steps) - 1
    ks = [draw_steps(c, last, gen) for _ in range(4000)]
    assert [ks.count(k) / 4000 for k in (1, 2, 3, 4)] == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6], abs=0.03)
    # "all" draws what stage 3 drew before the option existed: 1 + randint(phase) from the shared generator
    c = recipe("shapes16").nitro
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ks = [draw_steps(c, i, g1) for i in range(sum(c.phase_steps))]
    assert ks == [1 + int(torch.randint(c.max_steps_at(i), (1,), generator=g2)) for i in range(len(ks))]
    with pytest.raises(ValueError, match="phase_draw"):
        apply_overrides(recipe("tiny"), ["nitro.phase_draw=first"])
