"""Text encoders: tokenizer sources and ids, equivalence with the original BERTEmbedder, full-size state-dict layout,
and the CLIP path (transformers-version-independent keys, placeholder substitution through a forward hook)."""
import json
import time

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from paths import FIXTURES, REFERENCE
from ldm.modules.encoders import tokenizers
from ldm.modules.encoders.modules import BERTEmbedder, BERTTokenizer, FrozenCLIPEmbedder
from ldm.util import instantiate_from_config

SENTENCE = "a photo of a cat"
CLIP_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]
BERT_IDS = [101, 1037, 6302, 1997, 1037, 4937, 102]
PLACEHOLDER_ID = 997


def close(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> bool:
    return torch.allclose(out, ref, rtol=rtol, atol=rtol * max(1.0, ref.abs().max().item()))


def replacing(placeholder_id: int, vector: torch.Tensor):
    """A minimal embedding manager: one learned vector wherever ``placeholder_id`` occurs."""

    def manager(ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return torch.where((ids == placeholder_id)[..., None], vector.to(embeds), embeds)

    return manager


@pytest.fixture
def fresh_tokenizers():
    tokenizers.load_bert_tokenizer.cache_clear()
    tokenizers.load_clip_tokenizer.cache_clear()
    yield
    tokenizers.load_bert_tokenizer.cache_clear()
    tokenizers.load_clip_tokenizer.cache_clear()


@pytest.fixture
def shipped_only(monkeypatch, tmp_path, fresh_tokenizers):
    """No Hugging Face cache or hub: the shipped vocabularies must be used (CLIP conversion cached in tmp_path)."""
    monkeypatch.setattr(tokenizers, "hub_file", lambda *args, **kwargs: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


# ----------------------------------------------------------------------------------------------- tokenizers
def test_shipped_tokenizers_give_known_ids(shipped_only):
    clip = tokenizers.load_clip_tokenizer()
    bert = tokenizers.load_bert_tokenizer()
    assert clip.source.startswith("shipped") and bert.source.startswith("shipped")
    assert tokenizers.tokenizer_sources() == {"clip": clip.source, "bert": bert.source}
    clip_ids = clip.ids([SENTENCE], 77)
    bert_ids = bert.ids([SENTENCE], 77)
    assert clip_ids.shape == bert_ids.shape == (1, 77) and clip_ids.dtype == torch.long
    assert clip_ids[0, :7].tolist() == CLIP_IDS and (clip_ids[0, 7:] == 49407).all()
    assert bert_ids[0, :7].tolist() == BERT_IDS and (bert_ids[0, 7:] == 0).all()
    assert clip.content_ids("*") == [265] and bert.content_ids("*") == [1008]
    assert clip.tokens([2368, 265]) == ["cat</w>", "*</w>"] and bert.tokens([4937, 1008]) == ["cat", "*"]


def test_converted_clip_vocabulary_layout(shipped_only):
    folder = tokenizers.converted_clip_vocab(tokenizers.SHIPPED_CLIP_BPE)
    assert folder.parent.parent == shipped_only / "textual-inversion"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408 and vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894 and merges[1] == "i n"
    assert tokenizers.converted_clip_vocab(tokenizers.SHIPPED_CLIP_BPE) == folder  # reused, not rebuilt


def test_explicit_tokenizer_paths(fresh_tokenizers, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    bert = tokenizers.load_bert_tokenizer(str(tokenizers.SHIPPED_BERT_VOCAB))
    clip = tokenizers.load_clip_tokenizer(tokenizer_path=str(tokenizers.SHIPPED_CLIP_BPE))
    assert bert.source.startswith("tokenizer_path") and clip.source.startswith("tokenizer_path")
    assert bert.ids([SENTENCE], 77)[0, :7].tolist() == BERT_IDS
    assert clip.ids([SENTENCE], 77)[0, :7].tolist() == CLIP_IDS
    with pytest.raises(FileNotFoundError):
        tokenizers.load_bert_tokenizer(str(tmp_path))  # an explicit path is never skipped silently


def test_offline_hub_lookup_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    tokenizers.hub_file("no-such-user/no-such-repo", "vocab.txt")
    assert tokenizers.hub_offline() and time.monotonic() - start < 5


def test_clip_text_cleaning():
    assert tokenizers.clean_clip_text("  A  Photo\n of\tCAFÃ‰ ") == "a photo of café"


def test_embedder_helper_api_tokenizes(shipped_only, tmp_path):
    bert = BERTEmbedder(n_embed=8, n_layer=1, vocab_size=30522)
    assert not bert.is_clip and bert.max_length == 77 and bert.embed_dim == 8
    assert bert.tokenize([SENTENCE, "*"]).shape == (2, 77)
    assert bert.content_token_ids("*") == [1008] and bert.decode_ids([1008]) == ["*"]
    assert bert.encode(SENTENCE).shape == bert.encode([SENTENCE]).shape == (1, 77, 8)
    assert BERTTokenizer(vq_interface=True).encode(SENTENCE)[2][2][0, :7].tolist() == BERT_IDS
    clip = FrozenCLIPEmbedder(version=str(_tiny_clip_folder(tmp_path)))
    assert clip.is_clip and clip.max_length == 77 and clip.embed_dim == 64
    assert clip.tokenize(SENTENCE)[0, :7].tolist() == CLIP_IDS
    assert clip.content_token_ids("*") == [265] and clip.decode_ids([265]) == ["*</w>"]


# ---------------------------------------------------------------------------------- BERTEmbedder equivalence
@pytest.fixture(scope="module")
def ldm_fixtures():
    return torch.load(FIXTURES / "ldm-tiny.fixtures.pt", weights_only=True)


@pytest.fixture(scope="module")
def tiny_bert():
    config = OmegaConf.load(FIXTURES / "ldm-tiny.yaml").model.params.cond_stage_config
    model = instantiate_from_config(config)
    state = torch.load(FIXTURES / "ldm-tiny.ckpt", weights_only=True)["state_dict"]
    prefix = "cond_stage_model."
    model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return model.eval()


def test_bert_embedder_matches_original(tiny_bert, ldm_fixtures):
    F = ldm_fixtures
    assert isinstance(tiny_bert, BERTEmbedder)
    with torch.no_grad():
        assert close(tiny_bert.encode(F["inputs.tokens"]), F["cond.c"])
        assert close(tiny_bert.encode(F["inputs.uc_tokens"]), F["cond.uc"])
        assert close(tiny_bert.token_embedding(F["inputs.tokens"]), F["cond.token_embeddings"])
        manager = replacing(PLACEHOLDER_ID, F["inputs.placeholder_vec"])
        assert close(tiny_bert.encode(F["inputs.tokens"], embedding_manager=manager), F["cond.c_placeholder"])


def test_bert_placeholder_gradient(tiny_bert, ldm_fixtures):
    F = ldm_fixtures
    vector = F["inputs.placeholder_vec"].clone().requires_grad_(True)
    out = tiny_bert(F["inputs.tokens"], embedding_manager=replacing(PLACEHOLDER_ID, vector))
    (grad,) = torch.autograd.grad(out.square().mean(), vector)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_bert_without_tokenizer_rejects_text(tiny_bert):
    with pytest.raises(TypeError):
        tiny_bert.encode(SENTENCE)


# --------------------------------------------------------------------------------------- full-size layouts
def _manifest(name: str) -> dict:
    entries = json.loads((REFERENCE / name).read_text())["state_dict"]
    prefix = "cond_stage_model."
    return {k[len(prefix):]: v["shape"] for k, v in entries.items() if k.startswith(prefix)}


def _layout(module: nn.Module) -> dict:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def test_ldm_bert_layout_matches_original():
    with torch.device("meta"):
        model = BERTEmbedder(n_embed=1280, n_layer=32)
    expected = _manifest("ldm-txt2img-1p4B.state_dict.json")
    assert len(expected) == 422
    assert list(_layout(model).items()) == list(expected.items())
    assert sum(p.numel() for p in model.parameters()) == 581_994_042


def test_sd_clip_layout_matches_original():
    with torch.device("meta"):
        model = FrozenCLIPEmbedder()
    expected = _manifest("sd-v1.state_dict.json")
    assert len(expected) == 196
    assert _layout(model) == expected
    assert sum(p.numel() for p in model.parameters()) == 123_060_480
    assert not any(p.requires_grad for p in model.parameters()) and not model.transformer.training
    state = dict(model.state_dict())
    state["transformer.text_model.embeddings.position_ids"] = torch.zeros(1, 77, device="meta")
    result = model.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []


# ------------------------------------------------------------------------------------------------ tiny CLIP
def _tiny_clip_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=998, eos_token_id=999, pad_token_id=1,
    )


def _tiny_clip_folder(root):
    folder = root / "tiny-clip"
    folder.mkdir(exist_ok=True)
    _tiny_clip_config().to_json_file(str(folder / "config.json"))
    return folder


def _sd_style_tokens() -> torch.Tensor:
    rows = [[998, 7, 23, 55, 311, 999], [998, 42, PLACEHOLDER_ID, 5, 17, 88, 64, 999]]
    return torch.tensor([row + [999] * (77 - len(row)) for row in rows])


def _reference_clip(text_model: nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    """CLIP's text transformer written out by hand: pre-norm layers, causal attention, quick-GELU MLP, final norm."""
    b, n, d = embeds.shape
    causal = torch.full((n, n), float("-inf")).triu(1)
    h = embeds
    for layer in text_model.encoder.layers:
        attn, heads = layer.self_attn, layer.self_attn.num_heads
        x = layer.layer_norm1(h)
        q, k, v = (p(x).view(b, n, heads, d // heads).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        weights = ((q @ k.transpose(-1, -2)) * (d // heads) ** -0.5 + causal).softmax(-1)
        h = h + attn.out_proj((weights @ v).transpose(1, 2).reshape(b, n, d))
        x = layer.mlp.fc1(layer.layer_norm2(h))
        h = h + layer.mlp.fc2(x * torch.sigmoid(1.702 * x))
    return text_model.final_layer_norm(h)


@pytest.fixture
def tiny_clip(tmp_path):
    torch.manual_seed(0)
    return FrozenCLIPEmbedder(version=str(_tiny_clip_folder(tmp_path)), device="cuda")


def test_tiny_clip_keys_and_position_ids(tiny_clip):
    keys = list(tiny_clip.state_dict())
    assert all(k.startswith("transformer.text_model.") for k in keys) and len(keys) == 2 + 2 * 16 + 2
    assert "transformer.text_model.embeddings.position_ids" not in keys
    state = {k: torch.randn_like(v) for k, v in tiny_clip.state_dict().items()}
    state["transformer.text_model.embeddings.position_ids"] = torch.full((1, 77), 0.5)  # corrupt, as in some files
    parent = nn.Module()
    parent.cond_stage_model = tiny_clip
    result = parent.load_state_dict({f"cond_stage_model.{k}": v for k, v in state.items()}, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    loaded = state["transformer.text_model.embeddings.token_embedding.weight"]
    assert torch.equal(tiny_clip.token_embedding.weight, loaded)


def test_tiny_clip_from_full_clip_config(tmp_path):
    from transformers import CLIPConfig

    folder = tmp_path / "full-clip"
    folder.mkdir()
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16
    )
    config = CLIPConfig(text_config=_tiny_clip_config().to_dict(), vision_config=vision)
    config.to_json_file(str(folder / "config.json"))
    model = FrozenCLIPEmbedder(version=str(folder))
    assert model.embed_dim == 64 and model.token_embedding.num_embeddings == 1000


def test_tiny_clip_matches_hand_computation(tiny_clip):
    tokens = _sd_style_tokens()
    vector = torch.randn(64, requires_grad=True)
    manager = replacing(PLACEHOLDER_ID, vector)
    text_model = tiny_clip.transformer.text_model
    positions = tiny_clip.position_embedding(torch.arange(77))[None]
    with torch.no_grad():
        plain = tiny_clip.encode(tokens)
        assert close(plain, _reference_clip(text_model, tiny_clip.token_embedding(tokens) + positions), 1e-5)
    out = tiny_clip.encode(tokens, embedding_manager=manager)
    expected = _reference_clip(text_model, manager(tokens, tiny_clip.token_embedding(tokens)) + positions)
    assert out.shape == (2, 77, 64) and close(out, expected, 1e-5)
    # causal attention: positions before the placeholder are unchanged
    assert torch.equal(out[0], plain[0]) and torch.equal(out[1, :2], plain[1, :2])
    assert not close(out[1, 2:], plain[1, 2:])
    (grad,) = torch.autograd.grad(out.sum(), vector)
    assert grad.abs().sum() > 0
    assert torch.equal(tiny_clip.encode(tokens), plain)  # the hook is gone after the call


def test_tiny_clip_removes_hook_on_error(tiny_clip):
    def failing(ids, embeds):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        tiny_clip.encode(_sd_style_tokens(), embedding_manager=failing)
    assert not tiny_clip.token_embedding._forward_hooks


def test_tiny_clip_follows_module_dtype(tiny_clip):
    out32 = tiny_clip.encode(_sd_style_tokens())
    out16 = tiny_clip.to(torch.bfloat16).encode(_sd_style_tokens().int())
    assert out16.dtype == torch.bfloat16 and tiny_clip.device.type == "cpu"
    assert close(out16.float(), out32, 5e-2)


@pytest.mark.gpu
def test_embedders_follow_module_device(tiny_clip, tiny_bert, ldm_fixtures):
    tokens = _sd_style_tokens()
    assert tiny_clip.cuda().encode(tokens).device.type == "cuda"
    bert = BERTEmbedder(n_embed=32, n_layer=2, vocab_size=1000, use_tokenizer=False, device="cpu")
    bert.load_state_dict(tiny_bert.state_dict())
    out = bert.cuda().encode(ldm_fixtures["inputs.tokens"])
    assert out.device.type == "cuda" and close(out.cpu(), ldm_fixtures["cond.c"])


def test_clip_embedder_freezes_by_default_and_trains_with_freeze_false(tmp_path):
    folder = str(_tiny_clip_folder(tmp_path))
    frozen = FrozenCLIPEmbedder(version=folder)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.transformer.training
    torch.manual_seed(0)
    trainable = FrozenCLIPEmbedder(version=folder, freeze=False)
    assert all(p.requires_grad for p in trainable.parameters())
    tokens = _sd_style_tokens()
    trainable(tokens).pow(2).sum().backward()
    rows = trainable.token_embedding.weight.grad.abs().sum(dim=1)
    assert rows[tokens.unique()].gt(0).all() and rows.count_nonzero() == tokens.unique().numel()
    assert trainable.transformer.text_model.final_layer_norm.weight.grad is not None
