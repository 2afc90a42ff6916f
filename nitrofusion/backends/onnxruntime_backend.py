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
from .base import Conditioning, PromptCache
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


class OnnxRuntimeBackend:
    """Runs one export folder. Not thread-safe: one thread (the engine's) owns it."""

    name = "onnxruntime"

    def __init__(self, model: LoadedModel, export_dir: str | Path, device: str | None = None,
                 dtype: str | None = None, providers: str | None = None, text_cache_size: int = 1024,
                 threads: int | None = None):
        import onnxruntime as ort

        manifest = model.extras["export"]
        self.model, self.root = model, Path(export_dir)
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
        self._text_cache = PromptCache(text_cache_size)

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
    def count_tokens(self, prompt: str) -> int:
        return max(len(tok(prompt).input_ids) for tok in self.model.tokenizers)

    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds, pooled = [], None
        for tok, sess in zip(self.model.tokenizers, self.text_sessions):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids  # (B, 77) int64
            outs = self._run(sess, {"input_ids": ids})
            embeds.append(outs[0])
            if len(outs) > 1:
                pooled = outs[1]
        return torch.cat(embeds, dim=-1).float(), None if pooled is None else pooled.float()

    def encode_text(self, prompts: list[str], sizes: list[tuple[int, int]]) -> Conditioning:
        emb, pooled = self._text_cache.get(prompts, self._encode_uncached)
        return Conditioning.from_text(emb, pooled, sizes, self.model.family)

    # -- denoiser ----------------------------------------------------------------------------------
    def unet(self, latents: torch.Tensor, timesteps: list[int], cond: Conditioning) -> torch.Tensor:
        feeds = {"latents": latents.float(), "timesteps": torch.tensor(timesteps, dtype=torch.int64),
                 "embeds": cond.embeds.float()}
        if "pooled" in self.unet_inputs:
            feeds["pooled"] = cond.pooled.float()  # type: ignore[union-attr]
            feeds["time_ids"] = cond.time_ids.float()  # type: ignore[union-attr]
        return self._run(self.unet_session, feeds)[0].float().to(latents.device)

    # -- images ------------------------------------------------------------------------------------
    def _unscale(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.model.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            c = latents.shape[1]
            mean_t = torch.tensor(mean, dtype=latents.dtype).view(1, c, 1, 1)
            std_t = torch.tensor(std, dtype=latents.dtype).view(1, c, 1, 1)
            return latents * std_t / cfg.scaling_factor + mean_t
        return latents / cfg.scaling_factor

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        image = self._run(self.vae_session, {"latents": self._unscale(latents.float().cpu())})[0]
        return to_uint8(image)

    def preview(self, latents: torch.Tensor) -> np.ndarray:
        if self.preview_session is None:
            return self.decode(latents)
        return to_uint8(self._run(self.preview_session, {"latents": latents.float().cpu()})[0])


def _np_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[dtype]


def load_onnxruntime_backend(model_dir: str | Path, unet_file: str | Path | None, shift: int | None,
                             device: str | None, dtype: str | None) -> tuple[LoadedModel, OnnxRuntimeBackend]:
    """An export folder is used as it is; a diffusers folder goes through the export cache first."""
    from export.artifacts import load_exported_model
    from export.cache import ensure_onnx_export
    from export.manifest import is_export_dir

    if is_export_dir(model_dir):
        if unet_file is not None:
            raise NitroError("--unet cannot be swapped into an export folder: export the diffusers folder with the "
                             "UNet swapped in instead (nitrofusion export --model DIR --unet FILE ...)")
        root = Path(model_dir).expanduser()  # type: ignore[arg-type]
    else:
        wants_fp16 = device == "cuda" or (device is None and torch.cuda.is_available()) or dtype in ("float16", "fp16")
        root = ensure_onnx_export(model_dir, unet_file, precisions=("fp32", "fp16") if wants_fp16 else ("fp32",))
    model, _ = load_exported_model(root, shift=shift)
    return model, OnnxRuntimeBackend(model, root, device=device, dtype=dtype)
