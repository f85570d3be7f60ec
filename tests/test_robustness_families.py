"""scripts/robustness.py beyond the shapes LDM: the SD-family models (--family, --ckpt) judged with the same judge
(SDXL too), and the peer trainer (--trainer peer|peer-k) whose word is judged through our stack; per-trainer tables."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from paths import REPO, load_script
from tiny_models import TINY_CONFIGS, make_tiny_checkpoint

from ldm.util import instantiate_from_config

robustness = load_script("robustness")


def test_each_family_names_its_model_and_configs_and_the_ldm_stays_as_it_was():
    ldm = robustness.model_files("ldm")
    assert (ldm.ckpt, ldm.inference) == (robustness.CKPT, robustness.INFERENCE_CONFIG)
    sd1 = robustness.model_files("sd1")
    assert sd1 == robustness.ModelFiles("sd1", "models/shapes-sd1/model.ckpt", "configs/shapes/shapes-sd1-inference.yaml",
                                        "configs/shapes/shapes-sd1-finetune.yaml")
    assert robustness.model_files("sdxl", "/x/y.ckpt").ckpt == "/x/y.ckpt"
    cross = robustness.CONCEPTS["orange_cross"]
    assert robustness.for_family(cross, ldm) is cross
    assert robustness.for_family(cross, sd1).configs == ("configs/shapes/shapes-sd1-finetune.yaml",)
    assert robustness.finetune_vectors(sd1) == 4  # what peer-k gives the peer
    assert robustness.run_id("orange_cross", "1", 2) == "orange_cross_1_s2"  # earlier sweeps' runs are found again
    assert robustness.run_id("white:star", "1", 2, "peer-k", "sd1") == "white-star_1_s2_sd1_peer-k"


def test_family_and_trainer_choices_that_cannot_run_are_one_line(capsys):
    opt = robustness.parse_args(["--family", "sd1", "--ckpt", str(REPO / "setup.py"), "--trainer", "ours", "peer"])
    assert opt.concept == ["orange_cross"] and opt.trainer == ["ours", "peer"] and opt.peer_steps == 3000
    cases = [
        (["--family", "sd1", "--ckpt", "setup.py", "--concept", "pink_background"], "pink_background is LDM-only"),
        (["--trainer", "peer"], "needs a CLIP model"),
        (["--family", "sdxl", "--trainer", "peer-k"], "SDXL textual-inversion recipe is not re-created"),
        (["--family", "sd1", "--ckpt", "no/such.ckpt"], "no model file 'no/such.ckpt'"),
        (["--family", "sd1", "--ckpt", "setup.py", "--trainer", "peer", "--peer-steps", "0"], "--peer-steps"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            robustness.parse_args(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def run(trainer, seed, ok, wall, steps):
    return robustness.RunResult("orange_cross", "shipped", seed, 1.0 if ok else 0.5, 1.0, ok, wall, steps, 4, "x", {},
                                trainer, round(wall / steps, 4))


def test_the_summary_and_table_are_per_trainer_with_seconds_per_step():
    rows = [run("ours", 1, True, 100.0, 1000), run("ours", 2, True, 120.0, 1100),
            run("peer", 1, False, 900.0, 3000), run("peer", 2, True, 1000.0, 3000), run("peer", 3, True, 1200.0, 3000)]
    totals = robustness.summary(rows)
    assert list(totals) == ["orange_cross", "orange_cross / peer"]
    ours, peer = totals["orange_cross"], totals["orange_cross / peer"]
    assert (ours["successes"], ours["median_wall_s"], ours["median_steps"]) == (2, 110.0, 1050)
    assert ours["median_s_per_step"] == pytest.approx(0.1045, abs=1e-4)
    assert (peer["trainer"], peer["successes"], peer["runs"], peer["median_wall_s"]) == ("peer", 2, 3, 1000.0)
    assert peer["median_s_per_step"] == pytest.approx(0.3333, abs=1e-4)
    for r in rows[2:]:
        r.details = {"recipe": {"max_train_steps": 3000}}
    table = robustness.markdown_table(rows, totals)
    assert "| orange_cross | peer | shipped | 1 |" in table and "orange_cross / peer: 2/3 runs succeed (67%)" in table
    assert "0.333 s/step" in table and "quick look" not in table
    rows[2].details = {"recipe": {"max_train_steps": 50}}
    assert "ran 50 updates (--peer-steps), not its README's 3,000" in robustness.markdown_table(rows, totals)
    older = {k: v for k, v in json.loads(json.dumps(robustness.asdict(rows[0]))).items() if k not in ("trainer", "s_per_step")}
    assert robustness.RunResult(**older).trainer == "ours"  # result.json files of earlier sweeps still read


def tiny_word(family, root):
    """A tiny random checkpoint of ``family`` and a word file of its embedding manager (the init word's vectors)."""
    ckpt = make_tiny_checkpoint(family, root / f"{family}.ckpt")
    config = OmegaConf.load(TINY_CONFIGS[family])
    torch.manual_seed(1)
    model = instantiate_from_config(config.model)
    model.embedding_manager.save(root / f"{family}-word.pt")
    return ckpt, root / f"{family}-word.pt"


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_a_word_on_an_sd_family_model_is_judged_by_the_same_judge(family, tmp_path):
    ckpt, word = tiny_word(family, tmp_path)
    files = robustness.ModelFiles(family, str(ckpt), str(TINY_CONFIGS[family]), str(TINY_CONFIGS[family]))
    got = robustness.judge("orange_cross", word, 2, [], files)
    assert 0.0 <= got["reconstruction"] <= 1.0 and set(got["edits"]) == {"blue", "green"}
    # SD v1 also gets the override signals; SDXL (two text encoders) is judged without them
    assert ("signals" in got) == (family == "sd")


def test_the_judge_samples_sd_models_at_their_autoencoder_s_size(tmp_path):
    from evaluation.shapes_eval import SampleSettings, ShapesJudgeEvaluator
    from ldm.inference import load_model_from_config

    ckpt, _ = tiny_word("sd", tmp_path)
    model = load_model_from_config(TINY_CONFIGS["sd"], ckpt, "cpu")
    evaluator = ShapesJudgeEvaluator(model, SampleSettings(n_samples=1, batch_size=1, steps=2))
    assert (evaluator.factor, evaluator.side) == (2, 16)  # image_size 8, two autoencoder levels
    assert evaluator.images(["a photo of a cross"]).shape == (1, 16, 16, 3)


def test_the_peer_s_word_reads_here_as_our_placeholder_with_the_same_rows(tmp_path):
    from safetensors.torch import save_file

    from evaluation.peer_runs import word_for_us
    from ldm.modules.embedding_formats import read_embeddings

    rows = torch.randn(4, 32)
    save_file({"<*>": rows}, str(tmp_path / "learned_embeds.safetensors"), metadata={"format": "pt"})
    ours = word_for_us(tmp_path / "learned_embeds.safetensors", tmp_path / "word.safetensors")
    assert torch.equal(read_embeddings(ours).vectors["*"], rows)


@pytest.mark.slow
def test_a_quick_sweep_runs_ours_and_the_peer_on_one_sd1_model(tmp_path, capsys):
    """--family sd1 on a random checkpoint of the shapes SD v1 architecture, ours for 2 steps and the peer with our 4
    vectors for 2 updates: the folder is exported once, both words are judged, the JSON and table have the trainers."""
    config = OmegaConf.load(REPO / "configs/shapes/shapes-sd1-inference.yaml")
    config.model.params.pop("personalization_config")
    torch.manual_seed(0)
    ckpt = tmp_path / "sd1.ckpt"
    torch.save({"state_dict": instantiate_from_config(config.model).state_dict()}, ckpt)
    out = tmp_path / "sweep"
    robustness.main(["--family", "sd1", "--ckpt", str(ckpt), "--trainer", "ours", "peer-k", "--peer-steps", "2", "--seeds", "1",
                     "--sets", "shipped", "--samples", "2", "--jobs", "1", "--outdir", str(out), "--",
                     "lightning.trainer.max_steps=2"])
    got = json.loads((out / "results.json").read_text())
    assert (got["family"], got["trainers"], got["peer_steps"]) == ("sd1", ["ours", "peer-k"], [2])
    ours, peer = got["runs"]
    assert (ours["trainer"], peer["trainer"]) == ("ours", "peer-k") and "error" not in peer["details"]
    assert ours["steps"] == 2 and peer["steps"] == 2 and peer["s_per_step"] > 0 and peer["wall_s"] > 0
    assert peer["details"]["recipe"] == {"num_vectors": 4, "max_train_steps": 2, "readme_steps": False}
    assert peer["details"]["peer_run"]["learning_rate"] == pytest.approx(5e-4 * 4)
    assert (out / "diffusers-sd1" / "model_index.json").is_file() and not (out / "diffusers-sd1.partial").exists()
    assert (out / "runs" / "orange_cross_shipped_s1_sd1_peer-k_steps2" / "peer_word.safetensors").is_file()
    table = (out / "table.md").read_text()
    assert "orange_cross / peer-k: " in table and "not its README's 3,000" in table
