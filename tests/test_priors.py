import pytest
import torch

from ddil_cli.buffer.sources import SOURCES, sources_for_batch
from ddil_cli.errors import UserError
from ddil_cli.priors import PriorSchedule, format_prior, parse_prior, require_sources


def test_parse_prior_reads_weights_and_fills_missing_sources_with_zero():
    assert parse_prior("data=0.3,student=0.5,teacher=0.2") == {"data": 0.3, "student": 0.5, "teacher": 0.2}
    assert parse_prior(" teacher = 1 ") == {"data": 0.0, "student": 0.0, "teacher": 1.0}
    assert parse_prior(format_prior({"data": 0.25, "student": 0.75, "teacher": 0.0})) == \
        {"data": 0.25, "student": 0.75, "teacher": 0.0}


@pytest.mark.parametrize("text, words", [
    ("data=-0.2,teacher=1.2", "non-negative"),
    ("data=0.3,teacher=0.3", "sum to 0.6"),
    ("data=0.5,buffer=0.5", "bad --prior entry"),
    ("data=0.5,data=0.5", "twice"),
    ("data=abc,teacher=1", "non-negative number"),
    ("data=nan,teacher=1", "non-negative number"),
    ("", "sum to 0"),
])
def test_parse_prior_rejects_bad_specs_with_a_fix(text, words):
    with pytest.raises(UserError, match=words):
        parse_prior(text)


def test_require_sources_names_the_missing_input_only_when_its_weight_is_positive():
    prior = parse_prior("data=0.5,student=0.5")
    with pytest.raises(UserError, match="no student source; pass --student DIR"):
        require_sources(prior, {"student": "pass --student DIR"})
    require_sources(parse_prior("data=0.5,teacher=0.5"), {"student": "pass --student DIR"})


def test_schedule_switches_phase_at_fractions_and_update_counts():
    by_fraction = PriorSchedule.parse("0:data=0.5,student=0.5;0.6:data=0.3,student=0.7")
    assert by_fraction.at(0, 1000) == {"data": 0.5, "student": 0.5, "teacher": 0.0}
    assert by_fraction.at(599, 1000)["data"] == 0.5
    assert by_fraction.at(600, 1000)["data"] == 0.3
    by_count = PriorSchedule.parse("0:teacher=1;100:data=0.2,student=0.8")
    assert by_count.at(99)["teacher"] == 1.0
    assert by_count.at(100) == {"data": 0.2, "student": 0.8, "teacher": 0.0}
    with pytest.raises(ValueError, match="total_updates"):
        by_fraction.at(10)
    assert PriorSchedule.parse("data=1").at(5) == {"data": 1.0, "student": 0.0, "teacher": 0.0}


@pytest.mark.parametrize("text, words", [
    ("0.5:data=1", "first phase at 0"),
    ("0:data=1;1.5:teacher=1", "bad phase start"),
    ("0:data=1;-3:teacher=1", "bad phase start"),
    ("0:data=0.5", "sum to 0.5"),
    (";", "empty"),
])
def test_schedule_rejects_bad_phases(text, words):
    with pytest.raises(UserError, match=words):
        PriorSchedule.parse(text)


def test_sources_for_batch_follows_the_prior_and_the_generator():
    prior = parse_prior("data=0.2,student=0.5,teacher=0.3")
    n = 20000
    drawn = sources_for_batch(n, prior, torch.Generator().manual_seed(0))
    for name in SOURCES:
        share = drawn.count(name) / n
        # binomial std at n = 20000 is < 0.0036: 0.015 is > 4 sigma
        assert abs(share - prior[name]) < 0.015, (name, share)
    again = sources_for_batch(n, prior, torch.Generator().manual_seed(0))
    assert drawn == again
    assert set(sources_for_batch(500, parse_prior("student=1"), torch.Generator().manual_seed(1))) == {"student"}


def test_draws_later_looks_at_the_phase_in_force_and_the_ones_after():
    schedule = PriorSchedule.parse("0:data=1;0.3:data=0.5,student=0.5;0.6:data=1")
    assert schedule.draws_later("student", 0, 100)  # a later phase draws student states
    assert schedule.draws_later("student", 59, 100)
    assert not schedule.draws_later("student", 60, 100)
    assert not schedule.draws_later("teacher", 0, 100)
    assert PriorSchedule.parse("data=0.5,teacher=0.5").draws_later("teacher", 10 ** 6, 100)
