"""The diffusers adapter against diffusers itself, on tiny random pipelines built offline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, LatentConsistencyModelPipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)

from ddil_cli.diffusion.ddim import ddim_step
from ddil_cli.diffusion.schedule import trailing_timesteps
from ddil_cli.errors import UserError
from ddil_cli.models.diffusers_t2i import (STUDENT_FILE, DiffusersDenoiser, guidance_scale_embedding,
                                           make_student)
from tiny_models import build_tiny_pixel, build_tiny_sd, build_tiny_sdxl

PROMPTS = ["a red circle", "two cats"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {"sd": build_tiny_sd(root / "sd"), "sdxl": build_tiny_sdxl(root / "sdxl"),
            "pixel": build_tiny_pixel(root / "pixel"),
            "sd_sample": build_tiny_sd(root / "sd_sample", seed=1, prediction_type="sample")}


@pytest.fixture(scope="module")
def sd(folders):
    return DiffusersDenoiser.from_pretrained(folders["sd"])


@pytest.fixture(scope="module")
def sdxl(folders):
    return DiffusersDenoiser.from_pretrained(folders["sdxl"])


@pytest.fixture(scope="module")
def pixel(folders):
    return DiffusersDenoiser.from_pretrained(folders["pixel"])


def noisy(model, batch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *model.state_shape, generator=generator)


# ---- loading ----------------------------------------------------------------------------------
def test_variants_are_detected_from_the_folder(sd, sdxl, pixel):
    assert (sd.variant, sdxl.variant, pixel.variant) == ("sd", "sdxl", "pixel")
    assert sd.state_shape == (4, 8, 8) and pixel.state_shape == (1, 16, 16)
    assert sd.image_hw == (16, 16) == pixel.image_hw
    assert pixel.prediction_type == "v_prediction" and sd.prediction_type == "epsilon"
    described = sdxl.describe()
    assert described["variant"] == "sdxl" and described["source"].endswith("sdxl")


def test_loaded_unet_equals_the_saved_one(folders, sd):
    raw = UNet2DConditionModel.from_pretrained(folders["sd"], subfolder="unet")
    theirs, ours = raw.state_dict(), sd.unet.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_pixel_loads_with_null_vae_entry(tmp_path):
    folder = build_tiny_pixel(tmp_path / "p", vae_entry=True)
    assert json.loads((folder / "model_index.json").read_text())["vae"] == [None, None]
    assert DiffusersDenoiser.from_pretrained(folder).vae is None


def test_schedule_comes_from_the_scheduler_config(pixel):
    expected = DDIMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    assert torch.allclose(pixel.schedule.alphas_cumprod, expected)


# ---- errors a user can cause --------------------------------------------------------------------
def test_missing_local_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        DiffusersDenoiser.from_pretrained(str(tmp_path / "nowhere" / "model"))


def test_hub_id_offline_is_a_user_error_naming_the_fix():
    with pytest.raises(UserError, match=r"offline.*huggingface-cli download some-org/no-such-model"):
        DiffusersDenoiser.from_pretrained("some-org/no-such-model")


def test_folder_without_unet_is_a_user_error(folders, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folders["sd"], broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(UserError, match="no unet/"):
        DiffusersDenoiser.from_pretrained(broken)


def test_mixed_components_are_a_user_error(folders, tmp_path):
    # an SD text encoder (16 wide) beside an SDXL UNet (32 wide cross-attention)
    mixed = tmp_path / "mixed"
    shutil.copytree(folders["sdxl"], mixed)
    index = json.loads((mixed / "model_index.json").read_text())
    index["text_encoder_2"] = index["tokenizer_2"] = [None, None]
    (mixed / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="cross_attention_dim"):
        DiffusersDenoiser.from_pretrained(mixed)


# ---- prompts and conditioning -----------------------------------------------------------------
def test_sd_encoding_matches_diffusers(folders, sd):
    pipe = StableDiffusionPipeline.from_pretrained(folders["sd"])
    cond_embeds, uncond_embeds = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    encoded = sd.encode(PROMPTS)
    assert torch.equal(encoded.cond["encoder_hidden_states"], cond_embeds)
    assert torch.equal(encoded.uncond["encoder_hidden_states"], uncond_embeds)
    assert not torch.equal(cond_embeds[0], cond_embeds[1])


def test_sdxl_encoding_and_added_conditioning_match_diffusers(folders, sdxl):
    pipe = StableDiffusionXLPipeline.from_pretrained(folders["sdxl"])
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
    encoded = sdxl.encode(PROMPTS)
    assert torch.equal(encoded.cond["encoder_hidden_states"], embeds)
    assert torch.equal(encoded.cond["text_embeds"], pooled)
    # force_zeros_for_empty_prompt: the unconditional branch is zeros, as in the pipeline
    assert torch.equal(encoded.uncond["encoder_hidden_states"], negative)
    assert torch.equal(encoded.uncond["text_embeds"], negative_pooled)
    time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=embeds.dtype,
                                      text_encoder_projection_dim=pooled.shape[-1])
    assert torch.equal(encoded.cond["time_ids"], time_ids.repeat(len(PROMPTS), 1))
    assert torch.equal(encoded.uncond["time_ids"], encoded.cond["time_ids"])


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_cfg_equals_manual_combination_with_the_raw_unet(request, name):
    model = request.getfixturevalue(name)
    encoded = model.encode(PROMPTS)
    x_t, t, w = noisy(model, 2), torch.tensor([900, 300]), 5.0
    alphabar = DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear").alphas_cumprod[t].view(-1, 1, 1, 1)

    def x0_of(cond):
        extra = {"added_cond_kwargs": {k: cond[k] for k in ("text_embeds", "time_ids")}} if name == "sdxl" else {}
        with torch.no_grad():
            eps = model.unet(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"], **extra).sample
        return (x_t - (1 - alphabar).sqrt() * eps) / alphabar.sqrt()

    expected = x0_of(encoded.uncond) + w * (x0_of(encoded.cond) - x0_of(encoded.uncond))
    with torch.no_grad():
        got = model.predict_x0(x_t, t, encoded, guidance=w)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        conditional = model.predict_x0(x_t, t, encoded, guidance=1.0)
    torch.testing.assert_close(conditional, x0_of(encoded.cond), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, conditional)


@pytest.mark.parametrize("name", ["sd", "sd_sample", "pixel"])
def test_one_ddim_step_matches_diffusers_for_each_prediction_type(folders, name):
    model = DiffusersDenoiser.from_pretrained(folders[name])
    scheduler = DDIMScheduler.from_config(model.scheduler_config, timestep_spacing="trailing",
                                          set_alpha_to_one=True, clip_sample=False)
    scheduler.set_timesteps(4)
    encoded = model.encode(PROMPTS)
    for index, t in enumerate(scheduler.timesteps.tolist()):
        x_t = noisy(model, 2, seed=index)
        t_batch = torch.full((2,), t)
        with torch.no_grad():
            output = model.forward(x_t, t_batch, encoded.cond)
        expected = scheduler.step(output, t, x_t, eta=0.0).prev_sample
        previous = t - scheduler.config.num_train_timesteps // 4  # -1 after the last step: clean data
        got = ddim_step(x_t, model.x0_from_output(output, x_t, t_batch), t_batch,
                        torch.full((2,), previous), model.schedule)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# ---- images ------------------------------------------------------------------------------------
def test_latent_decode_uses_the_vae_scaling(sd):
    latents = noisy(sd, 3)
    images = sd.decode(latents, batch_size=2)
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    with torch.no_grad():
        raw = sd.vae.decode(latents / sd.vae.config.scaling_factor).sample
    expected = ((raw.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(images, expected)


def test_pixel_decode_maps_range_and_repeats_gray(pixel):
    x0 = torch.linspace(-1.5, 1.5, 256).reshape(1, 1, 16, 16)
    images = pixel.decode(x0)
    assert images.shape == (1, 16, 16, 3) and images.dtype == np.uint8
    assert images[0, 0, 0, 0] == 0 and images[0, -1, -1, 0] == 255
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all()


# ---- students ----------------------------------------------------------------------------------
def test_student_copies_weights_and_shares_frozen_parts(sd):
    student = make_student(sd, guidance_embedding=False)
    assert student.unet is not sd.unet and student.text_encoders["text_encoder"] is sd.text_encoders["text_encoder"]
    assert student.vae is sd.vae and all(p.requires_grad for p in student.unet.parameters())
    encoded, x_t, t = sd.encode(PROMPTS), noisy(sd, 2), torch.tensor([700, 200])
    with torch.no_grad():
        assert torch.equal(student.predict_x0(x_t, t, encoded, 4.0), sd.predict_x0(x_t, t, encoded, 4.0))
        next(student.unet.parameters()).add_(1.0)
        assert not torch.equal(student.predict_x0(x_t, t, encoded, 4.0), sd.predict_x0(x_t, t, encoded, 4.0))


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_guidance_student_starts_at_the_teachers_conditional_output(request, name):
    teacher = request.getfixturevalue(name)
    student = make_student(teacher, guidance_embedding=True, time_cond_proj_dim=8)
    assert student.guidance_conditioned and not teacher.guidance_conditioned
    encoded, x_t, t = teacher.encode(PROMPTS), noisy(teacher, 2), torch.tensor([800, 100])
    with torch.no_grad():
        conditional = teacher.predict_x0(x_t, t, encoded, guidance=1.0)
        for w in (1.0, 7.5):
            torch.testing.assert_close(student.predict_x0(x_t, t, encoded, guidance=w), conditional,
                                       rtol=1e-5, atol=1e-5)
        # once the projection has been trained away from zero, w changes the output
        torch.nn.init.normal_(student.unet.time_embedding.cond_proj.weight, std=0.5)
        low = student.predict_x0(x_t, t, encoded, guidance=2.0)
        high = student.predict_x0(x_t, t, encoded, guidance=8.0)
    assert not torch.allclose(low, high, atol=1e-4)


def test_guidance_student_of_a_unet_config_without_time_cond_proj_dim(folders, tmp_path):
    # SD 1.5's unet/config.json predates the key; diffusers then lists it in _use_default_values
    folder = tmp_path / "sd"
    shutil.copytree(folders["sd"], folder)
    config = json.loads((folder / "unet/config.json").read_text())
    del config["time_cond_proj_dim"]
    (folder / "unet/config.json").write_text(json.dumps(config))
    teacher = DiffusersDenoiser.from_pretrained(folder)
    assert "time_cond_proj_dim" in teacher.unet.config.get("_use_default_values", [])
    student = make_student(teacher, guidance_embedding=True, time_cond_proj_dim=8)
    assert student.guidance_conditioned and student.unet.config.time_cond_proj_dim == 8


def test_guidance_embedding_is_lcm_pipelines():
    w = torch.tensor([0.0, 1.5, 6.5])
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=32)
    assert torch.equal(guidance_scale_embedding(w, 32), expected)
    assert guidance_scale_embedding(w, 33).shape == (3, 33)


# ---- saving ------------------------------------------------------------------------------------
def test_saved_student_loads_in_plain_diffusers_with_its_timesteps(sd, tmp_path):
    student = make_student(sd, guidance_embedding=True, time_cond_proj_dim=8)
    with torch.no_grad():
        torch.nn.init.normal_(student.unet.time_embedding.cond_proj.weight)
    timesteps = trailing_timesteps(4)
    student.save_pretrained(tmp_path / "student", timesteps=timesteps)

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "student")
    pipe.scheduler.set_timesteps(len(timesteps))
    assert pipe.scheduler.timesteps.tolist() == timesteps
    assert pipe.unet.config.time_cond_proj_dim == 8
    images = pipe(PROMPTS[0], num_inference_steps=len(timesteps), guidance_scale=3.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()

    loaded = DiffusersDenoiser.from_pretrained(tmp_path / "student")
    assert loaded.guidance_conditioned and loaded.student_timesteps == timesteps
    assert json.loads((tmp_path / "student" / STUDENT_FILE).read_text())["timesteps"] == timesteps
    theirs, ours = student.unet.state_dict(), loaded.unet.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_ddim_scheduler_reproduces_trailing_grids(sd, tmp_path, steps):
    timesteps = trailing_timesteps(steps)
    sd.save_pretrained(tmp_path / "s", timesteps=timesteps)
    scheduler = DDIMScheduler.from_pretrained(tmp_path / "s", subfolder="scheduler")
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == timesteps
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.set_alpha_to_one


def test_lcm_scheduler_reproduces_the_grid(pixel, tmp_path):
    from diffusers import LCMScheduler

    timesteps = trailing_timesteps(4)
    pixel.save_pretrained(tmp_path / "lcm", timesteps=timesteps, scheduler="lcm")
    scheduler = LCMScheduler.from_pretrained(tmp_path / "lcm", subfolder="scheduler")
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == timesteps
    assert scheduler.config.prediction_type == "v_prediction"
    loaded = DiffusersDenoiser.from_pretrained(tmp_path / "lcm")
    assert loaded.variant == "pixel" and loaded.student_timesteps == timesteps


def test_sdxl_student_saves_as_an_sdxl_pipeline(sdxl, tmp_path):
    make_student(sdxl).save_pretrained(tmp_path / "xl", timesteps=trailing_timesteps(2))
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "xl")
    assert pipe.config.force_zeros_for_empty_prompt and pipe.text_encoder_2 is not None
    loaded = DiffusersDenoiser.from_pretrained(tmp_path / "xl")
    assert loaded.variant == "sdxl"
    encoded = loaded.encode(PROMPTS)
    assert torch.equal(encoded.cond["text_embeds"], sdxl.encode(PROMPTS).cond["text_embeds"])


# ---- the loader every command uses ------------------------------------------------------------
def test_load_denoiser_dispatches_folders_and_hub_ids(folders):
    from ddil_cli.models import load_denoiser
    from ddil_cli.models import make_student as make_any_student

    teacher = load_denoiser(str(folders["pixel"]))
    assert isinstance(teacher, DiffusersDenoiser) and teacher.variant == "pixel"
    student = make_any_student(teacher, guidance_embedding=True, time_cond_proj_dim=8)
    assert isinstance(student, DiffusersDenoiser) and student.guidance_conditioned
    with pytest.raises(UserError, match="offline"):
        load_denoiser("some-org/no-such-model")


def test_sampling_defaults_travel_from_teacher_to_saved_student(tmp_path):
    import json

    from ddil_cli.models.diffusers_t2i import DEFAULTS_FILE, DiffusersDenoiser, make_student

    build_tiny_pixel(tmp_path / "t")
    assert DiffusersDenoiser.from_pretrained(tmp_path / "t").default_guidance == 7.5  # diffusers' default
    (tmp_path / "t" / DEFAULTS_FILE).write_text(json.dumps({"guidance": 2.5, "prompts": ["a one", "a two"]}))
    teacher = DiffusersDenoiser.from_pretrained(tmp_path / "t")
    assert teacher.default_guidance == 2.5 and teacher.default_prompts() == ["a one", "a two"]
    make_student(teacher).save_pretrained(tmp_path / "s", timesteps=[999, 499])
    student = DiffusersDenoiser.from_pretrained(tmp_path / "s")
    assert student.default_guidance == 2.5 and student.default_prompts() == ["a one", "a two"]


def test_repeated_prompts_encode_once_with_the_same_rows(tmp_path):
    from diffusers import StableDiffusionPipeline

    from ddil_cli.models.diffusers_t2i import DiffusersDenoiser

    build_tiny_sd(tmp_path / "sd")
    model = DiffusersDenoiser.from_pretrained(tmp_path / "sd")
    prompts = ["a cat", "a dog", "a cat", "a cat"]
    cond = model.encode(prompts)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", safety_checker=None, requires_safety_checker=False)
    ref, ref_neg = pipe.encode_prompt(prompts, "cpu", 1, True, [""] * len(prompts))
    assert torch.allclose(cond.cond["encoder_hidden_states"], ref, atol=1e-6)
    assert torch.allclose(cond.uncond["encoder_hidden_states"], ref_neg, atol=1e-6)
