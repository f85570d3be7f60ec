"""The x-transformers subset behind LDM-1.4B's text encoder: structure, attention maths, options, and the
embedding-manager hook point (token embeddings, before positions)."""
import pytest
import torch
import torch.nn.functional as F

from ldm.modules.x_transformer import Attention, Encoder, TransformerWrapper


def _wrapper(**kwargs) -> TransformerWrapper:
    torch.manual_seed(0)
    encoder = Encoder(dim=16, depth=2, heads=2)
    return TransformerWrapper(num_tokens=50, max_seq_len=12, attn_layers=encoder, **kwargs).eval()


def test_encoder_structure():
    encoder = Encoder(dim=16, depth=3)
    assert len(encoder.layers) == 6
    assert [type(layer[1]).__name__ for layer in encoder.layers] == ["Attention", "FeedForward"] * 3
    attention = encoder.layers[0][1]
    assert attention.to_q.weight.shape == (8 * 64, 16) and attention.to_q.bias is None
    assert attention.scale == 64 ** -0.5


def test_attention_matches_sdpa():
    torch.manual_seed(0)
    attention = Attention(dim=16, dim_head=8, heads=4)
    x = torch.randn(2, 5, 16)
    split = lambda t: t.view(2, 5, 4, 8).transpose(1, 2)  # noqa: E731
    ref = F.scaled_dot_product_attention(split(attention.to_q(x)), split(attention.to_k(x)), split(attention.to_v(x)))
    ref = attention.to_out(ref.transpose(1, 2).reshape(2, 5, 32))
    assert torch.allclose(attention(x), ref, atol=1e-6)


def test_logits_and_tied_embedding():
    ids = torch.randint(0, 50, (2, 12))
    model = _wrapper()
    hidden = model(ids, return_embeddings=True)
    assert hidden.shape == (2, 12, 16) and model(ids).shape == (2, 12, 50)
    tied = _wrapper(tie_embedding=True)
    assert not any(k.startswith("to_logits") for k in tied.state_dict())
    assert torch.allclose(tied(ids), tied(ids, return_embeddings=True) @ tied.token_emb.weight.t())


def test_without_positions_outputs_permute_with_inputs():
    model = _wrapper(use_pos_emb=False)
    assert model.pos_emb is None and not any(k.startswith("pos_emb") for k in model.state_dict())
    ids = torch.randint(0, 50, (1, 12))
    perm = torch.randperm(12)
    out = model(ids, return_embeddings=True)
    assert torch.allclose(model(ids[:, perm], return_embeddings=True), out[:, perm], atol=1e-5)


def test_mask_hides_masked_tokens():
    model = _wrapper()
    ids = torch.randint(0, 50, (1, 12))
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[:, 8:] = False
    changed = ids.clone()
    changed[:, 9] = (ids[:, 9] + 1) % 50
    out_a = model(ids, return_embeddings=True, mask=mask)
    out_b = model(changed, return_embeddings=True, mask=mask)
    assert torch.allclose(out_a[:, :8], out_b[:, :8], atol=1e-6)


def test_embedding_manager_sees_token_embeddings_before_positions():
    model = _wrapper()
    ids = torch.randint(0, 50, (2, 12))
    seen = {}

    def manager(tokens, embeds):
        seen["tokens"], seen["embeds"] = tokens, embeds
        return torch.zeros_like(embeds)

    out = model(ids, return_embeddings=True, embedding_manager=manager)
    assert torch.equal(seen["tokens"], ids) and torch.equal(seen["embeds"], model.token_emb(ids))
    positions_only = model.norm(model.attn_layers(model.pos_emb(ids).expand(2, -1, -1)))
    assert torch.allclose(out, positions_only, atol=1e-6)


def test_embedding_projection_and_unsupported_options():
    model = _wrapper(emb_dim=8)
    assert model.token_emb.weight.shape == (50, 8) and model.project_emb.weight.shape == (16, 8)
    assert model(torch.randint(0, 50, (1, 12)), return_embeddings=True).shape == (1, 12, 16)
    with pytest.raises(ValueError):
        _wrapper(num_memory_tokens=2)
