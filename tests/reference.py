"""The official NitroFusion inference recipe, as its README gives it: the reference our sampler must match."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DiffusionPipeline, LCMScheduler


class TimestepShiftLCMScheduler(LCMScheduler):
    """Verbatim behaviour of the scheduler in the NitroFusion README (an LCMScheduler subclass)."""

    def __init__(self, *args, shifted_timestep=250, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_to_config(shifted_timestep=shifted_timestep)

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.origin_timesteps = self.timesteps.clone()
        self.shifted_timesteps = (self.timesteps * self.config.shifted_timestep / self.config.num_train_timesteps).long()
        self.timesteps = self.shifted_timesteps

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if self.step_index is None:
            self._init_step_index(timestep)
        self.timesteps = self.origin_timesteps
        output = super().step(model_output, timestep, sample, generator, return_dict)
        self.timesteps = self.shifted_timesteps
        return output


def reference_image(model_dir, prompt: str, steps: int, seed: int, width: int, height: int, shift: int) -> np.ndarray:
    """diffusers' own pipeline with the README's scheduler, guidance 0, CPU fp32 -> (H, W, 3) uint8."""
    pipe = DiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.scheduler = TimestepShiftLCMScheduler.from_config(pipe.scheduler.config, shifted_timestep=shift)
    pipe.scheduler.config.original_inference_steps = 4
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=0, width=width, height=height,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return (out.images[0] * 255).round().astype(np.uint8)
