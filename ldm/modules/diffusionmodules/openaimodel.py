"""The diffusion UNet (``UNetModel``) of latent diffusion / Stable Diffusion v1.

It predicts the noise in a latent ``x`` at timestep ``t``, attending to a text ``context`` through
``SpatialTransformer``s (or, without spatial transformers, to itself through ``AttentionBlock``s). The constructor,
the head-count rule and all submodule names follow the original, so a ``model.diffusion_model.*`` checkpoint loads
into it strictly. The layers themselves live in ``unet_blocks``.

Precision: the UNet computes in the dtype of its parameters (inputs, timestep embedding and context are cast to it),
returns the dtype of ``x``, and works under ``torch.autocast``. ``use_fp16=True`` simply converts the whole model to
float16.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.unet_blocks import (
    AttentionBlock,
    Downsample,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    TimestepBlock,
    TimestepEmbedSequential,
    Upsample,
)
from ldm.modules.diffusionmodules.util import conv_nd, linear, normalization, timestep_embedding, zero_module

__all__ = [
    "AttentionBlock",
    "Downsample",
    "QKVAttention",
    "QKVAttentionLegacy",
    "ResBlock",
    "TimestepBlock",
    "TimestepEmbedSequential",
    "UNetModel",
    "Upsample",
]


def _head_layout(
    ch: int, num_heads: int, num_head_channels: int, legacy: bool, use_spatial_transformer: bool
) -> tuple[int, int]:
    """``(num_heads, dim_head)`` of an attention layer with ``ch`` channels, by the original's rule."""
    if num_head_channels == -1:
        dim_head = ch // num_heads
    else:
        num_heads = ch // num_head_channels
        dim_head = num_head_channels
    if legacy:
        dim_head = ch // num_heads if use_spatial_transformer else num_head_channels
    return num_heads, dim_head


class UNetModel(nn.Module):
    """The full UNet with attention and timestep embedding.

    ``attention_resolutions`` holds the downsampling factors (1, 2, 4, ...) at which attention is used;
    ``channel_mult`` the channel multiplier of each level. ``forward(x, timesteps, context, y)`` returns a tensor
    shaped like ``x`` with ``out_channels`` channels.

    SD 2.x and SDXL options (the original v2 / sgm arguments): ``use_linear_in_transformer`` (Linear projections in
    the spatial transformers), ``transformer_depth`` per level as a list (SDXL ``[1, 2, 10]``; the middle block uses
    the last level's depth), and ``num_classes: "sequential"`` with ``adm_in_channels``: a vector ``y`` ``[N,
    adm_in_channels]`` (SDXL's pooled text and size embeddings) mapped by ``label_emb`` (Linear, SiLU, Linear) and
    added to the timestep embedding.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions,
        dropout: float = 0,
        channel_mult=(1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | str | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int | list[int] = 1,
        context_dim: int | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        use_linear_in_transformer: bool = False,
        adm_in_channels: int | None = None,
    ) -> None:
        super().__init__()
        if use_spatial_transformer:
            assert context_dim is not None, "You forgot to include the dimension of your cross-attention conditioning"
        if context_dim is not None:
            assert use_spatial_transformer, "You forgot to use the spatial transformer for your cross-attention"
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if num_heads == -1:
            assert num_head_channels != -1, "Either num_heads or num_head_channels has to be set"
        if num_head_channels == -1:
            assert num_heads != -1, "Either num_heads or num_head_channels has to be set"
        if n_embed is not None:
            raise NotImplementedError("predict_codebook_ids (n_embed) is not supported")

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.predict_codebook_ids = False
        self._dims = dims
        self._use_scale_shift_norm = use_scale_shift_norm
        self._use_new_attention_order = use_new_attention_order
        self._use_spatial_transformer = use_spatial_transformer
        depths = [transformer_depth] * len(channel_mult) if isinstance(transformer_depth, int) else list(transformer_depth)
        if len(depths) != len(channel_mult):
            raise ValueError(f"transformer_depth has {len(depths)} entries for {len(channel_mult)} levels (channel_mult)")
        self._transformer_depth = depths
        self._use_linear = use_linear_in_transformer
        self._context_dim = list(context_dim) if isinstance(context_dim, (list, tuple)) else context_dim
        self._legacy = legacy

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)
        )
        if num_classes == "sequential":
            if adm_in_channels is None:
                raise ValueError('num_classes: "sequential" needs adm_in_channels (the width of the vector y)')
            self.label_emb = nn.Sequential(
                nn.Sequential(linear(adm_in_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim))
            )
        elif num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        input_block_chans = self._build_input_blocks(time_embed_dim, resblock_updown)
        ch = input_block_chans[-1]
        self.middle_block = TimestepEmbedSequential(
            self._resblock(ch, time_embed_dim, ch),
            self._attention(ch, num_heads, depths[-1]),
            self._resblock(ch, time_embed_dim, ch),
        )
        ch = self._build_output_blocks(time_embed_dim, input_block_chans, resblock_updown)
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1))
        )
        if use_fp16:
            self.half()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the UNet computes in: that of its parameters."""
        return self.time_embed[0].weight.dtype

    def _resblock(self, ch: int, emb_dim: int, out_ch: int, up: bool = False, down: bool = False) -> ResBlock:
        return ResBlock(
            ch,
            emb_dim,
            self.dropout,
            out_channels=out_ch,
            dims=self._dims,
            use_checkpoint=self.use_checkpoint,
            use_scale_shift_norm=self._use_scale_shift_norm,
            up=up,
            down=down,
        )

    def _attention(self, ch: int, legacy_block_heads: int, depth: int) -> nn.Module:
        """The attention layer after a ResBlock with ``ch`` channels (``depth`` transformer blocks).

        ``legacy_block_heads`` is the head count passed to an ``AttentionBlock`` (used when no spatial transformer
        is used; the original passes ``num_heads_upsample`` in the decoder half). It only matters when
        ``dim_head`` is -1; otherwise the block derives its heads from ``dim_head``.
        """
        heads, dim_head = _head_layout(
            ch, self.num_heads, self.num_head_channels, self._legacy, self._use_spatial_transformer
        )
        if self._use_spatial_transformer:
            return SpatialTransformer(
                ch,
                heads,
                dim_head,
                depth=depth,
                context_dim=self._context_dim,
                use_checkpoint=self.use_checkpoint,
                use_linear=self._use_linear,
            )
        return AttentionBlock(
            ch,
            use_checkpoint=self.use_checkpoint,
            num_heads=legacy_block_heads,
            num_head_channels=dim_head,
            use_new_attention_order=self._use_new_attention_order,
        )

    def _build_input_blocks(self, emb_dim: int, resblock_updown: bool) -> list[int]:
        """Create ``input_blocks``; return the channel count after each of them (the skip connections)."""
        mc = self.model_channels
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(self._dims, self.in_channels, mc, 3, padding=1))]
        )
        chans = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers: list[nn.Module] = [self._resblock(ch, emb_dim, mult * mc)]
                ch = mult * mc
                if ds in self.attention_resolutions:
                    layers.append(self._attention(ch, self.num_heads, self._transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(self.channel_mult) - 1:
                if resblock_updown:
                    down = self._resblock(ch, emb_dim, ch, down=True)
                else:
                    down = Downsample(ch, self.conv_resample, dims=self._dims, out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
        self._bottom_ds = ds
        return chans

    def _build_output_blocks(self, emb_dim: int, input_block_chans: list[int], resblock_updown: bool) -> int:
        """Create ``output_blocks`` (consuming the skip channels); return the final channel count."""
        mc = self.model_channels
        chans = list(input_block_chans)
        ch, ds = chans[-1], self._bottom_ds
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(self.num_res_blocks + 1):
                ich = chans.pop()
                layers: list[nn.Module] = [self._resblock(ch + ich, emb_dim, mc * mult)]
                ch = mc * mult
                if ds in self.attention_resolutions:
                    layers.append(self._attention(ch, self.num_heads_upsample, self._transformer_depth[level]))
                if level and i == self.num_res_blocks:
                    if resblock_updown:
                        layers.append(self._resblock(ch, emb_dim, ch, up=True))
                    else:
                        layers.append(Upsample(ch, self.conv_resample, dims=self._dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        return ch

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Predict from the batch ``x`` ``[N, C, ...]`` at ``timesteps`` ``[N]``, given ``context`` ``[N, L, D]``
        (cross-attention) and class labels ``y`` ``[N]`` or, with ``num_classes: "sequential"``, the vector ``y``
        ``[N, adm_in_channels]`` (only when the model is class-conditional)."""
        assert (y is not None) == (self.num_classes is not None), (
            "must specify y if and only if the model is class-conditional"
        )
        dtype = self.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if self.num_classes == "sequential":
            assert y.shape[0] == x.shape[0]
            emb = emb + self.label_emb(y.to(dtype))
        elif self.num_classes is not None:
            assert y.shape == (x.shape[0],)
            emb = emb + self.label_emb(y)
        if context is not None:
            context = context.to(dtype)
        h = x.to(dtype)
        hs = []
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h).to(x.dtype)
