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
    cross = robustness.CONCEPTS["orange_cross"]
    a = robustness.picture_folder(cross, "101", tmp_path / "a")
    b = robustness.picture_folder(cross, "101", tmp_path / "b")
    other = robustness.picture_folder(cross, "102", tmp_path / "a")
    shipped = robustness.picture_folder(cross, "shipped", tmp_path)
    assert shipped == REPO / "models" / "shapes" / "concepts" / "orange_cross"
    assert len(pixels(a)) == 5 and all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))
    assert not all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(other)))
    assert [p.read_text() for p in sorted(a.glob("*.txt"))] == [p.read_text() for p in sorted(shipped.glob("*.txt"))]
    assert pixels(a)[0].shape == pixels(shipped)[0].shape


def test_sets_are_drawn_for_every_concept_of_the_world_and_differ_in_geometry_and_background(tmp_path):
    from ldm.data.shapes import COLOURS, SHAPES, concept_set, edit_backgrounds, render
    from ldm.data.shapes_judge import judge_batch

    for colour in COLOURS:
        for shape in SHAPES:
            sets = [concept_set(colour, shape, k) for k in range(1, 5)]
            assert concept_set(colour, shape, 1) == sets[0]  # deterministic per (concept, set id)
            for scenes in sets:
                assert len(scenes) == 5 and {(s.colour, s.shape) for s in scenes} == {(colour, shape)}
                backs = {s.background for s in scenes}
                assert colour not in backs and "pink" not in backs
                edits = edit_backgrounds(colour, backs)
                assert len(edits) == 2 and not (set(edits) & (backs | {colour}))
            geometry = {tuple(round(s.side, 3) for s in scenes) for scenes in sets}
            assert len(geometry) == len(sets)  # every set its own sizes
            assert len({frozenset(s.background for s in scenes) for scenes in sets}) > 1  # and not one background
    # what the generator draws is what the judge reads (every shape, the colour that is hardest to see: white)
    scenes = [scene for shape in SHAPES for scene in concept_set("white", shape, 7)]
    got = judge_batch(np.stack([render(s) for s in scenes]))
    assert all(j.matches(s.shape, s.colour, s.background) for j, s in zip(got, scenes))

    star = robustness.drawn_concept("white:star")
    folder = robustness.picture_folder(star, "3", tmp_path)
    assert folder.name == "white-star_3" and len(pixels(folder)) == 5
    captions = [p.read_text().strip() for p in sorted(folder.glob("*.txt"))]
    assert captions == [s.background for s in concept_set("white", "star", 3)]
    assert robustness.seen_backgrounds(folder) == list(dict.fromkeys(captions))
    with pytest.raises(ValueError, match="no shipped pictures"):
        robustness.picture_folder(star, "shipped", tmp_path)


def test_concepts_are_checked_and_drawn_ones_need_set_seeds(capsys):
    opt = robustness.parse_args(["--concepts", "white:star", "orange:cross", "--sets", "1", "2"])
    assert opt.concept == [] and opt.concepts == ["white:star", "orange:cross"]
    assert robustness.run_id("white:star", "1", 2) == "white-star_1_s2"
    assert robustness.parse_args([]).concept == ["orange_cross", "pink_background"]
    for bad in (["--concepts", "pink:star", "--sets", "1"], ["--concepts", "white:heart", "--sets", "1"],
                ["--concepts", "white:star", "--sets", "shipped", "1"]):
        with pytest.raises(SystemExit):
            robustness.parse_args(bad)
    err = capsys.readouterr().err
    assert "--concepts: 'pink:star' is not COLOUR:SHAPE" in err and "'white:heart'" in err and "no 'shipped'" in err


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


def test_the_starts_table_sets_the_signals_of_editing_starts_against_failing_ones():
    def start(kept, recon, edit, contrast):
        signals = dict.fromkeys(robustness.SIGNALS, 0.5) | {"unet_contrast": contrast}
        return {"kept": kept, "reconstruction": recon, "editability": edit, "edits": {}, "signals": signals}

    run = result(1, 1.0, 1.0)
    run.details = {"starts": [{"loss": 0.03, "steps": 500}, {"loss": 0.02, "steps": 510}],
                   "judged_starts": [start(False, 1.0, 0.1, 0.4), start(True, 1.0, 1.0, 0.9)]}
    rows = robustness.start_rows([run])
    assert [(r["start"], r["kept"], r["loss"]) for r in rows] == [(1, False, 0.03), (2, True, 0.02)]
    table = robustness.starts_table(rows)
    assert "reconstruct and edit: 1; reconstruct but fail editability: 1" in table
    assert "- unet_contrast: edit 0.9000–0.9000, fail 0.4000–0.4000" in table


def test_an_extra_config_is_checked_and_the_named_context_remedy_names_the_background_everywhere(capsys):
    from ldm.config import load_configs

    with pytest.raises(SystemExit):
        robustness.parse_args(["--concepts", "white:star", "--sets", "1", "--extra-config", "no/such.yaml"])
    assert "--extra-config: no file 'no/such.yaml'" in capsys.readouterr().err
    remedy = "configs/shapes/remedies/named-context-templates.yaml"
    merged = load_configs([str(REPO / c) for c in (*robustness.CONCEPTS["orange_cross"].configs, remedy)], [])
    templates = merged.data.params.train.params.templates
    assert len(templates) == 8 and all("[filewords] background" in t for t in templates)
