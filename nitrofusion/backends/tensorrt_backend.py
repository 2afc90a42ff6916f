"""TensorRT backend: one engine per component, one static profile per (batch bucket, size), CUDA-graph
replay per profile. Written against TensorRT 10's Python API (tensor-name IO, execute_async_v3).

Rows are padded up to the profile's batch (the bucket) and the padded outputs dropped. A call whose shape
no profile covers raises ShapeOutsideProfiles (an InvalidRequest: HTTP 422), before any GPU work.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..artifacts.engines import (
    EngineManifest,
    Profile,
    component_profiles,
    plan_profiles,
    require_tensorrt,
    select_profile,
)
from ..artifacts.manifest import read_manifest
from ..errors import NitroError
from ..models import LoadedModel
from .base import Backend, Conditioning
from .torch_backend import to_uint8

log = logging.getLogger(__name__)


class _Engine:
    """One deserialized engine: an execution context, static IO buffers and a CUDA graph per profile."""

    def __init__(self, trt, runtime, path: Path, profiles, inputs: dict[str, dict], stream: torch.cuda.Stream):
        self.trt, self.path, self.profiles, self.inputs, self.stream = trt, path, profiles, inputs, stream
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise NitroError(f"TensorRT could not load {path}; delete it to rebuild")
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._slots: dict = {}  # profile -> (context, buffers, graph or None)
        # One scratch buffer for every profile's context: they run one at a time on one stream, so sharing
        # it keeps activation memory at one profile's worth instead of one per bucket.
        size = getattr(self.engine, "device_memory_size_v2", None) or self.engine.device_memory_size
        self._scratch = torch.empty(int(size), dtype=torch.uint8, device="cuda")

    def _slot(self, profile):
        if profile in self._slots:
            return self._slots[profile]
        index = self.profiles.index(profile)
        ctx = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if hasattr(ctx, "set_device_memory"):  # TensorRT >= 10.1
            ctx.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
        else:
            ctx.device_memory = self._scratch.data_ptr()
        ctx.set_optimization_profile_async(index, self.stream.cuda_stream)
        buffers = {}
        for name, shape in profile.shapes(self.inputs).items():
            ctx.set_input_shape(name, shape)
        for name in self.names:
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
            ctx.set_tensor_address(name, buffers[name].data_ptr())
        self._slots[profile] = [ctx, buffers, None]
        return self._slots[profile]

    def __call__(self, profile, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Copy feeds into the profile's static buffers (padding rows), replay its graph, return outputs."""
        slot = self._slot(profile)
        ctx, buffers, graph = slot
        with torch.cuda.stream(self.stream):
            for name, value in feeds.items():
                buf = buffers[name]
                n = value.shape[0]
                buf[:n].copy_(value, non_blocking=True)
                if n < buf.shape[0]:
                    buf[n:].copy_(value[-1:].expand_as(buf[n:]), non_blocking=True)  # pad with the last row
            if graph is None:
                # The first run settles TensorRT's lazy allocations; the graph then captures a clean replay.
                if not ctx.execute_async_v3(self.stream.cuda_stream):
                    raise NitroError(f"TensorRT failed to run {self.path.name}")
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    ctx.execute_async_v3(self.stream.cuda_stream)
                slot[2] = graph
            graph.replay()
        self.stream.synchronize()  # a CPU-GPU sync point: the sampler update runs on the result next
        return [buffers[n] for n in self.outputs]


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64, trt.int32: torch.int32}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


class TensorRTBackend(Backend):
    """Runs one engine folder (nitrofusion/artifacts/engines.py); the loader builds or checks it first."""

    name = "tensorrt"

    def __init__(self, model: LoadedModel, engine_dir: Path, text_cache_size: int = 1024):
        super().__init__(model, text_cache_size)
        trt = require_tensorrt()
        self.root = engine_dir
        self.device = torch.device("cuda")
        engines = EngineManifest.read(engine_dir)
        onnx_dir = (engine_dir / engines.onnx_dir).resolve()
        onnx = read_manifest(onnx_dir)
        self.latent_channels, self.vae_scale_factor = onnx.latent_channels, onnx.vae_scale_factor
        self.profiles = plan_profiles(engines.buckets, [tuple(s) for s in engines.sizes], self.vae_scale_factor)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.stream = torch.cuda.Stream()
        self.engines = {}
        for name, rec in engines.engines.items():
            profs = component_profiles(name, self.profiles)
            inputs = onnx.components["fp32"][name].inputs
            self.engines[name] = _Engine(trt, runtime, engine_dir / rec.file, profs, inputs, self.stream)
        self.text_names = sorted(n for n in self.engines if n.startswith("text_encoder"))
        self.max_batch = max(engines.buckets)

    # -- shapes ------------------------------------------------------------------------------------
    def check_request(self, req) -> None:
        """Reject a size no profile covers before the request is queued (InvalidRequest: 422)."""
        super().check_request(req)
        f = self.vae_scale_factor
        select_profile(self.profiles, 1, req.height // f, req.width // f, f)

    def _profile(self, batch: int, h: int, w: int):
        return select_profile(self.profiles, batch, h, w, self.vae_scale_factor)

    def _batch_profile(self, name: str, batch: int):
        sizes = sorted({p.batch for p in self.engines[name].profiles})
        return Profile(next(b for b in sizes if b >= batch), 0, 0)

    def _chunked(self, name: str, x: torch.Tensor, run) -> list[torch.Tensor]:
        """Run `x` in chunks of the largest bucket (text and decode batches may exceed it)."""
        outs = []
        for start in range(0, x.shape[0], self.max_batch):
            outs.append([o.clone() for o in run(x[start : start + self.max_batch])])
        return [torch.cat(parts) for parts in zip(*outs)]

    # -- Backend interface -------------------------------------------------------------------------
    def run_text_encoder(self, index: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        name = self.text_names[index]

        def run(chunk):
            profile = self._batch_profile(name, chunk.shape[0])
            return [o[: chunk.shape[0]] for o in self.engines[name](profile, {"input_ids": chunk})]

        outs = self._chunked(name, ids.to(self.device), run)
        return outs[0].float(), outs[1].float() if len(outs) > 1 else None

    def unet(self, latents: torch.Tensor, timesteps: list[int], cond: Conditioning) -> torch.Tensor:
        b, _, h, w = latents.shape
        profile = self._profile(b, h, w)  # raises ShapeOutsideProfiles before any GPU work
        feeds = {"latents": latents.to(self.device, torch.float32),
                 "timesteps": torch.tensor(timesteps, dtype=torch.int64, device=self.device),
                 "embeds": cond.embeds.to(self.device, torch.float32)}
        if cond.pooled is not None:
            feeds["pooled"] = cond.pooled.to(self.device, torch.float32)
            feeds["time_ids"] = cond.time_ids.to(self.device, torch.float32)  # type: ignore[union-attr]
        eps = self.engines["unet"](profile, feeds)[0]
        return eps[:b].to(latents.device, torch.float32, copy=True)  # the static buffer is reused next call

    def _decode_with(self, name: str, latents: torch.Tensor) -> np.ndarray:
        _, _, h, w = latents.shape

        def run(chunk):
            out = self.engines[name](self._profile(chunk.shape[0], h, w), {"latents": chunk.to(self.device)})
            return [out[0][: chunk.shape[0]]]

        return to_uint8(self._chunked(name, latents.float(), run)[0])

    def decode_unscaled(self, z: torch.Tensor) -> np.ndarray:
        return self._decode_with("vae_decoder", z)

    @property
    def has_fast_decoder(self) -> bool:
        return "vae_preview" in self.engines

    def decode_fast(self, latents: torch.Tensor) -> np.ndarray:
        return self._decode_with("vae_preview", latents)
