"""The one skeleton every trained stage runs in: folder and checkpoint, modules and optimizers, resume, the loop,
save, the DONE marker. A stage supplies only what differs (a `StageJob`): what it builds, what one iteration
does, what it saves.

    run_stage(job):  Stage(...) -> done? return outputs
                     job.build(stage)            modules + optimizers, registered for the checkpoint
                     stage.load_checkpoint()     resume (modules, optimizers, RNG, step)
                     job.start(stage)            accelerator.prepare, data
                     while step < total: logs = job.iteration(stage); step += 1; log; job.after_iteration; checkpoint
                     job.finish(stage)           every rank (e.g. the autoencoder's latent scale)
                     job.save()                  main process only
                     DONE
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .config import OptimConfig, TrainConfig
from .loop import Stage, micro_contexts


class StageJob:
    """One trained stage. Subclasses set `name` and implement build / iteration / save / outputs."""

    name = ""

    def __init__(self, cfg: TrainConfig, folder: Path, accelerator):
        self.cfg, self.folder, self.acc = cfg, Path(folder), accelerator

    @property
    def optim(self) -> OptimConfig:
        raise NotImplementedError

    def total_steps(self) -> int:
        return self.optim.steps

    def outputs(self) -> Any:
        """What the stage returns (its output folder(s)), whether it ran now or was already done."""
        raise NotImplementedError

    def build(self, stage: Stage) -> None:
        """Build modules and optimizers and `stage.register` them (before the checkpoint loads into them)."""
        raise NotImplementedError

    def describe(self) -> str | None:
        """A line printed once, when the stage starts from step 0 (parameter counts)."""
        return None

    def start(self, stage: Stage) -> None:
        """After the checkpoint loaded: `accelerator.prepare`, data sources."""

    def iteration(self, stage: Stage) -> dict[str, float]:
        """One training step (forward, backward, optimizer steps) at `stage.step`; returns the metrics to log."""
        raise NotImplementedError

    def after_iteration(self, stage: Stage) -> None:
        """After the step counter advanced and the metrics were logged, before the scheduled checkpoint."""

    def finish(self, stage: Stage) -> None:
        """Every rank, after the loop, before the main process saves."""

    def save(self) -> None:
        """Main process only: write the stage's outputs."""
        raise NotImplementedError


def run_stage(job: StageJob) -> Any:
    stage = Stage(job.name, job.folder, job.cfg, job.acc, job.total_steps())
    stage.log_every = job.optim.log_every
    if stage.done:
        return job.outputs()
    job.build(stage)
    stage.load_checkpoint()
    if job.acc.is_main_process and stage.step == 0 and (line := job.describe()):
        print(f"[{job.name}] {line}", flush=True)
    job.start(stage)
    while stage.step < stage.total:
        logs = job.iteration(stage)
        stage.step += 1
        stage.log(logs)
        job.after_iteration(stage)
        stage.maybe_checkpoint(job.optim.checkpoint_every, job.optim.checkpoint_final)
    stage.close()
    job.finish(stage)
    if job.acc.is_main_process:
        job.save()
    stage.mark_done()
    return job.outputs()


def moving_average(stage: Stage, module: torch.nn.Module, decay: float, name: str) -> torch.nn.Module | None:
    """An exponential moving average of `module` (torch AveragedModel; the caller updates it after each optimizer
    step), registered as `name` before the checkpoint loads so that a resumed run keeps its average. None when
    decay is 0."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay))
    stage.register(name, ema)
    return ema


def make_optimizer(params: Iterable[torch.nn.Parameter], optim: OptimConfig,
                   betas: tuple[float, float] | None = None, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW from the stage's optim config; `optim.optimizer="adamw8bit"` swaps in bitsandbytes' 8-bit AdamW
    (optimizer state in 8 bits: 2 bytes per parameter instead of 8, what lets an SDXL student and its state fit
    next to the frozen teacher encoder on one card). bitsandbytes stays an optional install."""
    kwargs = {"lr": optim.lr if lr is None else lr, "betas": optim.betas if betas is None else betas,
              "weight_decay": optim.weight_decay}
    if optim.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ValueError("optim.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(params, **kwargs)
    return adamw(params, fused=optim.fused, **kwargs)


def adamw(params: Iterable[torch.nn.Parameter], fused: bool = True, **kwargs) -> torch.optim.AdamW:
    """torch's AdamW, its fused kernel when asked for and the parameters allow it (floating point, on a device
    that has the kernel); else the per-tensor loop."""
    params = list(params)
    if fused and not all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        fused = False
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def step_optimizer(accelerator, optimizer, params, optim: OptimConfig) -> None:
    """Clip (optim.grad_clip > 0), step, zero the gradients."""
    if optim.grad_clip:
        accelerator.clip_grad_norm_(params, optim.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def accumulate(accelerator, model, n: int,
               micro: Callable[[int], tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> dict[str, float]:
    """Gradient accumulation over n micro-batches: `micro(i)` returns (loss, metrics) for micro-batch i; each loss
    is back-propagated scaled by 1/n (DDP's all-reduce only on the last), metrics are averaged over the n.
    `micro` enters `autocast` itself, around its forward only: inputs it encodes first (prompts, VAE latents)
    stay in full precision, as they are outside the step."""
    logs: dict[str, float] = {}
    for i, ctx in micro_contexts(accelerator, model, n):
        with ctx:
            loss, metrics = micro(i)
            accelerator.backward(loss / n)
        for k, v in metrics.items():
            logs[k] = logs.get(k, 0.0) + v.item() / n
    return logs
