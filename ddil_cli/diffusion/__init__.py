"""Pure tensor math of diffusion: no models, no I/O.

x_t = a_t x0 + s_t eps with a_t = sqrt(alphabar_t), s_t = sqrt(1 - alphabar_t) from the teacher's
scheduler config; eps/v/x0 conversions; CFG; the stateless DDIM step x_s = a_s x0 + s_s eps;
thresholding. docs/sampling.md describes how they are used.
"""

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
