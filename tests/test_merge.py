"""merge_embeddings.py: the original's merge, non-interactive renames, clash checks, mixed widths, any input format,
and a merged file whose two placeholders both work in one prompt."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import merge_embeddings
from ldm.generate import SD_DEFAULTS, build_parser, generate
from ldm.modules.embedding_formats import read_embeddings, save_original

from paths import REPO
from tiny_models import TINY_CONFIGS, make_tiny_checkpoint

CLIP_IDS = {"*": 265, "@": 287, "&": 261, "dog": 1929, "cat": 2368}
TABLE_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def star_file(path: Path, vector: torch.Tensor, placeholder: str = "*") -> Path:
    return save_original(path, {placeholder: vector}, {placeholder: CLIP_IDS.get(placeholder, 265)})


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """merge_embeddings.main in-process: (exit code, stdout, stderr)."""
    try:
        merge_embeddings.main(argv)
        code = 0
    except SystemExit as exit_info:
        code = int(exit_info.code)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_merged_placeholders_both_work_in_one_prompt(tmp_path):
    ckpt = make_tiny_checkpoint("sd", tmp_path / "sd.ckpt")
    table = torch.load(ckpt, weights_only=True)["state_dict"][TABLE_KEY]
    dog = star_file(tmp_path / "dog.pt", table[CLIP_IDS["dog"]][None].clone())
    cat = star_file(tmp_path / "cat.pt", table[CLIP_IDS["cat"]][None].clone())
    merged = tmp_path / "merged.pt"
    result = subprocess.run(
        [sys.executable, str(REPO / "merge_embeddings.py"), "--manager_ckpts", str(dog), str(cat), "--output_path", str(merged), "-sd", "--rename", "*=@"],
        capture_output=True, text=True, timeout=300, cwd=REPO, stdin=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "Managers merged. Final list of placeholders:" in result.stdout and f"'@': '{cat}'" in result.stdout
    raw = torch.load(merged, weights_only=True)
    assert {k: int(v) for k, v in raw["string_to_token"].items()} == {"*": 265, "@": 287}
    # the record holds the file's name, never the machine's folders (issue 12, defect 5)
    assert raw["merged_from"]["@"]["file"] == "cat.pt" and raw["merged_from"]["@"]["placeholder"] == "*"

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of * and @\na photo of dog and cat\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["--config", str(TINY_CONFIGS["sd"]), "--ckpt", str(ckpt), "--embedding_path", str(merged), "--from-file", str(prompts),
            "--outdir", str(out), "--H", "16", "--W", "16", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--precision", "full", "--skip_grid"]
    generate(build_parser(SD_DEFAULTS, "").parse_args(args))
    images = [np.asarray(Image.open(out / "samples" / f"{i:05}.png")) for i in range(2)]
    assert np.array_equal(images[0], images[1])


def test_clash_without_terminal_or_rename_is_one_line(tmp_path, capsys):
    a, b = star_file(tmp_path / "a.pt", torch.randn(1, 32)), star_file(tmp_path / "b.pt", torch.randn(1, 32))
    code, _, err = run_main(["--manager_ckpts", str(a), str(b), "--output_path", str(tmp_path / "m.pt"), "-sd"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "stdin is not a terminal" in lines[0] and "--auto_rename" in lines[0]
    assert not (tmp_path / "m.pt").exists()


def test_auto_rename_and_file_qualified_rename(tmp_path, capsys, caplog):
    files = [star_file(tmp_path / f"{i}.pt", torch.randn(i + 1, 32)) for i in range(3)]
    code, out, err = run_main(["--manager_ckpts", *map(str, files), "--output_path", str(tmp_path / "m.pt"), "-sd", "--auto_rename"], capsys)
    assert code == 0 and "merged as '@'" in caplog.text and "merged as '&'" in caplog.text
    merged = read_embeddings(tmp_path / "m.pt")
    assert merged.token_ids == {"*": 265, "@": 287, "&": 261}
    assert [v.shape[0] for v in merged.vectors.values()] == [1, 2, 3]  # any mix of vector counts
    code, _, _ = run_main(["--manager_ckpts", str(files[0]), "--output_path", str(tmp_path / "q.pt"), "-sd", "--rename", f"{files[0]}:*=&"], capsys)
    assert code == 0 and read_embeddings(tmp_path / "q.pt").token_ids == {"&": 261}


@pytest.mark.parametrize(
    "rename, expected",
    [("*=two words", "is not one token of the CLIP tokenizer"), ("*=*", "already taken by merged placeholder '*'")],
)
def test_bad_replacements(tmp_path, capsys, rename, expected):
    a, b = star_file(tmp_path / "a.pt", torch.randn(1, 32)), star_file(tmp_path / "b.pt", torch.randn(1, 32))
    code, _, err = run_main(["--manager_ckpts", str(a), str(b), "--output_path", str(tmp_path / "m.pt"), "-sd", "--rename", rename], capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


def test_mixing_widths_names_both_files(tmp_path, capsys):
    ldm = save_original(tmp_path / "ldm.pt", {"*": torch.randn(1, 1280)}, {"*": 1008})
    sd = star_file(tmp_path / "sd.pt", torch.randn(1, 768))
    code, _, err = run_main(["--manager_ckpts", str(ldm), str(sd), "--output_path", str(tmp_path / "m.pt"), "--auto_rename"], capsys)
    assert code == 2 and str(ldm) in err and str(sd) in err and "1280" in err and "768" in err
    code, _, err = run_main(["--manager_ckpts", str(sd), "--output_path", str(tmp_path / "m.pt")], capsys)
    assert code == 2 and "with -sd" in err


def test_foreign_formats_and_token_id_clashes(tmp_path, capsys):
    star = star_file(tmp_path / "a.pt", torch.randn(1, 32))
    save_file({"<cat-toy>": torch.randn(2, 32)}, str(tmp_path / "learned_embeds.safetensors"), metadata={"format": "pt"})
    save_file({"emb_params": torch.randn(1, 32)}, str(tmp_path / "kohya.safetensors"))
    # an A1111-style file whose multi-token name keeps the file's id of '*': a clash by token id
    torch.save({"string_to_token": {"<x>": 265}, "string_to_param": {"<x>": torch.randn(1, 32)}, "name": "x"}, tmp_path / "x.pt")
    argv = ["--manager_ckpts", str(star), str(tmp_path / "learned_embeds.safetensors"), str(tmp_path / "kohya.safetensors"), str(tmp_path / "x.pt"),
            "--output_path", str(tmp_path / "m.pt"), "-sd", "--rename", "<cat-toy>=@", "--rename", "*=&", "--rename", "<x>=#"]
    code, _, err = run_main(argv, capsys)
    assert code == 0, err
    assert read_embeddings(tmp_path / "m.pt").token_ids == {"*": 265, "@": 287, "&": 261, "#": 258}


def test_interactive_prompts_as_the_original(tmp_path):
    vocab, _ = merge_embeddings.load_vocabulary(sd=True)
    answers = iter(["*", "two words", "&"])
    questions: list[str] = []

    def ask(question: str) -> str:
        questions.append(question)
        return next(answers)

    merger = merge_embeddings.Merger(vocab, ask=ask, sd=True)
    merger.add_file(str(star_file(tmp_path / "a.pt", torch.randn(1, 32))))
    merger.add_file(str(star_file(tmp_path / "b.pt", torch.randn(1, 32))))
    assert questions[0] == "Placeholder string * was already used. Please enter a replacement string: "
    assert questions[1].startswith("Placeholder string '*' is already taken")
    assert questions[2] == "Placeholder string 'two words' maps to more than a single token. Please enter another string: "
    assert merger.token_ids == {"*": 265, "&": 261}


def test_config_gives_the_models_own_tokenizer(tmp_path, capsys):
    """With --config the shapes model's 53-word vocabulary numbers the placeholders, not bert-base-uncased."""
    star = save_original(tmp_path / "star.pt", {"*": torch.randn(2, 64)}, {"*": 47})
    amp = save_original(tmp_path / "amp.pt", {"&": torch.randn(1, 64)}, {"&": 48})
    out = tmp_path / "merged.pt"
    config = str(REPO / "configs" / "shapes" / "shapes-ldm-inference.yaml")
    code, _, err = run_main(["--config", config, "--manager_ckpts", str(star), str(amp), "--output_path", str(out)], capsys)
    assert code == 0, err
    assert read_embeddings(out).token_ids == {"*": 47, "&": 48}
    code, _, err = run_main(["--manager_ckpts", str(star), str(amp), "--output_path", str(out)], capsys)
    assert code == 0 and read_embeddings(out).token_ids == {"*": 1008, "&": 1004}  # the LDM default: BERT's ids
    code, _, err = run_main(["--config", str(tmp_path / "none.yaml"), "--manager_ckpts", str(star), "--output_path", str(out)], capsys)
    assert code == 2 and "--config" in err and "none.yaml" in err
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    code, _, err = run_main(["--config", str(tmp_path / "bad.yaml"), "--manager_ckpts", str(star), "--output_path", str(out)], capsys)
    assert code == 2 and "--config: " in err and "bad.yaml" in err and "Traceback" not in err


def test_records_hold_no_absolute_paths(tmp_path):
    """Shipped and merged files name their sources by file name or a path relative to the run, never a machine's
    folders (the shipped two-concept file once recorded /tmp/final/...)."""
    for shipped in sorted((REPO / "models" / "shapes" / "embeddings").glob("*.pt")):
        raw = torch.load(shipped, weights_only=True)
        strings = repr({k: v for k, v in raw.items() if k != "string_to_param"})
        assert "/tmp/" not in strings and "/work/" not in strings and "/home/" not in strings, shipped
    merged = torch.load(REPO / "models" / "shapes" / "embeddings" / "orange_cross_and_pink.pt", weights_only=True)["merged_from"]
    assert all(not Path(source["file"]).is_absolute() for source in merged.values())
    assert merge_embeddings.recorded_path("logs/run/checkpoints/embeddings.pt") == "logs/run/checkpoints/embeddings.pt"
    assert merge_embeddings.recorded_path(str(tmp_path / "a.pt")) == merge_embeddings.recorded_path("../x/a.pt") == "a.pt"


def test_rename_by_base_name_when_unambiguous(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    a = star_file(tmp_path / "a.pt", torch.randn(1, 768))
    b = star_file(tmp_path / "b.pt", torch.randn(1, 768))
    b2 = star_file(tmp_path / "x" / "b.pt", torch.randn(1, 768), "&")
    code, out, err = run_main(["--manager_ckpts", str(a), str(b), "--output_path", str(tmp_path / "m.pt"), "-sd", "--rename", "b.pt:*=@"], capsys)
    assert code == 0, err
    assert {k: int(v) for k, v in torch.load(tmp_path / "m.pt", weights_only=True)["string_to_token"].items()} == {"*": 265, "@": 287}
    code, _, err = run_main(["--manager_ckpts", str(b), str(b2), "--output_path", str(tmp_path / "n.pt"), "-sd", "--rename", "b.pt:*=@"], capsys)
    assert code == 2 and "names 2 of the files" in err and len(err.strip().splitlines()) == 1


def test_sdxl_files_merge_with_both_halves_moving_together(tmp_path, capsys):
    from ldm.modules.embedding_formats import save_sdxl

    l1, g1, l2, g2 = torch.randn(2, 768), torch.randn(2, 1280), torch.randn(1, 768), torch.randn(1, 1280)
    first = save_sdxl(tmp_path / "cat.safetensors", "*", l1, g1, token_id=265)
    second = tmp_path / "dog"
    second.mkdir()  # diffusers' two files, token "*" too: a clash, renamed
    save_file({"*": l2}, str(second / "learned_embeds.safetensors"))
    save_file({"*": g2}, str(second / "learned_embeds_2.safetensors"))
    out = tmp_path / "m.pt"
    code, _, err = run_main(["--manager_ckpts", str(first), str(second), "--output_path", str(out), "-sd", "--rename", "*=@"], capsys)
    assert code == 0, err
    merged = read_embeddings(out)
    assert merged.is_sdxl and merged.token_ids == {"*": 265, "@": 287}
    assert torch.equal(merged.vectors["*"], l1) and torch.equal(merged.clip_g["*"], g1)
    assert torch.equal(merged.vectors["@"], l2) and torch.equal(merged.clip_g["@"], g2)


def test_sd2_files_merge_and_families_do_not_mix(tmp_path, capsys):
    from ldm.modules.embedding_formats import save_sdxl

    sd2_a, sd2_b = star_file(tmp_path / "a.pt", torch.randn(1, 1024)), star_file(tmp_path / "b.pt", torch.randn(2, 1024), "@")
    code, _, err = run_main(["--manager_ckpts", str(sd2_a), str(sd2_b), "--output_path", str(tmp_path / "m.pt"), "-sd"], capsys)
    assert code == 0, err
    assert read_embeddings(tmp_path / "m.pt").widths == (1024,)
    sd1 = star_file(tmp_path / "sd1.pt", torch.randn(1, 768), "&")
    sdxl = save_sdxl(tmp_path / "x.safetensors", "&", torch.randn(1, 768), torch.randn(1, 1280))
    for one, other, needles in [(sd2_a, sd1, ["width 1024", "width 768"]), (sdxl, sd1, ["SDXL", "SD v1"]),
                                (sd1, sdxl, ["SDXL", "SD v1"]), (sdxl, sd2_a, ["SDXL", "width 1024"])]:
        code, _, err = run_main(["--manager_ckpts", str(one), str(other), "--output_path", str(tmp_path / "n.pt"), "-sd"], capsys)
        assert code == 2 and str(one) in err and str(other) in err and all(n in err for n in needles), err
        assert len(err.strip().splitlines()) == 1
    code, _, err = run_main(["--manager_ckpts", str(sdxl), "--output_path", str(tmp_path / "n.pt")], capsys)
    assert code == 2 and "with -sd" in err


def test_a_text_file_among_the_inputs_is_one_line(tmp_path, capsys):
    a = star_file(tmp_path / "a.pt", torch.randn(1, 768))
    (tmp_path / "b.pt").write_text("not an embedding\n")
    code, _, err = run_main(["--manager_ckpts", str(a), str(tmp_path / "b.pt"), "--output_path", str(tmp_path / "m.pt"), "-sd"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"'{tmp_path / 'b.pt'}' is a text file" in lines[0], lines
    assert not (tmp_path / "m.pt").exists()
