"""The ModelConfig the tests load a local model with: float32 on the CPU (``model.dtype: auto``
would depend on the CPU), a directory or a GGUF file inside one."""

from __future__ import annotations

from pathlib import Path

from saelab.config import ModelConfig


def cpu_model_config(
    model_dir: str | Path, hookpoint: str = "blocks.2.hook_resid_pre", gguf_file: str | None = None
) -> ModelConfig:
    """``ModelConfig`` of the model in ``model_dir`` at ``hookpoint``, float32, device cpu."""
    return ModelConfig(
        name_or_path=str(model_dir), gguf_file=gguf_file, dtype="float32", hookpoint=hookpoint,
        extra_hookpoints=(), device="cpu",
    )  # fmt: skip
