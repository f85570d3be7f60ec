"""ldm/modules/placeholders.py: placeholders and init words are checked against the model's tokenizer, in one place,
for the EmbeddingManager, main.py, merge_embeddings.py and scripts/embedding_tool.py convert alike."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import merge_embeddings
from paths import REPO
from ldm.modules.embedding_formats import read_embeddings, resolve_token_id, save_original
from ldm.modules.embedding_manager import EmbeddingManager
from ldm.modules.encoders.modules import BERTEmbedder
from ldm.modules.placeholders import PlaceholderError, check_personalization, vocabulary_of_config

SHAPES_CONFIG = REPO / "configs" / "shapes" / "shapes-ldm-finetune.yaml"
SHAPES_TOKENIZER = REPO / "models" / "shapes" / "tokenizer"
UNK = 1  # [UNK] in the shapes vocabulary


@pytest.fixture(scope="module")
def shapes_encoder():
    encoder = OmegaConf.load(SHAPES_CONFIG).model.params.cond_stage_config
    encoder.params.tokenizer_path = str(SHAPES_TOKENIZER)
    return encoder


@pytest.fixture(scope="module")
def shapes_embedder(shapes_encoder):
    torch.manual_seed(0)
    return BERTEmbedder(**shapes_encoder.params).eval()


@pytest.fixture(scope="module")
def vocab(shapes_encoder):
    return vocabulary_of_config(shapes_encoder)[0]


def test_an_unknown_word_is_not_a_placeholder(shapes_embedder):
    # 'zebra' is one token of the shapes tokenizer: the unknown one, which every unknown word shares
    assert shapes_embedder.content_token_ids("zebra") == [UNK] == shapes_embedder.content_token_ids("giraffe")
    with pytest.raises(PlaceholderError, match=r"'zebra' is not in the vocabulary.*'\[UNK\]'.*'\*', '@'.*--placeholder_string"):
        EmbeddingManager(shapes_embedder, ["zebra"], ["shape"])
    assert int(EmbeddingManager(shapes_embedder, ["@"], ["shape"]).string_to_token_dict["@"]) != UNK


def test_an_unknown_init_word_is_refused_with_words_spelled_alike(shapes_embedder):
    with pytest.raises(PlaceholderError, match=r"init word 'giraffe'.*not in the vocabulary.*'gray'.*--init_word"):
        EmbeddingManager(shapes_embedder, ["*"], ["giraffe"])
    with pytest.raises(PlaceholderError, match=r"init word 'red giraffe': 'giraffe'"):
        EmbeddingManager(shapes_embedder, ["*"], ["red giraffe"])
    table = shapes_embedder.token_embedding.weight
    manager = EmbeddingManager(shapes_embedder, ["*"], ["red cross"], num_vectors_per_token=2)
    ids = shapes_embedder.content_token_ids("red cross")
    assert torch.equal(manager.string_to_param_dict["*"].data, table[ids])


def test_config_check_before_building_a_model(shapes_encoder):
    params = OmegaConf.create({"placeholder_strings": ["*"], "initializer_words": ["shape"]})
    check_personalization(shapes_encoder, params)
    with pytest.raises(PlaceholderError, match="'zebra'"):
        check_personalization(shapes_encoder, OmegaConf.merge(params, {"placeholder_strings": ["zebra"]}))
    with pytest.raises(PlaceholderError, match="'giraffe'"):
        check_personalization(shapes_encoder, OmegaConf.merge(params, {"initializer_words": ["giraffe"]}))
    with pytest.raises(PlaceholderError, match="not in the vocabulary"):  # the Hebrew letters are unknown here
        check_personalization(shapes_encoder, OmegaConf.merge(params, {"per_image_tokens": True}))


def test_vocabulary_single_token_helpers(vocab):
    assert vocab.single_token("*") == 47 and vocab.single_token("zebra") is None and vocab.single_token("red cross") is None
    assert vocab.alternatives({"*"})[:2] == ["@", "&"]
    assert "*" not in vocab.alternatives({"*"}) and vocab.size == 53 and vocab.token(UNK) == "[UNK]"
    assert vocab.nearest_words("circel")[0] == "circle" and vocab.nearest_words("xyzzy") == []


def test_a_file_token_id_that_is_the_unknown_token_is_not_kept(vocab, tmp_path):
    with pytest.raises(PlaceholderError, match="no usable token id"):
        resolve_token_id(vocab, "zebra", UNK, "file.pt")
    assert resolve_token_id(vocab, "zebra", 47, "file.pt") == 47  # another model's id inside the vocabulary: kept


def test_merge_refuses_an_unknown_replacement(tmp_path, capsys, vocab):
    star = save_original(tmp_path / "star.pt", {"*": torch.randn(2, 64)}, {"*": 47})
    args = ["--manager_ckpts", str(star), "--output_path", str(tmp_path / "m.pt"), "--config", str(SHAPES_CONFIG)]
    with pytest.raises(SystemExit) as exit_info:
        merge_embeddings.main([*args, "--rename", f"{star}:*=zebra"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "'zebra' is not in the vocabulary" in err and "--rename" in err
    assert not (tmp_path / "m.pt").exists()
    merge_embeddings.main([*args, "--rename", "star.pt:*=@"])  # by the file's base name
    assert read_embeddings(tmp_path / "m.pt").token_ids == {"@": vocab.single_token("@")}


def test_merge_asks_again_for_an_unknown_answer(tmp_path, vocab):
    answers, questions = iter(["zebra", "@"]), []
    merger = merge_embeddings.Merger(vocab, ask=lambda q: questions.append(q) or next(answers))
    for name in ("a.pt", "b.pt"):
        merger.add_file(str(save_original(tmp_path / name, {"*": torch.randn(1, 64)}, {"*": 47})))
    assert questions[1] == "Placeholder string 'zebra' is not in the tokenizer's vocabulary. Please enter another string: "
    assert merger.token_ids == {"*": 47, "@": vocab.single_token("@")}
