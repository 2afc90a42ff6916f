"""What every stage shares: the accelerator, resumable checkpoints, per-step RNG, progress bar, CSV metrics.

Resume contract: a checkpoint holds every trained module, every optimizer, each rank's RNG state, the step and
the resolved config. Data and noise for step `s` come from generators seeded by (seed, stage, s, rank), so a
resumed run sees exactly the batches it would have seen had it not been killed.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import shutil
import time
import zlib
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import OptimConfig, RunConfig, TrainConfig

log = logging.getLogger(__name__)
DONE = "DONE"


def make_accelerator(run: RunConfig):
    """One process's Accelerator: device placement, DDP under `accelerate launch`, bf16 autocast on CUDA."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if run.threads:
        torch.set_num_threads(run.threads)
    cpu = run.device == "cpu" or (run.device == "auto" and not torch.cuda.is_available())
    mp = run.mixed_precision
    if mp == "auto":
        mp = "no" if cpu else "bf16"
    # Discriminator heads outside the sampled subset take no part in a step: DDP must allow unused params.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(cpu=cpu, mixed_precision=mp, kwargs_handlers=[ddp])


def step_generator(seed: int, stage: str, step: int, rank: int = 0) -> torch.Generator:
    """A CPU generator for one (stage, step, rank): the source of all data and noise randomness."""
    key = zlib.crc32(f"{seed}/{stage}/{step}/{rank}".encode())
    return torch.Generator("cpu").manual_seed(key)


def shared_generator(seed: int, stage: str, step: int) -> torch.Generator:
    """Same on every rank (e.g. which discriminator heads to sample and refresh): rank-free seed."""
    return step_generator(seed, stage + "/shared", step, 0)


def set_lr(optimizer, cfg: OptimConfig, step: int, base_lr: float | None = None) -> float:
    """Linear warm-up, constant, then (cfg.decay_steps > 0) a half-cosine decay to 0 over the last decay_steps."""
    lr = (base_lr or cfg.lr) * min(1.0, (step + 1) / max(1, cfg.warmup))
    decay = min(cfg.decay_steps, cfg.steps)  # an override that shortens the run keeps a decaying tail
    if decay and step >= cfg.steps - decay:
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.steps + decay) / decay)))
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr


def autocast(accelerator):
    return accelerator.autocast() if accelerator.mixed_precision != "no" else nullcontext()


def frozen_dtype(run: RunConfig, accelerator) -> torch.dtype:
    """Storage dtype of frozen networks (the teacher encoder): run.frozen_dtype, "auto" = the mixed-precision dtype
    on GPUs (half the memory; autocast computes in it anyway), float32 on the CPU."""
    name = run.frozen_dtype
    if name == "auto":
        name = accelerator.mixed_precision if accelerator.device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name, torch.float32)


def tensorboard_writer(folder: Path):
    """A TensorBoard SummaryWriter when tensorboard is installed (an optional extra), else None: metrics.csv is
    always written, TensorBoard only when it can be."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def micro_contexts(accelerator, model, n: int):
    """Gradient accumulation over n micro-steps: skip DDP's all-reduce on all but the last backward."""
    for i in range(n):
        yield i, (accelerator.no_sync(model) if i < n - 1 and accelerator.num_processes > 1 else nullcontext())


class Stage:
    """A stage's folder, checkpoint, metrics and progress bar. Modules and optimizers are registered by name."""

    def __init__(self, name: str, folder: Path, cfg: TrainConfig, accelerator, total_steps: int):
        self.name, self.folder, self.cfg, self.acc = name, Path(folder), cfg, accelerator
        self.total = total_steps
        self.step = 0
        self.log_every = 10
        self.modules: dict[str, torch.nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.extra_state: dict[str, Any] = {}
        self._bar = None
        self._tb = None  # the TensorBoard writer once opened; False when tensorboard is not installed
        self._fields: list[str] | None = None  # metrics.csv's columns once read or written
        self._t0 = time.monotonic()
        if self.acc.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()

    # -- state --------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return (self.folder / DONE).is_file()

    @property
    def ckpt_dir(self) -> Path:
        return self.folder / "checkpoint"

    def register(self, name: str, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.modules[name] = module
        if optimizer is not None:
            self.optimizers[name] = optimizer

    def gen(self, step: int | None = None) -> torch.Generator:
        return step_generator(self.cfg.run.seed, self.name, self.step if step is None else step,
                              self.acc.process_index)

    def shared_gen(self, step: int | None = None) -> torch.Generator:
        return shared_generator(self.cfg.run.seed, self.name, self.step if step is None else step)

    def save_checkpoint(self) -> None:
        """Atomic: write checkpoint.tmp, then swap it in. Called on every rank (each saves its RNG)."""
        from safetensors.torch import save_file

        tmp = self.folder / "checkpoint.tmp"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / f"rng_{self.acc.process_index}.pt")
        if self.acc.is_main_process:
            for name, module in self.modules.items():
                state = {k: v.detach().contiguous().cpu() for k, v in self.acc.unwrap_model(module).state_dict().items()}
                save_file(state, str(tmp / f"{name}.safetensors"))
            for name, opt in self.optimizers.items():
                torch.save(opt.state_dict(), tmp / f"{name}_optimizer.pt")
            torch.save(self.extra_state, tmp / "extra.pt")
            self.cfg.save(tmp / "train_config.json")
            # Written last: a checkpoint.tmp with a state.json is complete (what _recover_interrupted_save trusts).
            (tmp / "state.json").write_text(json.dumps({"stage": self.name, "step": self.step,
                                                        "world_size": self.acc.num_processes}) + "\n")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            old = self.folder / "checkpoint.old"
            shutil.rmtree(old, ignore_errors=True)  # left by a save killed while it deleted it
            if self.ckpt_dir.exists():
                self.ckpt_dir.rename(old)
            tmp.rename(self.ckpt_dir)
            shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    def _recover_interrupted_save(self) -> None:
        """A process killed between save_checkpoint's two renames leaves no checkpoint/: take the complete new one
        (checkpoint.tmp with its state.json), else the previous one (checkpoint.old)."""
        if (self.ckpt_dir / "state.json").is_file():
            return
        for candidate in (self.folder / "checkpoint.tmp", self.folder / "checkpoint.old"):
            if (candidate / "state.json").is_file():
                shutil.rmtree(self.ckpt_dir, ignore_errors=True)
                candidate.rename(self.ckpt_dir)
                return

    def load_checkpoint(self) -> bool:
        """Restore modules, optimizers, RNG and step if a checkpoint exists. Call before `accelerator.prepare`."""
        from safetensors.torch import load_file

        if self.acc.is_main_process:
            self._recover_interrupted_save()
        self.acc.wait_for_everyone()
        state_file = self.ckpt_dir / "state.json"
        if not state_file.is_file():
            return False
        state = json.loads(state_file.read_text())
        for name, module in self.modules.items():
            module.load_state_dict(load_file(str(self.ckpt_dir / f"{name}.safetensors")))
        for name, opt in self.optimizers.items():
            opt.load_state_dict(torch.load(self.ckpt_dir / f"{name}_optimizer.pt", weights_only=False))
        extra = self.ckpt_dir / "extra.pt"
        if extra.is_file():
            self.extra_state.update(torch.load(extra, weights_only=False))
        rng_file = self.ckpt_dir / f"rng_{self.acc.process_index}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=False)
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = int(state["step"])
        if state.get("world_size") != self.acc.num_processes:
            log.warning("%s: resuming a %s-process checkpoint with %d processes", self.name,
                        state.get("world_size"), self.acc.num_processes)
        if self.acc.is_main_process:
            print(f"[{self.name}] resumed from step {self.step}/{self.total}", flush=True)
        return True

    def mark_done(self) -> None:
        if self.acc.is_main_process:
            self.cfg.save(self.folder / "train_config.json")
            (self.folder / DONE).write_text(json.dumps({"step": self.step}) + "\n")
        self.acc.wait_for_everyone()

    # -- progress -----------------------------------------------------------------------------------
    def log(self, metrics: dict[str, float], force: bool = False) -> None:
        """Live losses on the bar every step; a CSV row every log_every steps (main process only)."""
        if not self.acc.is_main_process:
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.step - 1, desc=self.name, dynamic_ncols=True)
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        # To the step, not +1: the cache stage's main process logs only its own chunks (1 in world_size) and skips
        # chunks a killed run already wrote, so its bar and ETA follow the stage's step, not its own count.
        self._bar.update(self.step - self._bar.n)
        every = self.log_every
        if force or self.step % every == 0 or self.step == self.total:
            path = self.folder / "metrics.csv"
            row = {"step": self.step, "time_s": round(time.monotonic() - self._t0, 2), **metrics}
            fields = self._csv_fields(path, list(row))
            with path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=fields, restval="").writerow(row)
            if self._tb is None:
                self._tb = tensorboard_writer(self.folder / "tensorboard") or False
            if self._tb:
                for k, v in metrics.items():
                    self._tb.add_scalar(f"{self.name}/{k}", v, self.step)

    def _csv_fields(self, path: Path, keys: list[str]) -> list[str]:
        """metrics.csv's columns, the header written or widened first. A run resumed under a setting that logs more
        (init.feature_weight, say) would otherwise append rows longer than the header its first part wrote: the
        file is rewritten once with the old columns then the new ones, the old rows' new cells empty."""
        fields = self._fields
        if fields is None:
            if path.exists() and path.stat().st_size:
                with path.open(newline="") as f:
                    fields = next(csv.reader(f))
            else:
                with path.open("w", newline="") as f:
                    csv.DictWriter(f, fieldnames=keys).writeheader()
                fields = list(keys)
        if set(keys) - set(fields):
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            fields = fields + [k for k in keys if k not in fields]
            tmp = path.with_suffix(".tmp")
            with tmp.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
            tmp.replace(path)
        self._fields = fields
        return fields

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb:
            self._tb.close()
            self._tb = None

    def maybe_checkpoint(self, every: int, final: bool = True) -> None:
        if self.step == self.total:
            if final:
                self.save_checkpoint()
        elif self.step % every == 0:
            self.save_checkpoint()

