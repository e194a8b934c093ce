"""The training data loader (ddil_cli/data/loader.py): ranks x workers read every sample of a pass
exactly once; the stream does not depend on the worker count; a resume continues at the very next
sample, in the loader and in `ddil distill`; stored prompt encodings reach the loss as the text
encoder gives them, without it."""

from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddil_cli.data.loader import DataStream, ShardSource, plan_lanes
from ddil_cli.data.shards import ImageCaptionShards, resolve_shards
from ddil_cli.errors import UserError
from test_encode import write_image_shards


def _source(folder: Path) -> ShardSource:
    return ShardSource(tuple(resolve_shards(str(folder))), resolution=8, channels=3)


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """40 shards: whole shards per consumer for 2 ranks x 16 lanes (32 consumers, 1 or 2 shards each)."""
    return write_image_shards(tmp_path_factory.mktemp("loader") / "data", shards=40, per_shard=3)


@pytest.fixture(scope="module")
def few_shards(tmp_path_factory):
    """3 shards: shared by the consumers, each reading a disjoint slice of a shard."""
    return write_image_shards(tmp_path_factory.mktemp("loader-few") / "data", shards=3, per_shard=40)


@pytest.mark.parametrize("which", ["many_shards", "few_shards"])
def test_two_ranks_by_two_workers_read_every_sample_of_a_pass_once(which, request):
    folder = request.getfixturevalue(which)
    usable = Counter(s.key for s in ImageCaptionShards(str(folder), resolution=8))
    assert sum(usable.values()) == 120 - 2  # one undecodable image and one empty caption, both skipped
    first_pass = Counter()
    for rank in range(2):
        stream = DataStream(_source(folder), rank=rank, ranks=2, seed=3, workers=2)
        taken = stream.take(3 * 120)  # well past every lane's first pass
        stream.close()
        first_pass.update(k for k, e in zip(taken.keys, taken.epochs) if e == 0)
        assert set(taken.epochs) >= {0, 1}
    assert first_pass == usable  # every usable sample once: none missing, none repeated


def test_lanes_split_shards_or_slices_without_overlap():
    for shards, consumers in ((40, 32), (3, 32), (32, 32), (100, 16)):
        lanes = plan_lanes(shards, consumers)
        held = Counter((s, r) for lane in lanes for s in lane.shards for r in range(lane.part, 60, lane.of))
        assert set(held.values()) == {1} and len(held) == shards * 60


@pytest.mark.parametrize("workers", [2, 4])
def test_worker_counts_give_the_same_stream(few_shards, workers):
    sizes = [5, 1, 17, 9, 30]
    streams = [DataStream(_source(few_shards), seed=1, workers=w) for w in (0, workers)]
    for n in sizes:
        a, b = (s.take(n) for s in streams)
        assert a.keys == b.keys and torch.equal(a.x, b.x)
    for s in streams:
        s.close()


def test_a_stream_resumes_at_the_next_sample(many_shards):
    whole = DataStream(_source(many_shards), seed=2, workers=2)
    whole.take(37)
    state = whole.state()
    after = whole.take(50)
    resumed = DataStream(_source(many_shards), seed=2, workers=4)
    resumed.load_state(state)
    again = resumed.take(50)
    assert again.keys == after.keys and torch.equal(again.x, after.x)
    for s in (whole, resumed):
        s.close()


def test_seed_sets_the_order(many_shards):
    keys = [DataStream(_source(many_shards), seed=seed).take(60).keys for seed in (0, 0, 1)]
    assert keys[0] == keys[1] and keys[0] != keys[2]


def test_no_usable_sample_is_one_line(tmp_path):
    import webdataset as wds

    folder = tmp_path / "bad"
    folder.mkdir()
    with wds.TarWriter(str(folder / "data-000000.tar")) as sink:
        for k in range(3):
            sink.write({"__key__": f"k{k}", "png": b"not an image", "txt": "a caption"})
    with pytest.raises(UserError, match="no usable image-caption samples.*3 bad image"):
        DataStream(_source(folder), workers=2).take(1)
    with pytest.raises(UserError, match="--data-workers 3"):
        DataStream(_source(folder), workers=3)


# ---- in `ddil distill` ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ddil_cli.models import load_denoiser
    from ddil_cli.stages.encode import EncodeConfig, run_encode
    from tiny_models import build_tiny_sd

    root = tmp_path_factory.mktemp("loader-distill")
    teacher = build_tiny_sd(root / "teacher")
    data = write_image_shards(root / "data", shards=3, per_shard=6)
    run_encode(EncodeConfig(teacher=str(teacher), data=str(data), out=str(root / "enc"), batch_size=4, quiet=True),
               load_denoiser(str(teacher)))
    return root, teacher, data


def _cfg(teacher, data, out, **kwargs):
    from ddil_cli.stages.distill import DistillConfig

    return DistillConfig(**{"method": "pd", "teacher": str(teacher), "data": str(data), "steps": 2,
                            "teacher_steps": 8, "options": {"stage_updates": "3"}, "batch_size": 3, "prior": "data=1",
                            "checkpoint_every": 2, "data_workers": 2, "out": str(out), "quiet": True, **kwargs})


@pytest.mark.parametrize("encoded", [False, True])
def test_distill_resume_with_data_workers_is_exact(tiny, tmp_path, monkeypatch, encoded):
    from resume import crash_and_resume
    from ddil_cli.stages.distill import run_distill

    root, teacher, data = tiny
    source = root / "enc" if encoded else data
    run_distill(_cfg(teacher, source, tmp_path / "full"))
    assert len(list((tmp_path / "full/stages").iterdir())) == 2
    # two PD stages (8 -> 4 -> 2 steps) of 3 updates: the crash comes in the second, the first done
    crash_and_resume(_cfg(teacher, source, tmp_path / "broken"), tmp_path / "broken", monkeypatch, 5)
    full, resumed = (load_file(str(tmp_path / r / "student/unet/diffusion_pytorch_model.safetensors"))
                     for r in ("full", "broken"))
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def test_stored_encodings_reach_the_loss_without_the_text_encoder(tiny, monkeypatch, tmp_path):
    from ddil_cli.methods.pd import PDMethod
    from ddil_cli.models.diffusers_t2i import DiffusersDenoiser
    from ddil_cli.stages.distill import run_distill

    root, teacher, _data = tiny
    reference = DiffusersDenoiser.encode  # the text encoder, before the run is watched
    encoded_prompts, seen = [], []
    monkeypatch.setattr(DiffusersDenoiser, "encode",
                        lambda self, prompts: encoded_prompts.extend(prompts) or reference(self, prompts))
    loss = PDMethod.loss
    monkeypatch.setattr(PDMethod, "loss", lambda self, group, nets, batch: seen.append(batch) or
                        loss(self, group, nets, batch))
    run_distill(_cfg(teacher, root / "enc", tmp_path / "run", data_workers=0))
    assert seen and all(p == "" for p in encoded_prompts)  # only the empty prompt, once, for the uncond rows
    from ddil_cli.models import load_denoiser

    text = load_denoiser(str(teacher))
    for batch in seen:
        expected = reference(text, batch.cond.prompts)
        for key in expected.cond:
            torch.testing.assert_close(batch.cond.cond[key], expected.cond[key], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batch.cond.uncond[key], expected.uncond[key], atol=1e-5, rtol=1e-5)
