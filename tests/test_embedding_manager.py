"""EmbeddingManager: initialisation, substitution before positions, multi-vector insertion, files."""
import pytest
import torch
from torch import nn

from paths import REPO
from ldm.modules.embedding_manager import EmbeddingFileError, EmbeddingManager, PlaceholderError
from ldm.modules.encoders.modules import BERTEmbedder, FrozenCLIPEmbedder


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return BERTEmbedder(n_embed=32, n_layer=1).eval()


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return FrozenCLIPEmbedder(version=str(REPO / "tests/fixtures/tiny-clip")).eval()


def test_bert_init_is_the_raw_token_embedding(bert):
    m = EmbeddingManager(bert, ["*"], ["dog"])
    dog = bert.content_token_ids("dog")[0]
    assert torch.equal(m.string_to_param_dict["*"].data[0], bert.token_embedding.weight[dog])
    assert int(m.string_to_token_dict["*"]) == 1008
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["string_to_param_dict.*"]


def test_clip_init_adds_the_position_zero_embedding(clip):
    m = EmbeddingManager(clip, ["*"], ["dog"], num_vectors_per_token=3)
    dog = clip.content_token_ids("dog")[0]
    expected = clip.token_embedding.weight[dog] + clip.position_embedding.weight[0]
    assert m.string_to_param_dict["*"].shape == (3, 32)
    assert torch.allclose(m.string_to_param_dict["*"].data, expected.expand(3, -1))
    assert int(m.string_to_token_dict["*"]) == 265


def test_multi_token_init_word_mean_or_spread(bert):
    ids = bert.content_token_ids("zebra crossing")
    table = bert.token_embedding.weight.detach()
    one = EmbeddingManager(bert, ["*"], ["zebra crossing"])
    assert torch.allclose(one.string_to_param_dict["*"].data[0], table[ids].mean(0))
    four = EmbeddingManager(bert, ["*"], ["zebra crossing"], num_vectors_per_token=4)
    assert torch.equal(four.string_to_param_dict["*"].data, table[[ids[0], ids[0], ids[1], ids[1]]])


def test_multi_token_placeholder_suggests_alternatives(bert):
    with pytest.raises(PlaceholderError, match=r"'zxqv' maps to \d tokens.*'\*'"):
        EmbeddingManager(bert, ["zxqv"], ["dog"])


def test_substitution_happens_before_positions(bert):
    m = EmbeddingManager(bert, ["*"], ["dog"])
    vec = m.string_to_param_dict["*"]
    with torch.no_grad():
        vec.copy_(torch.randn_like(vec))
    tokens = bert.tokenize(["a photo of *", "a * and a *"])
    emb = m(tokens, bert.token_embedding(tokens))
    hits = tokens == 1008
    assert torch.equal(emb[hits], vec.data.expand(int(hits.sum()), -1))
    assert torch.equal(emb[~hits], bert.token_embedding(tokens)[~hits])
    out = bert.encode(["a photo of *"], embedding_manager=m)
    out.sum().backward()
    assert vec.grad is not None and vec.grad.abs().sum() > 0


def test_multi_vector_insertion_shifts_and_truncates(bert):
    m = EmbeddingManager(bert, ["*"], ["dog"], num_vectors_per_token=3)
    tokens = bert.tokenize(["* on a *"])
    emb = m(tokens, bert.token_embedding(tokens))
    vecs = m.string_to_param_dict["*"].data
    # [CLS] * on a * [SEP] -> [CLS] v0 v1 v2 on a v0 v1 v2 [SEP]
    assert torch.equal(emb[0, 1:4], vecs) and torch.equal(emb[0, 6:9], vecs)
    assert torch.equal(emb[0, 9], bert.token_embedding.weight[102])
    long = bert.tokenize([" ".join(["*"] * 40)])
    assert m(long, bert.token_embedding(long)).shape == (1, 77, 32)


def test_a_second_placeholder_is_found_after_the_first_ones_shift(bert, tmp_path):
    """A two-vector '*' before a one-vector '&' (as "a photo of a * on a & background" with the shapes model's
    embeddings): '&' must land where the shift put it, not at its old index (a bug that put '&' on the word
    before it and left the raw '&' token embedding in place)."""
    two = EmbeddingManager(bert, ["*"], ["dog"], num_vectors_per_token=2)
    one = EmbeddingManager(bert, ["&"], ["cat"])
    two.save(tmp_path / "star.pt")
    one.save(tmp_path / "amp.pt")
    m = EmbeddingManager(bert, ["*"], ["dog"])  # configured for one vector, as the inference configs
    m.load(tmp_path / "star.pt")
    m.string_to_token_dict["&"] = one.string_to_token_dict["&"]
    m.string_to_param_dict["&"] = one.string_to_param_dict["&"]
    tokens = bert.tokenize(["* on a & now"])
    emb = m(tokens, bert.token_embedding(tokens))
    # [CLS] * on a & now [SEP] -> [CLS] *0 *1 on a & now [SEP]
    word = bert.token_embedding.weight
    assert torch.equal(emb[0, 1:3], m.string_to_param_dict["*"].data)
    assert torch.equal(emb[0, 4], word[tokens[0, 3]])  # "a"
    assert torch.equal(emb[0, 5], m.string_to_param_dict["&"].data[0])
    assert torch.equal(emb[0, 6], word[tokens[0, 5]])  # "now"


def test_progressive_words_count_calls(bert):
    m = EmbeddingManager(bert, ["*"], ["dog"], num_vectors_per_token=3, progressive_words=True)
    assert m.vectors_in_use(3) == 1
    m.progressive_counter = 1999
    assert m.vectors_in_use(3) == 2
    m.progressive_counter = 10_000
    assert m.vectors_in_use(3) == 3


def test_per_image_tokens_add_the_hebrew_letters(bert):
    m = EmbeddingManager(bert, ["*"], ["dog"], per_image_tokens=True)
    assert len(m.string_to_param_dict) == 23 and "א" in m.string_to_token_dict


def test_coarse_regulariser_is_zero_at_init_and_grows(bert):
    m = EmbeddingManager(bert, ["*"], ["dog"])
    assert float(m.embedding_to_coarse_loss().detach().sum()) == 0.0
    with torch.no_grad():
        m.string_to_param_dict["*"].add_(1.0)
    assert torch.allclose(m.embedding_to_coarse_loss(), torch.tensor([[32.0]]))


def test_substitution_mask_marks_the_inserted_rows(bert):
    m = EmbeddingManager(bert, ["*", "&"], ["dog", "cat"], num_vectors_per_token=2)
    tokens = bert.tokenize(["* on a &", "a photo"])
    # [CLS] * on a & [SEP] -> [CLS] *0 *1 on a &0 &1 [SEP]
    expected = torch.zeros(2, 77, dtype=torch.bool)
    expected[0, [1, 2, 5, 6]] = True
    assert torch.equal(m.substitution_mask(tokens), expected)
    one = EmbeddingManager(bert, ["*"], ["dog"])
    assert one.substitution_mask(tokens)[0].nonzero().flatten().tolist() == [1]


def test_initial_vectors_in_place_swaps_and_restores(bert):
    m = EmbeddingManager(bert, ["*"], ["dog"], num_vectors_per_token=2, progressive_words=True)
    with torch.no_grad():
        m.string_to_param_dict["*"].add_(1.0)
    tokens = bert.tokenize(["a *"])
    learned = m(tokens, bert.token_embedding(tokens))
    with m.initial_vectors_in_place():
        initial = m(tokens, bert.token_embedding(tokens))
    assert torch.equal(initial[0, 2], m.initial_embeddings["*"][0])
    assert torch.equal(m(tokens, bert.token_embedding(tokens)), learned) and m.progressive_counter == 2
    with pytest.raises(PlaceholderError, match="no init word"):
        with EmbeddingManager(bert, ["*"], []).initial_vectors_in_place():
            pass


def test_save_load_round_trip_and_more_vectors_than_configured(bert, tmp_path):
    four = EmbeddingManager(bert, ["*"], ["dog"], num_vectors_per_token=4)
    four.save(tmp_path / "e.pt")
    one = EmbeddingManager(bert, ["*"], ["cat"])
    one.load(tmp_path / "e.pt")
    assert torch.equal(one.string_to_param_dict["*"].data, four.string_to_param_dict["*"].data)
    tokens = bert.tokenize(["a photo of *"])
    assert one(tokens, bert.token_embedding(tokens)).shape == (1, 77, 32)


def test_original_parameterdict_files_load_without_running_code(bert, tmp_path):
    original = {"string_to_token": {"*": torch.tensor(1008)}, "string_to_param": nn.ParameterDict({"*": nn.Parameter(torch.randn(1, 32))})}
    torch.save(original, tmp_path / "orig.pt")
    m = EmbeddingManager(bert, ["*"], ["dog"])
    m.load(tmp_path / "orig.pt")
    assert torch.equal(m.string_to_param_dict["*"].data, original["string_to_param"]["*"].data)


def test_wrong_width_is_refused(bert, tmp_path):
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": torch.randn(1, 768)}}, tmp_path / "sd.pt")
    m = EmbeddingManager(bert, ["*"], ["dog"])
    with pytest.raises(EmbeddingFileError, match="768"):
        m.load(tmp_path / "sd.pt")


def test_init_noise_starts_the_vectors_apart_and_keeps_the_init_word_as_reference(bert):
    torch.manual_seed(0)
    m = EmbeddingManager(bert, ["*"], ["dog"], num_vectors_per_token=2, init_noise=0.1)
    start, word = m.string_to_param_dict["*"].detach(), m.initial_embeddings["*"]
    assert torch.equal(word[0], word[1]) and not torch.equal(start[0], start[1])
    relative = (start - word).pow(2).mean(-1).sqrt() / word.pow(2).mean(-1).sqrt()
    assert ((relative > 0.05) & (relative < 0.2)).all()
    torch.manual_seed(0)
    again = EmbeddingManager(bert, ["*"], ["dog"], num_vectors_per_token=2, init_noise=0.1)
    assert torch.equal(again.string_to_param_dict["*"], m.string_to_param_dict["*"])  # the seed decides the noise
