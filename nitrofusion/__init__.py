"""NitroFusion: real-time 1-4 step text-to-image generation (core: models, sampler, backends)."""

__version__ = "0.1.0"
