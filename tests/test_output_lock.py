"""The output lock: `ddil collect` holds it shared (collect runs append to one buffer together),
every other command exclusively, so a collect never runs beside a sample or distill writing the
same folder, in either order; the lock file goes with its last holder."""

from __future__ import annotations

import pytest

from cli_runner import run_cli
from ddil_cli.atomic import lock_name, output_lock
from ddil_cli.errors import UserError

COLLECT = ["collect", "--quiet", "--teacher", "gmm:ring:8", "--steps", "2", "--teacher-steps", "4", "--rollouts", "4",
           "--prior", "teacher=1"]
SAMPLE = ["sample", "--quiet", "--teacher", "gmm:ring:8", "--teacher-steps", "4", "--num-per-prompt", "2",
          "--overwrite"]


def test_shared_holders_share_and_keep_others_out_until_the_last_leaves(tmp_path):
    out = tmp_path / "buf"
    with output_lock(out, "ddil collect", shared=True):
        with output_lock(out, "ddil collect", shared=True):
            with pytest.raises(UserError, match="being written by another ddil run"):
                with output_lock(out, "ddil sample"):
                    pass
        assert lock_name(out).is_file()  # the first holder still holds it: the file stays
        with pytest.raises(UserError, match="being written by another ddil run"):
            with output_lock(out, "ddil sample"):
                pass
    assert not lock_name(out).exists()
    with output_lock(out, "ddil sample"):
        with pytest.raises(UserError, match="ddil sample"):
            with output_lock(out, "ddil collect", shared=True):
                pass


def test_collect_appends_beside_another_collect_but_never_beside_a_sample(tmp_path, capsys):
    out = tmp_path / "buf"
    with output_lock(out, "ddil collect", shared=True):  # another collect run appending
        code, err = run_cli([*COLLECT, "--out", str(out)], capsys)
        assert code == 0, err
        code, err = run_cli([*SAMPLE, "--out", str(out)], capsys)
        assert code == 2 and "ddil collect" in err and len(err.strip().splitlines()) == 1, err
    assert (out / "manifest.json").is_file()
    with output_lock(out, "ddil sample"):  # a sample (or distill) writing the folder
        code, err = run_cli([*COLLECT, "--out", str(out)], capsys)
        assert code == 2 and "ddil sample" in err and len(err.strip().splitlines()) == 1, err
