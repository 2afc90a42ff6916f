"""ONNX Runtime backend: the exported text encoders, UNet and VAE decoder(s) as ORT sessions.

Drop-in for the torch backend (same methods, same conditioning, fp32 latents in and eps out), so the
engine, sampler and per-row timesteps are untouched. CPU execution provider on the CPU (fp32 graphs);
CUDA (and TensorRT, when asked) execution providers with the fp16 graphs and IO binding when
onnxruntime-gpu and a GPU are present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ModelLoadError, NitroError
from ..models import LoadedModel
from .base import Backend, Conditioning
from .torch_backend import to_uint8

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


def resolve_precision(device: str, dtype: str | None, available: list[str]) -> str:
    """fp32 on the CPU; fp16 on CUDA when exported (else fp32)."""
    if dtype in (None, ""):
        want = "fp16" if device == "cuda" and "fp16" in available else "fp32"
    elif dtype in ("float32", "fp32"):
        want = "fp32"
    elif dtype in ("float16", "fp16"):
        if device == "cpu":
            raise NitroError("float16 is not supported on the CPU: use float32")
        want = "fp16"
    else:
        raise NitroError(f"unsupported dtype {dtype!r} for --backend onnxruntime: use float32 or float16")
    if want not in available:
        raise ModelLoadError(f"this export has no {want} graphs (it has {', '.join(available)}): export it again "
                             f"with `nitrofusion export --format onnx --precision {want}`")
    return want


class OnnxRuntimeBackend(Backend):
    """Runs one export folder. Not thread-safe: one thread (the engine's) owns it."""

    name = "onnxruntime"

    def __init__(self, model: LoadedModel, export_dir: str | Path, device: str | None = None,
                 dtype: str | None = None, providers: str | None = None, text_cache_size: int = 1024,
                 threads: int | None = None):
        import onnxruntime as ort

        super().__init__(model, text_cache_size)
        manifest = model.extras["export"]
        self.root = Path(export_dir)
        available = ort.get_available_providers()
        if device is None:
            device = "cuda" if "CUDAExecutionProvider" in available and torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda"):
            raise NitroError(f"unsupported device {device!r}: use cpu or cuda")
        want = PROVIDERS[providers or device]
        if want[0] not in available:
            raise NitroError(f"--device {device} with --backend onnxruntime needs {want[0]}, which this "
                             f"onnxruntime does not have (it has {', '.join(available)}); install onnxruntime-gpu")
        self.device = torch.device(device)
        self.precision = resolve_precision(device, dtype, manifest.precisions)
        self.io_binding = self.device.type == "cuda"
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # ORT's pool threads spin-wait after each run by default; between UNet calls the sampler (torch) runs
        # on the same cores, and spinning threads starve it (measured: torch steps several times slower).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads is not None:
            opts.intra_op_num_threads = threads  # default: one per physical core
        graphs = manifest.components[self.precision]
        self.latent_channels = int(manifest.latent_channels)
        self.vae_scale_factor = int(manifest.vae_scale_factor)
        self._outputs: dict[int, dict[str, dict]] = {}  # session id -> output name -> {"shape", "dtype"}

        def session(name: str):
            path = self.root / graphs[name].folder / "model.onnx"
            try:
                sess = ort.InferenceSession(str(path), opts, providers=want)
            except Exception as e:  # ORT raises its own Fail / InvalidGraph types; one line for the user
                raise ModelLoadError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None
            self._outputs[id(sess)] = graphs[name].outputs
            return sess

        names = [n for n in graphs if n.startswith("text_encoder")]
        self.text_sessions = [session(n) for n in sorted(names)]
        self.unet_session = session("unet")
        self.vae_session = session("vae_decoder")
        self.preview_session = session("vae_preview") if "vae_preview" in graphs else None
        self.unet_inputs = [i.name for i in self.unet_session.get_inputs()]

    # -- running a graph ---------------------------------------------------------------------------
    def _run(self, sess, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """CPU: numpy in and out. CUDA: IO binding on torch tensors (outputs preallocated from the manifest's
        shapes), so nothing round-trips through host memory; ORT's run is the one sync point."""
        if not self.io_binding:
            outs = sess.run(None, {k: v.detach().cpu().numpy() for k, v in feeds.items()})
            return [torch.from_numpy(np.ascontiguousarray(o)) for o in outs]
        idx = self.device.index or 0
        binding = sess.io_binding()
        bound = []  # the bound tensors must outlive the run
        for name, value in feeds.items():
            value = value.to(self.device).contiguous()
            bound.append(value)
            binding.bind_input(name, "cuda", idx, _np_dtype(value.dtype), tuple(value.shape), value.data_ptr())
        outs = []
        for o in sess.get_outputs():
            name, spec = o.name, self._outputs[id(sess)][o.name]
            out = torch.empty(self._out_shape(spec["shape"], feeds), dtype=torch.float32, device=self.device)
            outs.append(out)
            binding.bind_output(name, "cuda", idx, np.float32, tuple(out.shape), out.data_ptr())
        # ORT runs on its own CUDA stream: the inputs torch wrote must be complete first (a sync point).
        torch.cuda.current_stream(self.device).synchronize()
        sess.run_with_iobinding(binding)
        return outs

    def _out_shape(self, dims: list, feeds: dict[str, torch.Tensor]) -> tuple[int, ...]:
        """Resolve the manifest's axis names: B from the first input, h/w from the latents, H/W in pixels."""
        first = next(iter(feeds.values()))
        lat = feeds.get("latents")
        known = {"B": first.shape[0]}
        if lat is not None:
            known |= {"h": lat.shape[2], "w": lat.shape[3], "H": lat.shape[2] * self.vae_scale_factor,
                      "W": lat.shape[3] * self.vae_scale_factor}
        return tuple(known[d] if isinstance(d, str) else int(d) for d in dims)

    # -- text --------------------------------------------------------------------------------------
    def run_text_encoder(self, index: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        outs = self._run(self.text_sessions[index], {"input_ids": ids})
        return outs[0].float(), outs[1].float() if len(outs) > 1 else None

    # -- denoiser ----------------------------------------------------------------------------------
    def unet(self, latents: torch.Tensor, timesteps: list[int], cond: Conditioning) -> torch.Tensor:
        feeds = {"latents": latents.float(), "timesteps": torch.tensor(timesteps, dtype=torch.int64),
                 "embeds": cond.embeds.float()}
        if "pooled" in self.unet_inputs:
            feeds["pooled"] = cond.pooled.float()  # type: ignore[union-attr]
            feeds["time_ids"] = cond.time_ids.float()  # type: ignore[union-attr]
        return self._run(self.unet_session, feeds)[0].float().to(latents.device)

    # -- images ------------------------------------------------------------------------------------
    def decode_unscaled(self, z: torch.Tensor) -> np.ndarray:
        return to_uint8(self._run(self.vae_session, {"latents": z.float()})[0])

    @property
    def has_fast_decoder(self) -> bool:
        return self.preview_session is not None

    def decode_fast(self, latents: torch.Tensor) -> np.ndarray:
        return to_uint8(self._run(self.preview_session, {"latents": latents.float()})[0])


def _np_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[dtype]
