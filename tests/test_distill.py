"""`ddil distill`: tiny real runs on the lab and on a tiny diffusers pipeline; exact resume;
the non-finite guard; prior frequencies; one-line errors that leave the run folder alone."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddil_cli.buffer.pool import ReplayPool
from ddil_cli.errors import UserError
from ddil_cli.methods.base import MethodOptions
from ddil_cli.methods.pd import PDMethod, PDOptions
from ddil_cli.models.gmm import GMMDenoiser
from ddil_cli.models.mlp import mlp_student_for
from ddil_cli.priors import PhaseSchedule, PriorSchedule
from ddil_cli.stages.distill import DistillConfig, run_distill
from ddil_cli.stages.distill.batches import InputAssembler
from ddil_cli.stages.distill.plan import Plan
from cli_runner import run_cli as cli
from lab_fit import x0_error_to_teacher
from resume import crash_and_resume

LAB = dict(method="pd", teacher="gmm:ring:8", steps=4, teacher_steps=16, batch_size=16, lr=1e-3,
           collect_every=3, rollouts_per_collect=8, quiet=True, log_every=2)


def _stage_weights(run: Path, stage: str) -> dict:
    return load_file(str(run / "stages" / stage / "model.safetensors"))


def test_lab_run_with_and_without_ddil(tmp_path):
    ddil = run_distill(DistillConfig(**LAB, options={"stage_updates": "6"}, out=str(tmp_path / "ddil")))
    plain = run_distill(DistillConfig(**LAB, options={"stage_updates": "6"}, prior="data=1", out=str(tmp_path / "plain")))
    assert [p["phase"] for p in ddil["phases"]] == ["pd-8", "pd-4"]
    # the default schedule starts DDIL at the second halving stage (--ddil-from-stage 2)
    assert [p["buffer_states"] > 0 for p in ddil["phases"]] == [False, True]
    assert all(p["buffer_states"] == 0 for p in plain["phases"])  # teacher forcing: no rollouts
    # so the first stage is plain PD's to the bit, and the second is not
    first, first_plain = _stage_weights(tmp_path / "ddil", "pd-8"), _stage_weights(tmp_path / "plain", "pd-8")
    assert all(torch.equal(first[k], first_plain[k]) for k in first)
    last, last_plain = _stage_weights(tmp_path / "ddil", "pd-4"), _stage_weights(tmp_path / "plain", "pd-4")
    assert not all(torch.equal(last[k], last_plain[k]) for k in last)
    manifest = json.loads((tmp_path / "ddil/manifest.json").read_text())
    assert manifest["method_options"]["ddil_from_stage"] == 2
    assert [p["ddil"] for p in manifest["phases"]] == [False, True]
    student = json.loads((tmp_path / "ddil/student/ddil_mlp.json").read_text())
    assert student["timesteps"] == [999, 749, 499, 249]
    rows = [json.loads(line) for line in open(tmp_path / "ddil/metrics.jsonl")]
    assert {"loss/data", "loss/t0", "lr", "grad_norm", "updates_per_s"} <= set(rows[-1])
    assert any("loss/student" in row for row in rows)  # the default schedule ends on data alone
    assert not any("loss/student" in row for row in rows if row["phase"] == "pd-8")
    manifest = json.loads((tmp_path / "ddil/buffer/pd-4/manifest.json").read_text())
    assert manifest["counts"]["total"] > 0 and manifest["header"]["grid"]["timesteps"] == [999, 749, 499, 249]


@pytest.mark.parametrize("options", [None, {"lab_init_steps": 20}], ids=["fresh", "fitted"])
def test_resume_gives_the_uninterrupted_weights(tmp_path, monkeypatch, options):
    cfg = DistillConfig(**LAB, options={"stage_updates": "8", **(options or {})}, checkpoint_every=4,
                        out=str(tmp_path / "full"))
    run_distill(cfg)
    crash_and_resume(cfg, tmp_path / "broken", monkeypatch, 12)
    full = load_file(str(tmp_path / "full/student/model.safetensors"))
    resumed = load_file(str(tmp_path / "broken/student/model.safetensors"))
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def test_checkpoints_read_the_replay_pool_back_from_the_run_s_shards(tmp_path, monkeypatch):
    # a small --buffer-size: the FIFO drops shards between checkpoints, but never one the latest reads
    cfg = DistillConfig(**{**LAB, "prior": "data=0.5,student=0.5", "collect_every": 2, "rollouts_per_collect": 2},
                        options={"stage_updates": "8"}, checkpoint_every=2, buffer_size=12, out=str(tmp_path / "full"))
    run_distill(cfg)
    crash_and_resume(cfg, tmp_path / "broken", monkeypatch, 12)
    dropped = json.loads((tmp_path / "full/buffer/pd-4/manifest.json").read_text())
    assert dropped["counts"]["total"] < 4 * 2 * 4 * 2  # the FIFO did drop shards
    for run in ("full", "broken"):
        last = tmp_path / run / "checkpoints/checkpoint-00000016"
        assert "extra.pool.states" not in load_file(str(last / "state.safetensors"))  # no copy of the pool
    full, resumed = (json.loads((tmp_path / r / "checkpoints/checkpoint-00000016/state.json").read_text())["extra"]
                     for r in ("full", "broken"))
    assert full["pool"]["keys"] and full["data_index"] == resumed["data_index"]
    same = lambda pool: {k: v for k, v in pool.items() if k != "keys"}  # a resumed run writes new shard names
    assert same(full["pool"]) == same(resumed["pool"])
    a, b = (load_file(str(tmp_path / r / "student/model.safetensors")) for r in ("full", "broken"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lab_init_fits_the_first_stage_student_to_the_analytic_teacher():
    # --lab-init-steps: a real student starts as a copy of its teacher; the lab's analytic teacher
    # has no weights, so the first stage's MLP is fitted to it. Later stages copy their MLP teacher.
    from ddil_cli.methods.base import PlanRequest
    from ddil_cli.models import load_denoiser

    teacher = load_denoiser("gmm:ring:8")
    fitted_opts, fresh_opts = PDOptions(lab_init_steps=300), PDOptions()
    phases = PDMethod.plan(PlanRequest(steps=4, teacher_steps=16, max_updates=8), teacher, fresh_opts)
    torch.manual_seed(0)
    fitted = PDMethod.make_student(teacher, phases[0], fitted_opts, guidance_embedding=False)
    torch.manual_seed(0)
    fresh = PDMethod.make_student(teacher, phases[0], fresh_opts, guidance_embedding=False)
    assert x0_error_to_teacher(fitted, teacher) < 0.2 * x0_error_to_teacher(fresh, teacher)
    second = PDMethod.make_student(fitted, phases[1], fitted_opts, guidance_embedding=False)
    for a, b in zip(second.network.parameters(), fitted.network.parameters()):
        assert torch.equal(a, b)  # a copy of its MLP teacher, not fitted again


def test_ema_is_published_and_the_checkpoint_keeps_the_online_weights(tmp_path):
    run_distill(DistillConfig(**{**LAB, "teacher_steps": 8}, options={"stage_updates": "6"}, prior="data=1", ema_decay=0.5,
                              out=str(tmp_path / "run")))
    published = load_file(str(tmp_path / "run/student/model.safetensors"))
    (last,) = sorted((tmp_path / "run/checkpoints").iterdir())[-1:]
    online = load_file(str(last / "student.safetensors"))
    state = load_file(str(last / "state.safetensors"))
    shadow = [state[k] for k in sorted((k for k in state if k.startswith("ema.shadow_params.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    from ddil_cli.models.mlp import MLPDenoiser

    params = list(MLPDenoiser.from_pretrained(tmp_path / "run/student").network.parameters())
    assert len(params) == len(shadow) and all(torch.equal(p, s) for p, s in zip(params, shadow))  # EMA published
    assert any(not torch.equal(published[k], online[k]) for k in online)  # online weights kept


def test_nonfinite_loss_is_skipped_counted_and_stops(tmp_path, monkeypatch):
    loss = PDMethod.loss
    calls = {"n": 0}

    def sometimes_nan(self, group, nets, batch):
        calls["n"] += 1
        value = loss(self, group, nets, batch)
        return value * float("nan") if calls["n"] in (2, 3) else value
    monkeypatch.setattr(PDMethod, "loss", sometimes_nan)
    summary = run_distill(DistillConfig(**{**LAB, "teacher_steps": 8}, options={"stage_updates": "6"}, prior="data=1",
                                        out=str(tmp_path / "a")))
    assert summary["phases"][0]["nonfinite_skipped"] == 2
    monkeypatch.setattr(PDMethod, "loss", lambda self, group, nets, batch: loss(self, group, nets, batch) * float("nan"))
    with pytest.raises(UserError, match="non-finite for 3 updates in a row"):
        run_distill(DistillConfig(**{**LAB, "teacher_steps": 8}, options={"stage_updates": "6"}, prior="data=1",
                                  max_nonfinite=3, out=str(tmp_path / "b")))


def test_prior_frequencies_in_assembled_batches():
    teacher = GMMDenoiser("gmm:ring:8")
    student = mlp_student_for(teacher, hidden=16, layers=1)
    pool = ReplayPool()
    for source in ("student", "teacher"):
        pool.add(torch.randn(50, 2), torch.tensor([999, 749, 499, 249])[torch.randint(4, (50,))], torch.ones(50), ["class 1"] * 50, [source] * 50,
                 [f"{source}-{i}" for i in range(50)])
    prior = "data=0.2,student=0.5,teacher=0.3"
    plan = Plan(PDMethod, MethodOptions(), [], PriorSchedule.parse(prior), PhaseSchedule((0,), (0.5,)), (1.0, 1.0),
                False, None, ["class 0"])
    from ddil_cli.buffer.sources import DataStates

    assembler = InputAssembler(teacher=teacher, student=student, timesteps=[999, 749, 499, 249], plan=plan,
                               pool=pool, data=DataStates(teacher, prompts=["class 0", "class 2"]),
                               batch_size=64, total_updates=100, generator=torch.Generator().manual_seed(0),
                               device="cpu")
    counts = {"data": 0, "student": 0, "teacher": 0}
    for update in range(100):
        batch = assembler(update)
        assert batch.x_t.shape == (64, 2) and len(batch.source) == 64
        for s in batch.source:
            counts[s] += 1
    total = sum(counts.values())
    for source, p in (("data", 0.2), ("student", 0.5), ("teacher", 0.3)):
        assert abs(counts[source] / total - p) < 0.03, counts  # ~5 binomial std


@pytest.mark.parametrize("mix", ["matched", "batch"])
def test_matched_mix_trains_every_timestep_as_without_ddil(mix):
    """--ddil-mix matched (LCM's default): each input's timestep is drawn first, uniform on the
    training grid, and a buffer state stands in for data only at a timestep the pool holds; the
    batch mix gives the buffer's timesteps half of every batch (the lab LCM's loss)."""
    from ddil_cli.buffer.sources import DataStates
    from ddil_cli.methods.lcm import LCMMethod, LCMOptions

    teacher = GMMDenoiser("gmm:ring:8")
    student = mlp_student_for(teacher, hidden=16, layers=1)
    grid = list(range(900, -1, -100))  # 10 training timesteps
    pool = ReplayPool()
    for t, marker in ((900, 7.0), (500, -7.0)):  # states only at two of them, marked by their value
        pool.add(torch.full((40, 2), marker), torch.full((40,), t), torch.ones(40), ["class 1"] * 40,
                 ["student"] * 40, [f"s{t}-{i}" for i in range(40)])
    plan = Plan(LCMMethod, LCMOptions(ddil_mix=mix), [], PriorSchedule.parse("data=0.5,student=0.5"),
                PhaseSchedule((0,), (1.0,)), (1.0, 1.0), True, None, ["class 0"])
    assembler = InputAssembler(teacher=teacher, student=student, timesteps=grid, plan=plan, pool=pool,
                               data=DataStates(teacher, prompts=["class 0", "class 2"]), batch_size=64,
                               total_updates=100, generator=torch.Generator().manual_seed(0), device="cpu")
    counts, student_counts = {t: 0 for t in grid}, {t: 0 for t in grid}
    for update in range(150):
        batch = assembler(update)
        for x, t, source in zip(batch.x_t, batch.t.tolist(), batch.source):
            counts[t] += 1
            if source == "student":
                student_counts[t] += 1
                assert x.tolist() == ([7.0, 7.0] if t == 900 else [-7.0, -7.0])  # the state held at its t
    total = sum(counts.values())
    assert set(t for t, n in student_counts.items() if n) == {900, 500}
    if mix == "matched":
        for t in grid:  # 960 expected each; binomial std ~29
            assert abs(counts[t] - total / 10) < 150, counts
        for t in (900, 500):  # half of these timesteps' inputs from the buffer, as the prior says
            assert abs(student_counts[t] / counts[t] - 0.5) < 0.06, (t, student_counts[t], counts[t])
    else:  # the buffer's two timesteps take half of every batch between them
        assert abs((counts[900] + counts[500]) / total - 0.6) < 0.03, counts


def test_diffusers_student_loads_in_plain_diffusers(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from tiny_models import build_tiny_sd

    teacher = tmp_path / "teacher"
    build_tiny_sd(teacher)
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    summary = run_distill(DistillConfig(method="pd", teacher=str(teacher), prompts=str(tmp_path / "prompts.txt"),
                                        prior="student=0.5,teacher=0.5", steps=4, teacher_steps=8,
                                        options={"stage_updates": "2"}, batch_size=2, collect_every=2, rollouts_per_collect=2,
                                        guidance=2.0, quiet=True, out=str(tmp_path / "run")))
    assert summary["phases"][0]["buffer_states"] > 0
    student = tmp_path / "run/student"
    unet = UNet2DConditionModel.from_pretrained(student / "unet")
    assert unet.config.time_cond_proj_dim is not None  # CFG was folded into a w-conditioned student
    scheduler = DDIMScheduler.from_pretrained(student / "scheduler")
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
    pipe = StableDiffusionPipeline.from_pretrained(student, safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.config.time_cond_proj_dim == unet.config.time_cond_proj_dim
    # it samples at the w it was distilled at unless told otherwise (it used to get the teacher's)
    from ddil_cli.models import load_denoiser
    from ddil_cli.sample_folder import SampleConfig, plan_sampling
    from ddil_cli.stages.distill import make_plan

    assert json.loads((student / "ddil_defaults.json").read_text())["guidance"] == 2.0
    teacher_model, student_model = load_denoiser(str(teacher)), load_denoiser(str(student))
    assert teacher_model.default_guidance != 2.0
    plan = lambda **kw: plan_sampling(SampleConfig(teacher=str(teacher), prompt=["a cat"], **kw), teacher_model,
                                      student_model if "student" in kw else None)
    assert plan(student=str(student)).guidance == 2.0
    assert plan(student=str(student), guidance=5.0).guidance == 5.0
    assert plan().guidance == teacher_model.default_guidance
    # a trained range keeps the teacher's default w inside it
    ranged = lambda text: make_plan(DistillConfig(method="pd", teacher=str(teacher), prior="student=1",
                                                  prompts=str(tmp_path / "prompts.txt"), guidance_range=text),
                                    teacher_model).sampling_guidance
    low, high = teacher_model.default_guidance - 1, teacher_model.default_guidance + 1
    assert ranged(f"{low},{high}") == teacher_model.default_guidance
    assert ranged(f"{high},{high + 1}") == high and ranged(f"1,{low}") == low


@pytest.mark.parametrize("extra,needle", [
    (["--method", "gan"], "unknown --method"),
    (["--method", "lcm", "--critic-updates", "3"], "is not an option of --method lcm"),
    (["--steps", "3"], "cannot reach --steps 3"),
    (["--prior", "data=0.5,student=0.6"], "sum to 1.1"),
    (["--prior", "data=-1,student=2"], "non-negative"),
    (["--student-prob", "1.5"], "outside [0, 1]"),
    (["--data", "/no/such/shards"], "drop --data"),
])
def test_bad_input_is_one_line_and_creates_nothing(tmp_path, capsys, extra, needle):
    out = tmp_path / "run"
    code, err = cli(["distill", "--quiet", "--out", str(out), *extra], capsys)
    assert code == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists(), err


def test_lab_init_on_a_teacher_with_weights_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = cli(["distill", "--quiet", "--out", str(out), "--teacher", "embedded:digits", "--lab-init-steps",
                     "100"], capsys)
    # the last line: transformers' weight-loading bar may precede it in-process (the CLI hides it)
    assert code == 2 and "embedded:digits is not one (its student starts from its weights)" in err
    assert err.strip().splitlines()[-1].startswith("error:") and not out.exists()


def test_a_student_only_prior_after_a_data_stage(tmp_path):
    # the lab opens its data for the teacher-forced first stage though the prior gives data no weight
    cfg = DistillConfig(**LAB, prior="student=1", student_prob="1",
                        options={"stage_updates": "4", "ddil_from_stage": 2}, out=str(tmp_path / "run"))
    summary = run_distill(cfg)
    assert [p["buffer_states"] > 0 for p in summary["phases"]] == [False, True]
    rows = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl")]
    assert all(set(r) & {"loss/data", "loss/student"} == {"loss/data"} for r in rows if r["phase"] == "pd-8")
    assert all(set(r) & {"loss/data", "loss/student"} == {"loss/student"} for r in rows if r["phase"] == "pd-4")


def test_stages_before_ddil_need_data(tmp_path, capsys):
    # a student-only prior needs no data, but the stages before --ddil-from-stage train on data
    out = tmp_path / "run"
    code, err = cli(["distill", "--quiet", "--out", str(out), "--teacher", "embedded:digits", "--prior", "student=1",
                     "--ddil-from-stage", "2"], capsys)
    assert code == 2 and "stage pd-16 comes before --ddil-from-stage" in err and "--data SHARDS" in err
    assert err.strip().splitlines()[-1].startswith("error:") and not out.exists()


def test_resume_with_other_settings_is_refused_and_leaves_run(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["distill", "--quiet", "--teacher-steps", "8", "--stage-updates", "2", "--prior", "data=1",
            "--batch-size", "8", "--out", str(out)]
    assert cli(args, capsys)[0] == 0
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    code, err = cli([*args, "--resume", "latest", "--steps", "2"], capsys)
    assert code == 2 and "steps=4" in err
    code, err = cli(args, capsys)
    assert code == 2 and "--resume latest" in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_image_data_without_usable_samples(tmp_path, capsys):
    from tiny_models import build_tiny_pixel

    build_tiny_pixel(tmp_path / "teacher")
    (tmp_path / "shards").mkdir()
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "shards/bad-000000.tar")) as sink:
        sink.write({"__key__": "a", "png": b"not a png", "txt": b"a caption"})
    code, err = cli(["distill", "--quiet", "--teacher", str(tmp_path / "teacher"), "--data",
                     str(tmp_path / "shards"), "--prior", "data=1", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "no usable" in err, err
    assert not (tmp_path / "run").exists()


def test_external_collect_buffer_feeds_the_matching_stage(tmp_path, capsys):
    buffer = tmp_path / "buffer"
    assert cli(["collect", "--quiet", "--teacher", "gmm:ring:8", "--steps", "4", "--teacher-steps", "8",
                "--prior", "teacher=1", "--rollouts", "6", "--out", str(buffer)], capsys)[0] == 0
    summary = run_distill(DistillConfig(**{**LAB, "teacher_steps": 8, "collect_every": 0}, options={"stage_updates": "3"},
                                        buffer=str(buffer), prior="teacher=1", out=str(tmp_path / "run")))
    assert summary["phases"][0]["buffer_states"] == 6 * 4
    code, err = cli(["distill", "--quiet", "--teacher-steps", "16", "--steps", "8", "--buffer", str(buffer),
                     "--out", str(tmp_path / "other")], capsys)
    assert code == 2 and "grid" in err


def test_tensorboard_tracker_logs_through_accelerate(tmp_path):
    run_distill(DistillConfig(**{**LAB, "teacher_steps": 8}, options={"stage_updates": "4"}, prior="data=1",
                              tracker="tensorboard", out=str(tmp_path / "run")))
    assert list((tmp_path / "run/logs").rglob("events.out.tfevents*"))


@pytest.mark.parametrize("prior", [None, "data=1", "student=1"])
def test_pixel_diffusers_teacher_with_real_data_with_and_without_ddil(tmp_path, prior):
    # student=1: no input is forward-diffused data, yet the rollouts take the data's captions
    # (this crashed DMD2's default prior on an image teacher given --data and no --prompts)
    from ddil_cli.data.digits import build_digits_shards
    from tiny_models import build_tiny_pixel

    build_tiny_pixel(tmp_path / "teacher")
    build_digits_shards(tmp_path / "digits")
    summary = run_distill(DistillConfig(method="pd", teacher=str(tmp_path / "teacher"), prior=prior,
                                        data=str(tmp_path / "digits/train-{000000..000001}.tar"),
                                        steps=4, teacher_steps=8, options={"stage_updates": "3"}, batch_size=4,
                                        collect_every=2, rollouts_per_collect=2, quiet=True,
                                        out=str(tmp_path / "run")))
    (phase,) = summary["phases"]
    assert phase["updates"] == 3 and (phase["buffer_states"] > 0) == (prior != "data=1")
    rows = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl")]
    assert ("loss/data" in rows[-1]) == (prior != "student=1") and all(r["nonfinite_skipped"] == 0 for r in rows)
    if prior == "student=1":
        import tarfile

        captions = set()
        for shard in (tmp_path / "digits").glob("train-*.tar"):
            with tarfile.open(shard) as tar:
                captions |= {tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")}
        prompts = set(json.loads((tmp_path / "run/buffer/pd-4/prompts.json").read_text()).values())
        assert prompts and prompts <= captions


def test_two_processes_under_torchrun_share_one_run(tmp_path):
    """A real 2-process (gloo) run: each rank collects into its own shards of one buffer."""
    import os
    import subprocess
    import sys

    import ddil_cli

    main_py = Path(ddil_cli.__file__).parent / "__main__.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(main_py), "distill", "--teacher", "gmm:ring:8", "--teacher-steps", "8",
                           "--stage-updates", "6", "--batch-size", "16", "--collect-every", "3",
                           "--rollouts-per-collect", "4", "--device", "cpu", "--quiet", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shards = sorted(p.name for p in (tmp_path / "run/buffer/pd-4").glob("shard-*.tar"))
    assert {name.split("-")[2] for name in shards} == {"000", "001"}  # both ranks wrote, disjoint names
    assert (tmp_path / "run/student/model.safetensors").is_file()


def test_teacher_states_are_rolled_at_every_collection(tmp_path):
    # rolled only while the pool had none, the `teacher` source was a few trajectories for a whole stage
    cfg = DistillConfig(**{**LAB, "teacher_steps": 8}, options={"stage_updates": "7"}, prior="data=0.5,teacher=0.5",
                        out=str(tmp_path / "run"))
    summary = run_distill(cfg)
    collections = -(-7 // LAB["collect_every"])  # updates 0, 3, 6
    per_rollout = cfg.steps  # states on the 4-step grid
    assert summary["phases"][0]["buffer_states"] == collections * LAB["rollouts_per_collect"] * per_rollout
    manifest = json.loads((tmp_path / "run/buffer/pd-4/manifest.json").read_text())
    assert manifest["counts"]["total"] == summary["phases"][0]["buffer_states"]
    # one buffer record (two tar members) per collection, holding its trajectories' states whole
    import tarfile

    from ddil_cli.buffer.reader import BufferReader

    members = 0
    for shard in manifest["shards"]:
        with tarfile.open(tmp_path / "run/buffer/pd-4" / shard["name"]) as tar:
            members += len(tar.getnames())
    assert members == 2 * collections  # teacher rollouts only: one roll per collection
    by_record: dict[str, list] = {}
    for sample in BufferReader(str(tmp_path / "run/buffer/pd-4"), shuffle=0, split_by_node=False,
                               split_by_worker=False):
        by_record.setdefault(sample.key.rsplit("-", 1)[0], []).append((sample.meta["rollout_id"], sample.t))
    for states in by_record.values():
        rollout_ids = [rid for rid, _ in states]
        assert len(set(rollout_ids)) == LAB["rollouts_per_collect"]
        assert all(rollout_ids.count(rid) == per_rollout for rid in rollout_ids)  # every trajectory whole


def test_no_collection_once_no_later_prior_draws_buffer_states(tmp_path):
    # a schedule that ends on data only: rollouts after the switch would never be drawn
    cfg = DistillConfig(**{**LAB, "teacher_steps": 8}, options={"stage_updates": "7"},
                        prior_schedule="0:data=0.5,student=0.5;4:data=1", out=str(tmp_path / "run"))
    summary = run_distill(cfg)
    collections = 2  # updates 0 and 3; the one at update 6 falls in the data-only phase
    assert summary["phases"][0]["buffer_states"] == collections * LAB["rollouts_per_collect"] * cfg.steps
    from ddil_cli.buffer.reader import BufferReader

    reader = BufferReader(str(tmp_path / "run/buffer/pd-4"), shuffle=0, split_by_node=False, split_by_worker=False)
    assert {sample.meta["student_version"] for sample in reader} == {0, 3}
    # one writer for the phase: one collect run, finished, and one shard committed per collection
    manifest = json.loads((tmp_path / "run/buffer/pd-4/manifest.json").read_text())
    assert [(r["run"], r["ranks"]["0"]["finished"], r["ranks"]["0"]["shards"]) for r in manifest["runs"]] == \
        [(0, True, collections)]
    assert not list((tmp_path / "run/buffer/pd-4").glob(".*.partial"))
