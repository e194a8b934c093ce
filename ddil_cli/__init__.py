"""ddil-cli: diffusion distillation framed as imitation learning (DDIL)."""

__version__ = "0.1.0"
