"""The DDIL-effect bench's paired statistics against scipy's own paired t-test."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

# the bench's scripts import their parts as `effect.*` (bench/ is their folder); appended, so no
# bench script shadows an installed module of the same name
sys.path.append(str(Path(__file__).parents[1] / "bench"))
import ddil_effect  # noqa: E402
from effect import runner, suites  # noqa: E402
from effect.stats import paired_comparison  # noqa: E402


@pytest.mark.parametrize("n,shift", [(3, 0.0), (5, 0.3), (5, 2.0), (8, -1.0), (12, 0.05)])
def test_interval_and_p_match_scipy_ttest_rel(n, shift):
    rng = np.random.default_rng(n)
    base = rng.normal(1.0, 0.5, n)
    treated = base + shift + rng.normal(0, 0.4, n)
    c = paired_comparison(base.tolist(), treated.tolist(), higher_is_better=True)
    ref = stats.ttest_rel(treated, base)
    ci = ref.confidence_interval(0.95)
    assert c["n"] == n
    assert c["diff"] == pytest.approx(float(np.mean(treated - base)))
    assert c["lo"] == pytest.approx(float(ci.low)) and c["hi"] == pytest.approx(float(ci.high))
    assert c["p"] == pytest.approx(float(ref.pvalue))
    assert c["std_base"] == pytest.approx(float(np.std(base, ddof=1)))
    # the verdict is significance at 5%, signed by the metric's direction
    significant = ref.pvalue < 0.05
    assert (c["verdict"] != "tie") == significant
    if significant:
        assert c["verdict"] == ("better" if np.mean(treated - base) > 0 else "worse")
        flipped = paired_comparison(base.tolist(), treated.tolist(), higher_is_better=False)
        assert flipped["verdict"] == ("worse" if c["verdict"] == "better" else "better")


def test_clear_differences_get_their_verdicts_and_noise_ties():
    base = [0.80, 0.82, 0.79, 0.81, 0.80]
    assert paired_comparison(base, [b + 0.05 + 0.001 * i for i, b in enumerate(base)],
                             higher_is_better=True)["verdict"] == "better"
    assert paired_comparison(base, [b + 0.05 + 0.001 * i for i, b in enumerate(base)],
                             higher_is_better=False)["verdict"] == "worse"
    assert paired_comparison(base, [b + d for b, d in zip(base, [0.03, -0.02, 0.01, -0.03, 0.0])],
                             higher_is_better=True)["verdict"] == "tie"


def test_degenerate_inputs():
    one = paired_comparison([1.0], [2.0], higher_is_better=True)
    assert one["verdict"] == "n/a" and math.isnan(one["lo"])
    same = paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], higher_is_better=True)
    assert same["verdict"] == "tie" and same["lo"] == same["hi"] == 0.0
    constant = paired_comparison([1.0, 2.0, 3.0], [1.5, 2.5, 3.5], higher_is_better=True)
    assert constant["verdict"] == "better" and constant["rel_diff"] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        paired_comparison([1.0, 2.0], [1.0], higher_is_better=True)


def test_a_cached_arm_counts_only_under_the_settings_it_ran_with():
    import dataclasses
    import json

    from ddil_cli.stages.distill import DistillConfig

    def record(cfg, collect_seconds):
        return json.loads(json.dumps({"config": dataclasses.asdict(cfg), "collect_seconds": collect_seconds}))

    ddil = DistillConfig(teacher="gmm:ring:8", collect_every=30, out="/a/run", data="/a/data")
    matches = runner.cache_matches
    # another work folder (out, data) is the same run; a changed setting is not
    assert matches(record(ddil, 1.0), dataclasses.replace(ddil, out="/b/run", data="/b/data"))
    assert not matches(record(ddil, 1.0), dataclasses.replace(ddil, collect_every=40))
    assert not matches(record(ddil, 1.0), dataclasses.replace(ddil, lr=1e-3))
    # a teacher-forced arm collected nothing: collection settings cannot have changed it
    plain = dataclasses.replace(ddil, prior="data=1")
    assert matches(record(plain, 0.0), dataclasses.replace(plain, collect_every=40))
    assert not matches(record(plain, 0.0), dataclasses.replace(plain, max_updates=7))
    # a record from before a field existed had that field's default
    old = record(ddil, 1.0)
    del old["config"]["merge_lora"]
    assert matches(old, ddil)


def test_overrides_take_each_field_s_type_optional_ones_included():
    parsed = ddil_effect._parse_overrides(["guidance=4", "max_updates=10", "--prior-schedule=0:data=1",
                                            'options={"lab_init_steps": 5}', "threshold=none"])
    # guidance defaults to None: it used to stay the string "4"
    assert parsed == {"guidance": 4.0, "max_updates": 10, "prior_schedule": "0:data=1",
                      "options": {"lab_init_steps": 5}, "threshold": "none"}
    assert type(parsed["guidance"]) is float and type(parsed["max_updates"]) is int
    # an empty value unsets an optional field (the LCM arm's own --prior, to give a schedule instead)
    assert ddil_effect._parse_overrides(["prior=", "prior_schedule=0:data=1"]) == {"prior": None,
                                                                                   "prior_schedule": "0:data=1"}
    with pytest.raises(SystemExit):
        ddil_effect._parse_overrides(["no_such_field=1"])


def test_an_arm_s_options_keep_the_jump_regime_s_stages():
    regime = suites.jump_regimes(32)["jump 8 (1 stage 32->4)"]
    settings = runner.merged(suites.LAB_BASE, regime, {"options": {"lab_init_steps": 5}})
    arm = runner.merged(settings, {"prior": "data=1", "options": {"ddil_from_stage": 1}})
    assert arm["options"] == {"pd_stages": "32,4", "lab_init_steps": 5, "ddil_from_stage": 1}
    assert arm["steps"] == 4 and arm["prior"] == "data=1" and arm["teacher"] == suites.LAB_BASE["teacher"]
    assert "options" not in runner.merged(suites.LAB_BASE, {"prior": "data=1"})


def test_suites_are_data_and_quick_takes_the_smoke_values(tmp_path):
    lab = suites.make_suite("lab", False, tmp_path)
    assert lab.base == suites.LAB_BASE and lab.regimes == suites.LAB_REGIMES and lab.per_prompt == 256
    quick = suites.make_suite("lab", True, tmp_path, jumps=True)
    assert quick.base["max_updates"] == 300 and quick.shift_samples == 256
    assert quick.regimes == suites.jump_regimes(32)
    assert quick.data is None and quick.prompts is None
    assert suites.method_arms("no-such-method") == suites.ARMS["pd"]


def test_takeover_rows_come_from_what_run_shift_returns_and_are_cached(tmp_path, monkeypatch):
    results = {"beta-1": {"name": "beta-1", "kind": "beta", "value": 1.0, "teacher_share": 1.0, "nfe_per_sample": 64,
                          "metrics": {"swd": 0.1, "quality": None}},
               "s2t-249": {"name": "s2t-249", "kind": "s2t", "value": 249, "teacher_share": 0.25,
                           "nfe_per_sample": 20, "metrics": {"swd": 0.3}}}
    calls = []
    monkeypatch.setattr(runner, "run_shift", lambda cfg: calls.append(cfg) or {"results": results})
    suite = suites.make_suite("lab", True, tmp_path)
    record = {"config": {"teacher": "gmm:ring:8", "steps": 4, "teacher_steps": 32}, "seed": 0}
    rows = runner.takeover(suite, record, tmp_path / "arm")
    assert rows == {"beta-1": {"value": 1.0, "teacher_share": 1.0, "nfe_per_sample": 64.0, "swd": 0.1},
                    "s2t": {"value": 249.0, "teacher_share": 0.25, "nfe_per_sample": 20.0, "swd": 0.3}}
    assert calls[0].settings == ["beta-1", "beta-0", "s2t-249", "t2s-249"]
    assert runner.takeover(suite, record, tmp_path / "arm") == rows and len(calls) == 1  # read back, not rerun


@pytest.mark.parametrize("suite,quick", [("lab", False), ("lab", True), ("digits", False), ("digits", True)])
def test_every_jump_regime_is_one_pd_stage_from_its_suite_s_teacher(suite, quick, tmp_path, monkeypatch):
    from ddil_cli.methods.pd import stage_steps

    monkeypatch.setattr("ddil_cli.data.digits.build_digits_shards", lambda folder: None)  # no shards needed
    monkeypatch.setattr("ddil_cli.data.digits.split_source", lambda folder, split: split)
    made = suites.make_suite(suite, quick, tmp_path, jumps=True)
    jumps = set()
    for name, regime in made.regimes.items():
        settings = runner.merged(made.base, regime)
        teacher_steps, steps = settings["teacher_steps"], settings["steps"]
        # PD's own parser: the chain runs from the suite's teacher to the student in one stage
        assert stage_steps(teacher_steps, steps, settings["options"]["pd_stages"]) == [steps], name
        jumps.add(teacher_steps // steps)
    # the quick digits teacher has 8 steps: jumps 2, 4, 8; the full suites' 32 add 16
    assert jumps == ({2, 4, 8} if made.base["teacher_steps"] == 8 else {2, 4, 8, 16})


def test_only_seeds_runs_just_those_arms_and_leaves_the_report_to_a_last_call(tmp_path, monkeypatch):
    """`--only-seeds` splits a map over processes sharing --work: its arms (and take-overs) only,
    no report, so no process reports a map another is still filling."""
    ran, taken = [], []
    monkeypatch.setattr(ddil_effect, "teacher_row", lambda suite, work, settings: {})
    monkeypatch.setattr(ddil_effect, "run_arm", lambda suite, work, method, regime, settings, arm, overrides, seed,
                        tag="": ran.append((regime.split(" (")[0], seed, arm)) or {"metrics": {}, "wall_seconds": 0})
    monkeypatch.setattr(ddil_effect, "takeover_rows", lambda suite, work, regimes, records, tags: taken.append(
        {regime: {arm: len(rows) for arm, rows in by_arm.items()} for regime, by_arm in records.items()}))
    ddil_effect.main(["--suite", "lab", "--quick", "--jumps", "--regimes", "jump 8", "--only-seeds", "1,3",
                      "--takeover", "--work", str(tmp_path)])
    assert ran == [("jump 8", 1, "base"), ("jump 8", 1, "ddil"), ("jump 8", 3, "base"), ("jump 8", 3, "ddil")]
    assert taken == [{"jump 8 (1 stage 32->4)": {"base": 2, "ddil": 2}}]
    assert not list(tmp_path.rglob("*.md")) and not list(tmp_path.rglob("lab.json"))  # no report from a part
    ran.clear()
    ddil_effect.main(["--suite", "lab", "--quick", "--jumps", "--regimes", "jump 8", "--only-seeds", "2",
                      "--only-arms", "ddil", "--work", str(tmp_path)])
    assert ran == [("jump 8", 2, "ddil")]
