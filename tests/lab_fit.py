"""How far a lab model's denoiser is from the analytic teacher's (tests of --lab-init-steps)."""

import torch


@torch.no_grad()
def x0_error_to_teacher(model, teacher, t: int = 499, n: int = 512) -> float:
    """Mean squared x0 difference to the exact teacher on mixture samples forward-diffused to t,
    every class in turn (fixed seeds, so models compare on the same states)."""
    x0, _ = teacher.mixture.sample(n, torch.Generator().manual_seed(1))
    t_batch = torch.full((n,), t)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    x_t = teacher.schedule.add_noise(x0.float(), noise, t_batch)
    cond = teacher.encode([f"class {i % teacher.num_classes}" for i in range(n)])
    return float(((model.predict_x0(x_t, t_batch, cond) - teacher.predict_x0(x_t, t_batch, cond)) ** 2).mean())
