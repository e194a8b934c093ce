"""The diffusers text-to-image adapter: SD 1.x/2.x, SDXL / SSD-1B, and pixel-space pipelines.

A pipeline folder (or hub id) is loaded component by component rather than through a
`DiffusionPipeline`, because we only ever need the UNet, the text encoder(s), the tokenizer(s),
the VAE and the scheduler's *config* (its noise schedule); the sampler is ours. Which kind of
pipeline it is follows from the folder itself: a `text_time` UNet takes SDXL's added
conditioning (two encoders, pooled text, size micro-conditioning); no VAE means pixel space.

Prompt encoding, the added conditioning and the guidance embedding follow diffusers' own
pipelines exactly (StableDiffusionPipeline / StableDiffusionXLPipeline.encode_prompt,
_get_add_time_ids, LatentConsistencyModelPipeline.get_guidance_scale_embedding), so a student
saved here runs unchanged in plain diffusers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddil_cli.atomic import to_json, write_text_atomic
from ddil_cli.diffusion.parameterization import PREDICTION_TYPES
from ddil_cli.diffusion.schedule import NoiseSchedule
from ddil_cli.errors import UserError
from ddil_cli.models.base import Conditioning, Denoiser
from ddil_cli.models.lora import LORA_FILE, LoraSpec, active_adapters, add_adapter, load_lora, merged_copy, save_lora

STUDENT_FILE = "ddil_student.json"
# optional sampling defaults a pipeline folder can carry: {"guidance": w, "prompts": [...]}
DEFAULTS_FILE = "ddil_defaults.json"
# diffusers' Stable Diffusion pipelines sample at 7.5 unless told otherwise
DIFFUSERS_DEFAULT_GUIDANCE = 7.5
# (tokenizer, text encoder) subfolders in the order SDXL concatenates their hidden states
TEXT_PAIRS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
# the scheduler keys that define the noise schedule; a student's scheduler must keep them
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "rescale_betas_zero_snr")
# SDXL's micro-conditioning: original size (2) + crop top-left (2) + target size (2)
NUM_TIME_IDS = 6
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def write_model_index(folder: Path, index: dict) -> None:
    """model_index.json, the one writer of it (teacher pipelines and saved students alike)."""
    write_text_atomic(Path(folder) / "model_index.json", to_json(index, indent=2, sort_keys=True) + "\n")


def write_sampling_defaults(folder: Path, defaults: dict) -> None:
    """ddil_defaults.json (the guidance and prompts a command uses when given none), its one writer."""
    write_text_atomic(Path(folder) / DEFAULTS_FILE, to_json(defaults, indent=2, sort_keys=True) + "\n")


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """Sinusoidal embedding of guidance scales (B,) -> (B, embedding_dim), bit for bit as diffusers'
    LCM pipeline builds `timestep_cond` (it feeds w - 1; see `DiffusersDenoiser.forward`).

    Written out rather than via get_timestep_embedding: its frequencies round differently in
    float32, and at w * 1000 that already moves the embedding by ~1e-4.
    """
    half = embedding_dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)
    angles = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, embedding_dim % 2))


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; honour a later change of the variable too
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return value in ("1", "on", "yes", "true") or bool(constants.HF_HUB_OFFLINE)


def base_source(source) -> str:
    """How a saved LoRA student names its base: a local folder by its absolute path (the student
    may be loaded from anywhere), a hub id as it is."""
    path = Path(str(source)).expanduser()
    return str(path.resolve()) if path.is_dir() else str(source)


def _recorded_teachers(record: dict, folder: Path) -> list[str]:
    """ddil_student.json's teacher_fingerprints ([] when a student predates them)."""
    value = record.get("teacher_fingerprints", [])
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise UserError(f"model folder {folder}: {STUDENT_FILE}'s teacher_fingerprints is not a list of text; "
                        "re-create it (re-run the command that made it) or restore the file")
    return value


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not Path(text).exists()


def resolve_pipeline_folder(source: str | Path) -> Path:
    """A local pipeline folder for a folder path or a hub id (downloaded, or taken from the cache
    when offline). Every failure a user can cause becomes a UserError naming the fix."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"cannot load {text!r}: it is a file, not a diffusers pipeline folder; "
                        "pass the folder that holds model_index.json and unet/")
    if not looks_like_hub_id(text):
        raise UserError(f"cannot load {text!r}: no such folder; pass a diffusers pipeline folder "
                        "or a hub id such as stabilityai/sdxl-turbo")
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import HfHubHTTPError

    offline = _hub_offline()
    try:
        return Path(DiffusionPipeline.download(text, local_files_only=True if offline else None))
    except (OSError, ValueError, HfHubHTTPError) as exc:
        if offline:
            raise UserError(f"cannot load {text!r}: not a local folder and the hub is offline "
                            f"(HF_HUB_OFFLINE=1); download it first with `huggingface-cli download "
                            f"{text}` or pass a local folder") from exc
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot download {text!r} from the hub ({reason}); check the id and your "
                        "network, or pass a local folder") from exc


def _component_class(index: dict, name: str, default):
    """The class model_index.json names for a component (e.g. CLIPTextModelWithProjection),
    falling back to `default` when the folder has no index or names a class we cannot import."""
    import diffusers
    import transformers

    entry = index.get(name)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
        module = {"diffusers": diffusers, "transformers": transformers}.get(entry[0])
        found = getattr(module, entry[1], None) if module is not None else None
        if found is not None:
            return found
    return default


def _has_component(folder: Path, index: dict, name: str) -> bool:
    """Listed in model_index.json with a class (a null entry means absent), or, for a folder
    without an index, present as a subfolder."""
    if index:
        entry = index.get(name)
        return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None
    return (folder / name).is_dir()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _library_entry(component) -> list[str]:
    module = type(component).__module__
    return ["diffusers" if module.startswith("diffusers") else "transformers", type(component).__name__]


class DiffusersDenoiser(Denoiser):
    """A diffusers UNet2DConditionModel with its text encoders, tokenizers and optional VAE.

    `encode` gives `encoder_hidden_states` (plus `text_embeds` and `time_ids` for SDXL);
    `forward` calls the UNet. Networks loaded by `from_pretrained` are frozen (eval,
    requires_grad False); `make_student` returns a trainable UNet that shares the frozen rest.
    """

    kind = "diffusers"

    def __init__(self, unet, *, text_encoders: dict, tokenizers: dict, vae, scheduler_config: dict,
                 pipeline_index: dict | None = None, source: str = "",
                 prediction_type: str | None = None, student_timesteps: list[int] | None = None):
        self.unet = unet
        self.text_encoders = dict(text_encoders)
        self.tokenizers = dict(tokenizers)
        self.vae = vae
        self.scheduler_config = dict(scheduler_config)
        self.pipeline_index = dict(pipeline_index or {})
        self.source = str(source)
        # the pipeline whose UNet is the frozen base (a LoRA student's saved folder names it)
        self.base_source = base_source(source)
        self.adapter: str | None = None  # the LoRA adapter this model runs with on its UNet (None: the base)
        self.lora = None  # its LoraSpec
        self.student_timesteps = list(student_timesteps) if student_timesteps is not None else None
        self.prediction_type = prediction_type or self.scheduler_config.get("prediction_type") or "epsilon"
        if self.prediction_type not in PREDICTION_TYPES:
            raise UserError(f"{self.source or 'the model'} has prediction_type {self.prediction_type!r}; "
                            f"supported: {', '.join(PREDICTION_TYPES)}")
        self.schedule = NoiseSchedule.from_scheduler_config(self.scheduler_config)
        self.added_conditioning = unet.config.addition_embed_type == "text_time"
        self.guidance_conditioned = unet.config.time_cond_proj_dim is not None
        # diffusers' SDXL pipeline zeroes the unconditional branch instead of encoding ""
        self.force_zeros_for_empty_prompt = bool(self.added_conditioning
                                                 and self.pipeline_index.get("force_zeros_for_empty_prompt", True))
        size = unet.config.sample_size
        if size is None:
            raise UserError(f"{self.source or 'the UNet'} has no sample_size in unet/config.json; "
                            "add the latent (or pixel) size the model was trained at")
        self.sample_hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.state_shape = (int(unet.config.in_channels), *self.sample_hw)
        self._check_components()

    # ---- structure ----------------------------------------------------------------------------
    @property
    def variant(self) -> str:
        if self.vae is None:
            return "pixel"
        return "sdxl" if self.added_conditioning else "sd"

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_hw(self) -> tuple[int, int]:
        return (self.sample_hw[0] * self.vae_scale_factor, self.sample_hw[1] * self.vae_scale_factor)

    @property
    def network(self):
        return self.unet

    def _text_pairs(self):
        return [(self.tokenizers[t], self.text_encoders[e]) for t, e in TEXT_PAIRS
                if t in self.tokenizers and e in self.text_encoders]

    def _check_components(self) -> None:
        where = self.source or "the pipeline"
        if not self._text_pairs():
            raise UserError(f"{where} has no tokenizer + text_encoder pair; a text-to-image pipeline "
                            "needs tokenizer/ and text_encoder/ (SDXL also tokenizer_2/, text_encoder_2/)")
        width = sum(enc.config.hidden_size for _, enc in self._text_pairs())
        if width != self.unet.config.cross_attention_dim:
            raise UserError(f"{where}: the text encoders give {width}-wide states but the UNet's "
                            f"cross_attention_dim is {self.unet.config.cross_attention_dim}; the folder "
                            "mixes components of different models")
        if self.added_conditioning:
            pooled = self.text_encoders.get("text_encoder_2")
            if pooled is None or getattr(pooled.config, "projection_dim", None) is None:
                raise UserError(f"{where}: the UNet takes SDXL added conditioning but there is no "
                                "text_encoder_2 with a projection; use a complete SDXL pipeline folder")
            passed = self.unet.config.addition_time_embed_dim * NUM_TIME_IDS + pooled.config.projection_dim
            expected = self.unet.add_embedding.linear_1.in_features
            if passed != expected:
                raise UserError(f"{where}: the UNet expects a {expected}-wide added embedding but the "
                                f"text encoder and size conditioning give {passed}; the folder mixes models")

    def to(self, device) -> "DiffusersDenoiser":
        for module in [self.unet, *self.text_encoders.values(), self.vae]:
            if module is not None:
                module.to(device)
        return self

    def describe(self) -> dict[str, Any]:
        info = {**super().describe(), "source": self.source, "variant": self.variant,
                "image_size": list(self.image_hw)}
        if self.student_timesteps is not None:
            info["timesteps"] = list(self.student_timesteps)
        return info

    # ---- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, source: str | Path, *, device="cpu", dtype: torch.dtype = torch.float32,
                        unet_subfolder: str = "unet", variant: str | None = None,
                        vae_dtype: torch.dtype = torch.float32) -> "DiffusersDenoiser":
        """Load a pipeline folder or hub id. `unet_subfolder` picks another UNet in the same folder
        (e.g. a trained student saved beside the teacher); `variant` picks weight files such as fp16.
        `dtype` is the UNet's and the text encoders'; the VAE has its own (fp32: a half-precision
        decoder shifts pixels, and SDXL's overflows in fp16)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        folder = resolve_pipeline_folder(source)
        index_file = folder / "model_index.json"
        index = json.loads(index_file.read_text()) if index_file.is_file() else {}
        if not (folder / unet_subfolder).is_dir():
            raise UserError(f"{str(source)!r} is not a diffusers text-to-image pipeline: it has no "
                            f"{unet_subfolder}/ folder; pass an SD, SDXL or pixel-space pipeline folder")
        scheduler_file = folder / "scheduler" / "scheduler_config.json"
        if not scheduler_file.is_file():
            raise UserError(f"{str(source)!r} has no scheduler/scheduler_config.json, so its noise "
                            "schedule is unknown; copy the scheduler folder of the model it was trained from")

        def load(name: str, default_cls, **kwargs):
            loader = _component_class(index, name, default_cls)
            try:
                return loader.from_pretrained(folder, subfolder=name, **kwargs)
            except (OSError, ValueError) as exc:
                raise UserError(f"cannot load {name}/ of {str(source)!r} ({_first_line(exc)}); check "
                                "that the folder is a complete diffusers pipeline") from exc

        unet = load(unet_subfolder, UNet2DConditionModel, torch_dtype=dtype, variant=variant)
        if not isinstance(unet, UNet2DConditionModel):
            raise UserError(f"{str(source)!r} has a {type(unet).__name__}, not a UNet2DConditionModel; "
                            "only text-conditioned UNet pipelines (SD, SDXL, SSD-1B) are supported")
        text_encoders, tokenizers = {}, {}
        for (tok_name, enc_name), enc_default in zip(TEXT_PAIRS, (CLIPTextModel, CLIPTextModelWithProjection)):
            if _has_component(folder, index, enc_name) and _has_component(folder, index, tok_name):
                text_encoders[enc_name] = load(enc_name, enc_default, dtype=dtype, variant=variant)
                tokenizers[tok_name] = load(tok_name, AutoTokenizer)
        vae = None
        if _has_component(folder, index, "vae"):
            vae_config_file = folder / "vae" / "config.json"
            vae_config = json.loads(vae_config_file.read_text()) if vae_config_file.is_file() else {}
            # SDXL's VAE overflows in fp16 (its config says force_upcast): keep it in float32 then
            upcast = vae_config.get("force_upcast", False) and vae_dtype == torch.float16
            vae = load("vae", AutoencoderKL, torch_dtype=torch.float32 if upcast else vae_dtype, variant=variant)
        student_file = folder / STUDENT_FILE
        student = json.loads(student_file.read_text()) if student_file.is_file() else {}

        for module in [unet, *text_encoders.values(), vae]:
            if module is not None:
                module.requires_grad_(False).eval().to(device)
        model = cls(unet, text_encoders=text_encoders, tokenizers=tokenizers, vae=vae,
                    scheduler_config=json.loads(scheduler_file.read_text()), pipeline_index=index,
                    source=str(source), prediction_type=student.get("prediction_type"),
                    student_timesteps=student.get("timesteps"))
        model.guidance_folded = bool(student.get("guidance_folded", False))
        model.teacher_fingerprints = _recorded_teachers(student, folder)
        defaults_file = folder / DEFAULTS_FILE
        if defaults_file.is_file():
            model.sampling_defaults = json.loads(defaults_file.read_text())
        return model

    @classmethod
    def from_lora_folder(cls, folder: str | Path, *, device="cpu", dtype: torch.dtype = torch.float32,
                         base: "DiffusersDenoiser | None" = None) -> "DiffusersDenoiser":
        """A saved LoRA student: its base pipeline (the one ddil_student.json names; `base`'s UNet
        itself when it is that pipeline, so the frozen base is held once) with the adapter loaded."""
        folder = Path(folder)
        try:
            record = json.loads((folder / STUDENT_FILE).read_text())
            source, spec = record["base"], record["lora"]
            scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{folder} holds {LORA_FILE} but no readable {STUDENT_FILE} (with its base) and "
                            f"scheduler/ ({_first_line(exc)}); re-create it with ddil distill") from None
        if base is None or base.base_source != source:
            base = cls.from_pretrained(source, device=device, dtype=dtype)
        # named by the folder: a PD stage's teacher must not replace the run's teacher's own adapter
        name = "loaded_" + hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:10]
        load_lora(base.unet, folder, name)
        model = base.with_adapter(name)
        model.source, model.lora = str(folder), LoraSpec(int(spec["rank"]), float(spec["alpha"]), tuple(spec["targets"]))
        model.scheduler_config = scheduler_config
        model.prediction_type = record.get("prediction_type") or model.prediction_type
        model.student_timesteps = record.get("timesteps")
        model.guidance_folded = bool(record.get("guidance_folded", False))
        model.teacher_fingerprints = _recorded_teachers(record, folder)
        if model.teacher_fingerprints and base.identity not in model.teacher_fingerprints:
            raise UserError(f"the LoRA student {folder} was distilled on another base than the one now at {source} "
                            "(its UNet is not the one ddil_student.json records); put its base back there, or "
                            "distil a new student")
        defaults_file = folder / DEFAULTS_FILE
        model.sampling_defaults = json.loads(defaults_file.read_text()) if defaults_file.is_file() else {}
        return model

    # ---- sampling defaults --------------------------------------------------------------------
    sampling_defaults: dict = {}

    # ---- which teacher a student was distilled from ------------------------------------------
    # the identities of the teachers this model was distilled from, the first teacher first (a PD
    # stage's teacher is the stage before): ddil_student.json's teacher_fingerprints
    teacher_fingerprints: list = []
    _identity: str | None = None

    @property
    def identity(self) -> str:
        """This model's fingerprint as a teacher: its UNet's files (config and weights; a copy of
        the folder elsewhere is the same teacher, an edited ddil_defaults.json too), or for a LoRA
        student its adapter's file on its base's UNet."""
        if self._identity is None:
            from ddil_cli.manifest import fingerprint

            if self.adapter and (Path(self.source) / LORA_FILE).is_file():
                base = DiffusersDenoiser.with_adapter(self, None)
                base.source, base._identity = self.base_source, None
                parts = f"{base.identity}+{fingerprint(Path(self.source) / LORA_FILE)}"
                self._identity = "lora-sha256:" + hashlib.sha256(parts.encode()).hexdigest()
            else:
                try:
                    folder = resolve_pipeline_folder(self.source) / "unet"
                except UserError:
                    folder = None
                self._identity = fingerprint(folder if folder is not None and folder.is_dir() else self.source)
        return self._identity

    @property
    def default_guidance(self) -> float:
        return float(self.sampling_defaults.get("guidance", DIFFUSERS_DEFAULT_GUIDANCE))

    def default_prompts(self) -> list[str] | None:
        return list(self.sampling_defaults.get("prompts", [])) or None

    # ---- conditioning -------------------------------------------------------------------------
    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        device, dtype = self.device, self.unet.dtype
        hidden, pooled = [], None
        for tokenizer, encoder in self._text_pairs():
            tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
            ids = tokens.input_ids.to(encoder.device)
            if self.added_conditioning:
                # SDXL: penultimate hidden states of every encoder; pooled text from the one with a projection
                out = encoder(ids, output_hidden_states=True)
                if out[0].ndim == 2:
                    pooled = out[0]
                hidden.append(out.hidden_states[-2])
            else:
                # SD 2 variants trained with an attention mask say so in their text encoder config
                mask = tokens.attention_mask.to(encoder.device) \
                    if getattr(encoder.config, "use_attention_mask", False) else None
                hidden.append(encoder(ids, attention_mask=mask)[0])
        cond = {"encoder_hidden_states": torch.cat([h.to(device) for h in hidden], dim=-1).to(dtype)}
        if self.added_conditioning:
            height, width = self.image_hw
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
            cond["text_embeds"] = pooled.to(device=device, dtype=dtype)
            cond["time_ids"] = time_ids.repeat(len(prompts), 1)
        return cond

    def encode(self, prompts: list[str]) -> Conditioning:
        # each distinct prompt (and the empty one) through the text encoders once: training batches
        # repeat prompts, and the unconditional branch is the same row for every example
        prompts = [str(p) for p in prompts]
        distinct = list(dict.fromkeys(prompts))
        rows = torch.tensor([distinct.index(p) for p in prompts], dtype=torch.long)
        cond = {k: v[rows.to(v.device)] for k, v in self._embed(distinct).items()}
        if self.force_zeros_for_empty_prompt:
            uncond = {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in cond.items()}
        else:
            empty = self._embed([""])
            uncond = {k: v.expand(len(prompts), *v.shape[1:]).clone() for k, v in empty.items()}
        return Conditioning(prompts, cond, uncond)

    # ---- the network call ---------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                guidance: torch.Tensor | None = None, *, network=None) -> torch.Tensor:
        # config and dtype from the raw UNet: a DDP wrapper has neither (diffusers' LCM script broke on it)
        unet = self.unet if network is None else network
        dtype, device = self.unet.dtype, x_t.device
        kwargs = {}
        if self.added_conditioning:
            kwargs["added_cond_kwargs"] = {k: cond[k].to(device=device, dtype=dtype)
                                           for k in ("text_embeds", "time_ids")}
        if self.guidance_conditioned:
            w = torch.ones(x_t.shape[0], device=device) if guidance is None \
                else torch.as_tensor(guidance, dtype=torch.float32, device=device).expand(x_t.shape[0])
            # LCM's convention: the embedding of w - 1, so the student runs in diffusers' pipelines
            kwargs["timestep_cond"] = guidance_scale_embedding(
                w - 1, self.unet.config.time_cond_proj_dim).to(device=device, dtype=dtype)
        t = torch.as_tensor(t, device=device)
        # one UNet may carry the student's, LCM's target's and DMD2's critic's adapters: this model's only
        with active_adapters(self.unet, [self.adapter] if self.adapter else []):
            return unet(x_t.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(device, dtype),
                        **kwargs).sample

    def with_adapter(self, adapter: str | None) -> "DiffusersDenoiser":
        """This model on the same UNet and frozen parts, running adapter `adapter` (None: the base)."""
        view = copy.copy(self)
        view.adapter, view._identity = adapter, None
        view.sampling_defaults = dict(self.sampling_defaults)
        return view

    # ---- images -------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, x0: torch.Tensor, *, batch_size: int = 8) -> np.ndarray:
        """Clean states to uint8 RGB images (B, H, W, 3); the VAE decodes `batch_size` at a time."""
        if self.vae is None:
            images = x0.float()
        else:
            scale = self.vae.config.scaling_factor
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            vae_dtype, vae_device = self.vae.dtype, next(self.vae.parameters()).device
            images = torch.cat([
                self.vae.decode((chunk / scale + shift).to(vae_device, vae_dtype)).sample.float()
                for chunk in x0.split(batch_size)])
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()

    def shares_conditioning(self, other) -> bool:
        """Same tokenizers and text encoder modules (a student made by make_student): one encoding."""
        mine, theirs = self.text_encoders, getattr(other, "text_encoders", None)
        return theirs is not None and mine.keys() == theirs.keys() and \
            all(mine[k] is theirs[k] for k in mine) and self.variant == getattr(other, "variant", None)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, *, batch_size: int = 8) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] at `image_hw` to clean states: the VAE latent mean times
        the scaling factor (minus the shift) for latent models, the images themselves in pixel space."""
        if self.vae is None:
            return images.float()
        scale = self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        vae_dtype, vae_device = self.vae.dtype, next(self.vae.parameters()).device
        return torch.cat([(self.vae.encode(chunk.to(vae_device, vae_dtype)).latent_dist.mean.float() - shift) * scale
                          for chunk in images.split(batch_size)])

    @property
    def image_channels(self) -> int:
        return self.state_shape[0] if self.vae is None else int(self.vae.config.in_channels)

    # ---- saving -------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, *, timesteps: list[int] | None = None,
                        scheduler: str = "ddim", merge_lora: bool = False) -> None:
        """A full diffusers pipeline folder, or for a LoRA student (unless `merge_lora`) its adapter
        as diffusers' LoRA scripts save one (load it with `pipe.load_lora_weights(folder)` on the
        teacher's pipeline) beside its scheduler. With `timesteps`, the scheduler (DDIM, or LCM with
        `scheduler="lcm"`) is configured so that `set_timesteps(len(timesteps))` gives exactly them;
        the list is also written to ddil_student.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if timesteps is None:
            sched = self._teacher_scheduler()
        else:
            sched = student_scheduler(self.scheduler_config, timesteps, self.prediction_type, scheduler)
        record = {"teacher": self.source, "variant": self.variant, "prediction_type": self.prediction_type,
                  "guidance_conditioned": self.guidance_conditioned, "guidance_folded": self.guidance_folded,
                  "timesteps": list(timesteps) if timesteps is not None else self.student_timesteps,
                  "scheduler": type(sched).__name__}
        if self.teacher_fingerprints:
            record["teacher_fingerprints"] = list(self.teacher_fingerprints)
        if self.adapter and not merge_lora:
            save_lora(self.unet, self.adapter, path)
            record.update(base=self.base_source, lora=self.lora.describe() if self.lora else None)
        else:
            self._save_pipeline(path, merged_copy(self.unet, self.adapter) if self.adapter else self.unet, sched)
        sched.save_pretrained(path / "scheduler")
        (path / STUDENT_FILE).write_text(to_json(record, indent=2))
        if self.sampling_defaults:
            write_sampling_defaults(path, self.sampling_defaults)
        from ddil_cli.atomic import follow_umask

        follow_umask(path)  # safetensors writes private files; a saved model is an ordinary output

    def _save_pipeline(self, path: Path, unet, sched) -> None:
        """Every component and model_index.json (the scheduler is the caller's)."""
        import diffusers

        components = {"unet": unet, **self.text_encoders, **self.tokenizers}
        if self.vae is not None:
            components["vae"] = self.vae
        for name, component in components.items():
            component.save_pretrained(path / name)
        # keep the teacher's pipeline-level settings (class name, null safety checker, ...)
        index = {k: v for k, v in self.pipeline_index.items()
                 if k.startswith("_") or not isinstance(v, (list, tuple)) or v[1] is None}
        index.pop("vae", None)
        index.setdefault("_class_name", {"sd": "StableDiffusionPipeline",
                                         "sdxl": "StableDiffusionXLPipeline"}.get(self.variant, "DiffusionPipeline"))
        index["_diffusers_version"] = diffusers.__version__
        for name, component in {**components, "scheduler": sched}.items():
            index[name] = _library_entry(component)
        if self.vae is None and "vae" in self.pipeline_index:
            index["vae"] = [None, None]
        write_model_index(path, index)

    def _teacher_scheduler(self):
        import diffusers

        name = self.scheduler_config.get("_class_name", "DDIMScheduler")
        return getattr(diffusers, name, diffusers.DDIMScheduler).from_config(self.scheduler_config)


def student_scheduler(base_config: dict, timesteps: list[int], prediction_type: str, kind: str = "ddim"):
    """A DDIM or LCM scheduler on the teacher's noise schedule whose `set_timesteps(n)` gives
    exactly `timesteps`: each candidate spacing is tried on the real scheduler, so what we save
    is what diffusers will do. Warns and keeps trailing spacing when no config reproduces them
    (ddil_student.json still records the list)."""
    from diffusers import DDIMScheduler, LCMScheduler

    timesteps = [int(t) for t in timesteps]
    n = len(timesteps)
    common = {k: base_config[k] for k in SCHEDULE_KEYS if base_config.get(k) is not None}
    num_train = int(common.get("num_train_timesteps", 1000))
    if n < 1 or any(b >= a for a, b in zip(timesteps, timesteps[1:])) or not 0 <= timesteps[-1] <= timesteps[0] < num_train:
        raise ValueError(f"timesteps must be strictly decreasing in [0, {num_train - 1}], got {timesteps}")
    # set_alpha_to_one: the last step lands on clean data, as our t = -1 convention; steps_offset 1:
    # diffusers' SD pipeline warns about any other value and rewrites it to 1 when it loads the folder
    common.update(prediction_type=prediction_type, set_alpha_to_one=True, clip_sample=False,
                  thresholding=False, steps_offset=1)
    if kind == "ddim":
        candidates = (DDIMScheduler.from_config({**common, "timestep_spacing": spacing})
                      for spacing in ("trailing", "leading", "linspace"))
    elif kind == "lcm":
        # LCM picks from its `original_inference_steps` grid; only grids whose spacing divides the
        # last timestep + 1 can contain it
        # (the solver grid the student was distilled on first, and its boundary's timestep scaling)
        preferred = [int(base_config["original_inference_steps"])] if base_config.get("original_inference_steps") else []
        common.update({k: base_config[k] for k in ("timestep_scaling",) if base_config.get(k) is not None})
        candidates = (LCMScheduler.from_config({**common, "original_inference_steps": k})
                      for k in [*preferred, *range(n, num_train + 1)] if (timesteps[-1] + 1) % (num_train // k) == 0)
    else:
        raise ValueError(f"unknown student scheduler {kind!r}; expected 'ddim' or 'lcm'")
    for sched in candidates:
        sched.set_timesteps(n)
        if sched.timesteps.tolist() == timesteps:
            return sched
    fallback = DDIMScheduler if kind == "ddim" else LCMScheduler
    warnings.warn(f"no {fallback.__name__} spacing gives the timesteps {timesteps}; saving trailing "
                  f"spacing, the exact list is in {STUDENT_FILE}")
    return fallback.from_config({**common, "timestep_spacing": "trailing"})


def make_student(teacher: DiffusersDenoiser, *, guidance_embedding: bool = False,
                 time_cond_proj_dim: int = 256, prediction_type: str | None = None,
                 lora: LoraSpec | None = None, adapter: str = "student") -> DiffusersDenoiser:
    """A trainable copy of the teacher's UNet sharing the frozen text encoders, tokenizers and VAE,
    or with `lora`, a trainable adapter `adapter` on the teacher's own UNet (see lora_student).

    `guidance_embedding=True` adds diffusers' `time_cond_proj_dim` input (w as a timestep
    condition) to a teacher that lacks it: the new projection starts at zero, so the student starts
    equal to the teacher's conditional prediction for every w. `prediction_type` relabels the
    output the student will be trained to give (e.g. PD's eps -> v stage).
    """
    from diffusers import UNet2DConditionModel

    if lora is not None:
        return lora_student(teacher, lora, adapter=adapter, prediction_type=prediction_type)
    source = teacher.unet
    if source.dtype != torch.float32:
        # a teacher held in bf16 (--frozen-dtype): the student trains fp32 master weights, read
        # from the stored ones rather than rounded through the teacher's copy
        source = UNet2DConditionModel.from_pretrained(resolve_pipeline_folder(teacher.source), subfolder="unet",
                                                      torch_dtype=torch.float32).to(source.device)
    if guidance_embedding and source.config.time_cond_proj_dim is None:
        # diffusers' `_use_default_values` lists keys the config file lacked (time_cond_proj_dim in
        # SD 1.5's) and from_config resets those to their defaults: drop it, or the projection is lost
        config = {**{k: v for k, v in source.config.items() if k != "_use_default_values"},
                  "time_cond_proj_dim": time_cond_proj_dim}
        unet = UNet2DConditionModel.from_config(config)
        missing, unexpected = unet.load_state_dict(source.state_dict(), strict=False)
        fresh = {"time_embedding.cond_proj.weight"}
        if set(missing) != fresh or unexpected:
            raise RuntimeError(f"guidance embedding changed more than the new projection: missing "
                               f"{missing}, unexpected {unexpected}")
        torch.nn.init.zeros_(unet.time_embedding.cond_proj.weight)
        if unet.dtype != source.dtype:
            unet.to(dtype=source.dtype)
        unet.to(source.device)
    else:
        unet = source if source is not teacher.unet else copy.deepcopy(source)
    unet.requires_grad_(True).train(source.training)
    student = DiffusersDenoiser(unet, text_encoders=teacher.text_encoders, tokenizers=teacher.tokenizers,
                                vae=teacher.vae, scheduler_config=teacher.scheduler_config,
                                pipeline_index=teacher.pipeline_index, source=teacher.source,
                                prediction_type=prediction_type or teacher.prediction_type)
    student.sampling_defaults = dict(teacher.sampling_defaults)
    student.teacher_fingerprints = [*teacher.teacher_fingerprints, teacher.identity]
    return student


def lora_student(teacher: DiffusersDenoiser, spec: LoraSpec, *, adapter: str = "student",
                 prediction_type: str | None = None) -> DiffusersDenoiser:
    """A LoRA student on the teacher's own (frozen) UNet: the teacher runs it with no adapter, the
    student with `adapter`, which starts from the teacher's adapter when the teacher is itself a
    LoRA student (a PD stage's), else at zero (the teacher exactly). It takes no guidance embedding
    (a LoRA cannot add the layer): it folds the guided teacher into one pass."""
    if teacher.adapter and teacher.lora is not None and teacher.lora != spec:
        raise UserError(f"the teacher {teacher.source} is a LoRA student of rank {teacher.lora.rank} on other "
                        "layers; distil from it with the same --lora-rank/--lora-alpha/--lora-targets, or save it "
                        "with --merge-lora and distil from that folder")
    try:
        add_adapter(teacher.unet, adapter, spec, copy_from=teacher.adapter)
    except ValueError as exc:  # peft: no layer of the UNet matches the targets
        raise UserError(f"--lora-targets {','.join(spec.targets)}: {_first_line(exc)}; name layers of the "
                        "UNet such as to_q,to_k,to_v,to_out.0") from None
    student = teacher.with_adapter(adapter)
    student.lora, student.student_timesteps = spec, None
    student.prediction_type = prediction_type or teacher.prediction_type
    student.guidance_folded = not student.guidance_conditioned
    student.teacher_fingerprints = [*teacher.teacher_fingerprints, teacher.identity]
    student.source = teacher.base_source if teacher.adapter else teacher.source
    return student
