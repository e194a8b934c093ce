"""Pure tensor math of diffusion: no models, no I/O (ALGORITHMS.md sections 1-3)."""

from ddil_cli.diffusion.consistency import boundary_scalings, consistency_output, renoise_step
from ddil_cli.diffusion.ddim import ddim_step
from ddil_cli.diffusion.guidance import cfg_combine
from ddil_cli.diffusion.parameterization import eps_from_x0, to_eps, to_x0, to_v
from ddil_cli.diffusion.schedule import NoiseSchedule, nested_grids, trailing_timesteps
from ddil_cli.diffusion.threshold import Threshold, apply_threshold, parse_threshold

__all__ = [
    "NoiseSchedule",
    "Threshold",
    "apply_threshold",
    "boundary_scalings",
    "consistency_output",
    "renoise_step",
    "cfg_combine",
    "ddim_step",
    "eps_from_x0",
    "nested_grids",
    "parse_threshold",
    "to_eps",
    "to_v",
    "to_x0",
    "trailing_timesteps",
]
