"""Tiny random-weight diffusers pipelines, built offline and saved with `save_pretrained`.

Other test files import these builders: each returns the folder it wrote, a full pipeline
folder (model_index.json + one subfolder per component) that loads with no network. Sizes are
the smallest that still exercise every code path (cross-attention, SDXL added conditioning, a
VAE that changes resolution), so building and running one takes well under a second on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from tokenizers import pre_tokenizers
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          CLIPTokenizer)

MAX_TOKENS = 77  # CLIP's context; without it the pipelines' truncation check overflows
TEXT_WIDTH = 16
LATENT_SIZE = 8


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer made offline: every byte is a token and there are no merges, so any
    prompt tokenises (one token per character) without downloading a vocabulary."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)


def _text_config(tokenizer: CLIPTokenizer, **overrides) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **overrides)


def _unet(**overrides) -> UNet2DConditionModel:
    config = dict(sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=2,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH)
    config.update(overrides)
    return UNet2DConditionModel(**config)


def _vae() -> AutoencoderKL:
    # two blocks: the image is twice the latent size, enough to test the scale factor
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, layers_per_block=1, sample_size=2 * LATENT_SIZE,
                         scaling_factor=0.5)


def build_tiny_sd(path, *, seed: int = 0, prediction_type: str = "epsilon", time_cond_proj_dim=None) -> Path:
    """SD 1.x layout: UNet2DConditionModel + CLIPTextModel + CLIPTokenizer + AutoencoderKL."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    pipe = StableDiffusionPipeline(
        unet=_unet(time_cond_proj_dim=time_cond_proj_dim), vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer)), tokenizer=tokenizer,
        # PNDM is what SD checkpoints ship; only its beta schedule matters to us
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                skip_prk_steps=True, steps_offset=1, prediction_type=prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return Path(path)


def build_tiny_sdxl(path, *, seed: int = 0) -> Path:
    """SDXL layout: two text encoders (the second with projection), text_time added conditioning."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer()
    projection_dim, time_embed_dim = TEXT_WIDTH, 4
    unet = _unet(cross_attention_dim=2 * TEXT_WIDTH, addition_embed_type="text_time",
                 addition_time_embed_dim=time_embed_dim,
                 # six micro-conditioning numbers (orig size, crop, target size) + pooled text
                 projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim)
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=_vae(), text_encoder=CLIPTextModel(_text_config(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, projection_dim=projection_dim)),
        tokenizer_2=tokenizer_2,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         timestep_spacing="leading", steps_offset=1),
        force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(path)
    return Path(path)


def build_tiny_pixel(path, *, seed: int = 0, channels: int = 1, vae_entry: bool = False) -> Path:
    """Pixel-space layout (the embedded digits teacher's): UNet on images in [-1, 1], CLIP text
    encoder and tokenizer, no VAE. `vae_entry=True` writes `"vae": [null, null]` to model_index.json
    (what a pipeline saved with vae=None writes); otherwise the entry is absent."""
    torch.manual_seed(seed)
    path = Path(path)
    tokenizer = tiny_tokenizer()
    unet = _unet(in_channels=channels, out_channels=channels, sample_size=2 * LATENT_SIZE)
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                              clip_sample=False)
    components = {"unet": unet, "text_encoder": CLIPTextModel(_text_config(tokenizer)),
                  "tokenizer": tokenizer, "scheduler": scheduler}
    index = {"_class_name": "DigitsPixelPipeline"}
    for name, component in components.items():
        component.save_pretrained(path / name)
        library = "diffusers" if type(component).__module__.startswith("diffusers") else "transformers"
        index[name] = [library, type(component).__name__]
    if vae_entry:
        index["vae"] = [None, None]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path
