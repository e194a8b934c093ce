"""atomic.build_beside: a folder built in a hidden sibling appears at its place whole, replaces an
old one only when published, and a failure before that leaves the old one as it was."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ddil_cli import atomic
from ddil_cli.atomic import build_beside, building_name, recover_beside


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def _old_run(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "manifest.json").write_text("old")
    (out / "checkpoints" / "state.json").write_text("old state")
    return out


def test_nothing_appears_at_out_until_published_and_work_continues_through_the_same_name(tmp_path):
    out = tmp_path / "run"
    with build_beside(out, replace=False) as building:
        (building.path / "manifest.json").write_text("new")
        assert not out.exists() and building.path == building_name(out)
        building.publish()
        assert (out / "manifest.json").read_text() == "new"
        (building.path / "metrics.jsonl").write_text("row")  # after publishing: lands in out
        building.publish()  # a second call does nothing
    assert _tree(out) == {"manifest.json": "new", "metrics.jsonl": "row"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_an_old_output_is_replaced_only_when_the_new_one_is_published(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = _old_run(tmp_path)
    with build_beside(out, replace=True) as building:
        (building.path / "manifest.json").write_text("new")
        assert _tree(out)["manifest.json"] == "old"
        building.publish()
    assert _tree(out) == {"manifest.json": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_a_failure_before_publishing_leaves_the_old_output_whole_and_no_half_folder(tmp_path, failure):
    out = _old_run(tmp_path)
    before = _tree(out)
    with pytest.raises(failure):
        with build_beside(out, replace=True) as building:
            (building.path / "manifest.json").write_text("new")
            raise failure()
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_failure_after_publishing_keeps_the_new_output(tmp_path):
    out = _old_run(tmp_path)
    with pytest.raises(RuntimeError):
        with build_beside(out, replace=True) as building:
            (building.path / "manifest.json").write_text("new")
            building.publish()
            raise RuntimeError
    assert _tree(out) == {"manifest.json": "new"} and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_without_replace_an_output_that_appeared_meanwhile_is_kept(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Exception, match="appeared while this run was building"):
        with build_beside(out, replace=False) as building:
            _old_run(tmp_path)
            building.publish()
    assert _tree(out)["manifest.json"] == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_dead_builders_leftovers_are_cleaned_and_a_half_swapped_output_put_back(tmp_path):
    out = tmp_path / "run"
    _old_run(tmp_path).rename(tmp_path / ".run.replaced-999999")  # killed between the two renames
    building_name(out).mkdir()
    (building_name(out) / "manifest.json").write_text("new, never published")
    done = recover_beside(out)
    assert any("restored" in d for d in done)
    assert _tree(out)["manifest.json"] == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # published, then killed before the old one was deleted and the link removed
    os.symlink("run", building_name(out))
    (tmp_path / ".run.replaced-999999").mkdir()
    recover_beside(out)
    assert _tree(out)["manifest.json"] == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
