"""bench/ledger.py on the tiny config: its meta-device counts against the same networks built with
real weights on the CPU (parameters, LoRA adapters counted by hand, forward FLOPs), and its rows'
roles against hand arithmetic."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("ledger", Path(__file__).parents[1] / "bench" / "ledger.py")
ledger = importlib.util.module_from_spec(_spec)
sys.modules["ledger"] = ledger  # dataclasses look their module up there
_spec.loader.exec_module(ledger)
RANK = 4


@pytest.fixture(scope="module")
def tiny():
    return ledger.count_size("tiny", RANK)


@pytest.fixture(scope="module")
def cpu_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**ledger.load_config("tiny")["unet"])


def test_counts_match_the_real_networks(tiny, cpu_unet):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    assert tiny.full.params == tiny.lora.params == sum(p.numel() for p in cpu_unet.parameters())
    # LoRA by hand: r (in + out) for a Linear, r in k k + r out for a Conv2d, on every targeted module
    by_hand = 0
    for name, module in cpu_unet.named_modules():
        if any(name == t or name.endswith("." + t) for t in ledger.LORA_TARGETS):
            if isinstance(module, torch.nn.Linear):
                by_hand += RANK * (module.in_features + module.out_features)
            elif isinstance(module, torch.nn.Conv2d):
                by_hand += RANK * module.in_channels * module.kernel_size[0] * module.kernel_size[1] \
                    + RANK * module.out_channels
    assert tiny.lora.trained == by_hand > 0
    config = ledger.load_config("tiny")
    inputs = {k: torch.zeros(v.shape) if isinstance(v, torch.Tensor) else v
              for k, v in ledger._unet_inputs(cpu_unet, config, 1).items()}
    # attention as explicit matmuls (the CPU's fused kernel has no FLOP formula): the same count
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as real:
        cpu_unet(**inputs)
    assert tiny.full.forward_flops == tiny.lora.forward_flops == real.get_total_flops()
    # a backward costs about two forwards; checkpointing saves less than keeping every activation
    assert 2.5 * tiny.full.forward_flops < tiny.full.train_flops < 3.5 * tiny.full.forward_flops
    for net in (tiny.full, tiny.lora):
        assert 0 < net.activation_bytes_checkpointed < net.activation_bytes


def test_efficient_attention_saves_no_attention_matrix():
    q = torch.randn(1, 2, 64, 8, device="meta", requires_grad=True)
    with ledger.efficient_attention(), ledger._saved_bytes(torch.nn.Linear(1, 1)) as saved:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert saved.total == (4 * 64 * 8 * 2 + 64 * 2) * 4  # q, k, v, out and the log-sum-exp, float32


def test_rows_are_the_roles_by_hand(tiny):
    rows = {(r.method, r.mode, r.frozen, r.optimizer, r.checkpointing): r for r in ledger.ledger(tiny, 2, 10)}
    assert len(rows) == 3 * 2 * 2 * 2 * 2
    p, lora = tiny.full.params, tiny.lora.trained
    frozen = p + tiny.text_params + tiny.vae_params
    dmd2 = rows["dmd2", "full", "fp32", "adamw", False]  # generator + critic, each fp32 weights, grads, 2 moments
    assert dmd2.trained_gb * 1e9 == 2 * 4 * p and dmd2.optimizer_gb * 1e9 == 2 * 8 * p and dmd2.ema_gb == 0
    assert dmd2.gradients_gb * 1e9 == 4 * p  # the critic's are freed before the generator's step
    assert dmd2.frozen_gb * 1e9 == 4 * frozen
    lcm = rows["lcm", "lora", "bf16", "adamw8bit", True]  # adapters, their EMA target, one bf16 base
    assert lcm.trained_gb * 1e9 == 4 * lora == lcm.ema_gb * 1e9 and lcm.optimizer_gb * 1e9 == 2 * lora
    assert lcm.frozen_gb * 1e9 == 2 * frozen  # the student's base is the teacher's: held once
    assert lcm.activations_gb * 1e9 == tiny.lora.activation_bytes_checkpointed * 2 * 0.5
    total = sum(getattr(lcm, k) for k in ("trained_gb", "gradients_gb", "optimizer_gb", "ema_gb", "frozen_gb",
                                          "activations_gb"))
    assert lcm.total_gb == pytest.approx(total)
    pd = rows["pd", "full", "fp32", "adamw", False]
    assert pd.tflops * 1e12 == pytest.approx(2 * (4 * tiny.full.forward_flops + tiny.full.train_flops)
                                             + 3 * tiny.text_flops_per_prompt)
    assert rows["dmd2", "full", "fp32", "adamw", True].tflops > dmd2.tflops  # checkpointing recomputes


def test_main_prints_the_table(capsys):
    rows = ledger.main(["--sizes", "tiny", "--lora-rank", str(RANK), "--batch", "3"])
    out = capsys.readouterr().out
    assert out.count("| tiny |") == len(rows) == 48 and all(r.batch == 3 for r in rows)
    assert all(r.fits == "24/80/141" for r in rows)
