"""HTTP API for NitroFusion: FastAPI routes and schemas (no tensors here; the core does the work)."""
