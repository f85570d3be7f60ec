"""The reliability sweep's own parts: new picture sets are deterministic and like the shipped ones, results tabulate."""
import sys

import numpy as np
import pytest
from PIL import Image

from paths import REPO, load_script

robustness = load_script("robustness")


def pixels(folder):
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def test_new_picture_sets_are_deterministic_and_drawn_like_the_shipped_ones(tmp_path):
    a = robustness.picture_folder("orange_cross", "101", tmp_path / "a")
    b = robustness.picture_folder("orange_cross", "101", tmp_path / "b")
    other = robustness.picture_folder("orange_cross", "102", tmp_path / "a")
    shipped = robustness.picture_folder("orange_cross", "shipped", tmp_path)
    assert shipped == REPO / "models" / "shapes" / "concepts" / "orange_cross"
    assert len(pixels(a)) == 5 and all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))
    assert not all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(other)))
    assert [p.read_text() for p in sorted(a.glob("*.txt"))] == [p.read_text() for p in sorted(shipped.glob("*.txt"))]
    assert pixels(a)[0].shape == pixels(shipped)[0].shape


def result(seed, recon, edit, wall=100.0):
    ok = recon >= robustness.RECON_MIN and edit >= robustness.EDIT_MIN
    return robustness.RunResult("orange_cross", "shipped", seed, recon, edit, ok, wall, 500, 32, "x.pt", {})


def test_summary_and_table_count_successes_by_both_thresholds():
    rows = [result(1, 1.0, 1.0, 90.0), result(2, 0.95, 0.84, 110.0), result(3, 0.89, 1.0, 200.0)]
    totals = robustness.summary(rows)["orange_cross"]
    assert totals["successes"] == 1 and totals["runs"] == 3 and totals["median_wall_s"] == 110.0
    assert totals["failed"] == ["orange_cross_shipped_s2", "orange_cross_shipped_s3"]
    table = robustness.markdown_table(rows, {"orange_cross": totals})
    assert table.count("**no**") == 2 and "1/3 runs succeed (33%)" in table


def test_a_set_that_is_neither_shipped_nor_a_seed_is_refused(capsys):
    with pytest.raises(SystemExit):
        robustness.parse_args(["--sets", "shipped", "new"])
    assert "--sets: 'new'" in capsys.readouterr().err


def test_each_start_and_the_kept_one_are_read_from_the_run_log():
    log = ("Epoch 1: 50%| ...\nstart 1 of 3: deterministic loss 0.02905 after 530 steps\n"
           "start 2 of 3: deterministic loss 0.02751 after 520 steps\nstart 3 of 3: deterministic loss 0.02912 after 800 steps\n"
           "keeping start 2 of 3 (deterministic loss 0.02751; the others 0.02905, 0.02912)\n")
    got = robustness.starts_from_log(log)
    assert got["kept"] == 2
    assert got["starts"] == [{"loss": 0.02905, "steps": 530}, {"loss": 0.02751, "steps": 520}, {"loss": 0.02912, "steps": 800}]
    assert robustness.starts_from_log("Epoch 1: no restarts configured\n") == {}
