"""Attention layers against the original's explicit math (einsum, softmax): cross-attention with and without mask,
the legacy QKV attention of the UNet, the autoencoder's AttnBlock, and the transformer / feed-forward shapes."""
from __future__ import annotations

import pytest
import torch
from einops import rearrange

from ldm.modules.attention import CrossAttention, FeedForward, LinearAttention, SpatialTransformer
from ldm.modules.diffusionmodules.model import AttnBlock
from ldm.modules.diffusionmodules.unet_blocks import AttentionBlock, QKVAttention, QKVAttentionLegacy


def reference_cross_attention(attn: CrossAttention, x, context, mask=None):
    """The original's computation: einsum similarities, masked fill, softmax, einsum with values."""
    h = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    q, k, v = (rearrange(t, "b n (h d) -> (b h) n d", h=h) for t in (q, k, v))
    sim = torch.einsum("b i d, b j d -> b i j", q, k) * attn.scale
    if mask is not None:
        mask = rearrange(mask, "b ... -> b (...)").repeat_interleave(h, dim=0)[:, None, :]
        sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
    out = torch.einsum("b i j, b j d -> b i d", sim.softmax(dim=-1), v)
    return attn.to_out(rearrange(out, "(b h) n d -> b n (h d)", h=h))


@pytest.mark.parametrize("with_mask", [False, True])
def test_cross_attention_matches_einsum(with_mask: bool) -> None:
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=16, context_dim=12, heads=2, dim_head=8).eval()
    x, context = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    mask = torch.rand(2, 7) > 0.3 if with_mask else None
    if mask is not None:
        mask[:, 0] = True
    with torch.no_grad():
        torch.testing.assert_close(attn(x, context, mask=mask), reference_cross_attention(attn, x, context, mask))
        attn_self = CrossAttention(query_dim=16, heads=2, dim_head=8).eval()
        torch.testing.assert_close(attn_self(x), reference_cross_attention(attn_self, x, x))


@pytest.mark.parametrize("new_order", [False, True])
def test_qkv_attention_matches_einsum(new_order: bool) -> None:
    torch.manual_seed(0)
    heads, ch, length = 2, 4, 6
    qkv = torch.randn(3, 3 * heads * ch, length)
    if new_order:
        q, k, v = (t.reshape(3 * heads, ch, length) for t in qkv.chunk(3, dim=1))
        out = QKVAttention(heads)(qkv)
    else:
        q, k, v = qkv.reshape(3 * heads, 3 * ch, length).split(ch, dim=1)
        out = QKVAttentionLegacy(heads)(qkv)
    weight = torch.einsum("bct,bcs->bts", q, k).mul(ch**-0.5).softmax(dim=-1)
    expected = torch.einsum("bts,bcs->bct", weight, v).reshape(3, -1, length)
    torch.testing.assert_close(out, expected)


def test_attention_block_and_ae_attn_block() -> None:
    torch.manual_seed(0)
    block = AttentionBlock(64, num_head_channels=16)
    assert block.num_heads == 4
    x = torch.randn(2, 64, 4, 4)
    assert torch.equal(block(x), x)  # zero-initialised projection
    attn = AttnBlock(32)
    x = torch.randn(2, 32, 3, 5)
    h_ = attn.norm(x)
    q, k, v = attn.q(h_).flatten(2), attn.k(h_).flatten(2), attn.v(h_).flatten(2)
    w_ = torch.bmm(q.permute(0, 2, 1), k).mul(32**-0.5).softmax(dim=2)
    expected = x + attn.proj_out(torch.bmm(v, w_.permute(0, 2, 1)).reshape(2, 32, 3, 5))
    torch.testing.assert_close(attn(x), expected)


def test_spatial_transformer_and_feed_forward() -> None:
    torch.manual_seed(0)
    st = SpatialTransformer(64, n_heads=2, d_head=16, depth=2, context_dim=24)
    assert st.proj_in.weight.shape == (32, 64, 1, 1) and len(st.transformer_blocks) == 2
    x = torch.randn(2, 64, 4, 4)
    assert torch.equal(st(x, torch.randn(2, 3, 24)), x)  # zero-initialised proj_out
    torch.nn.init.normal_(st.proj_out.weight)
    assert st(x, torch.randn(2, 3, 24)).shape == x.shape
    ff = FeedForward(8, glu=True)
    assert ff.net[0].proj.weight.shape == (64, 8) and ff(torch.randn(3, 8)).shape == (3, 8)
    assert FeedForward(8, dim_out=5)(torch.randn(3, 8)).shape == (3, 5)
    assert LinearAttention(16, heads=2, dim_head=4)(torch.randn(2, 16, 3, 3)).shape == (2, 16, 3, 3)
