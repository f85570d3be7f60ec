"""The OpenCLIP text towers written here (SD 2.x ViT-H-14, SDXL ViT-bigG-14): sizes, layers, tokenizer, errors.

Their outputs against the original code are checked in test_equivalence_sd2.py / test_equivalence_sdxl.py.
"""
import pytest
import torch

from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
from ldm.modules.encoders.open_clip import OpenCLIPTextTransformer, text_spec

TINY = {"width": 32, "heads": 2, "layers": 3, "embed_dim": 16}


@pytest.mark.parametrize("arch,params", [("ViT-H-14", 354_032_641), ("ViT-bigG-14", 694_659_841)])
def test_real_towers_have_the_published_parameter_counts(arch, params):
    with torch.device("meta"):
        tower = OpenCLIPTextTransformer(text_spec(arch))
    assert sum(p.numel() for p in tower.parameters()) == params


def test_penultimate_skips_the_last_block_and_last_runs_it():
    torch.manual_seed(0)
    pen = FrozenOpenCLIPEmbedder(text_config=TINY, layer="penultimate")
    last = FrozenOpenCLIPEmbedder(text_config=TINY, layer="last")
    last.load_state_dict(pen.state_dict())
    tokens = pen.tokenize(["a photo of a cat", ""])
    outputs = pen.model.block_outputs(tokens)
    assert len(outputs) == 4
    assert torch.allclose(pen(tokens), pen.model.ln_final(outputs[2]))
    assert torch.allclose(last(tokens), pen.model.ln_final(outputs[3]))
    assert not torch.allclose(pen(tokens), last(tokens))


def test_attention_is_causal_and_per_sample():
    """A later token never changes an earlier position; other prompts of the batch never change a prompt's output."""
    torch.manual_seed(0)
    enc = FrozenOpenCLIPEmbedder(text_config=TINY, layer="last")
    a, b = enc.tokenize(["a photo of a cat", "a photo of a dog"])
    out = enc(torch.stack([a, b]))
    assert torch.allclose(out[0, :5], out[1, :5], atol=1e-6)  # "<start> a photo of a" is shared
    assert not torch.allclose(out[0, 5], out[1, 5])
    assert torch.allclose(enc(a[None])[0], out[0], atol=1e-6)


def test_state_dict_keys_are_open_clips():
    enc = FrozenOpenCLIPEmbedder(text_config=TINY)
    keys = set(enc.state_dict())
    assert {"model.positional_embedding", "model.text_projection", "model.logit_scale", "model.token_embedding.weight",
            "model.ln_final.weight", "model.transformer.resblocks.2.attn.in_proj_weight",
            "model.transformer.resblocks.0.mlp.c_fc.weight"} <= keys
    assert not any("attn_mask" in k for k in keys)
    assert all(not p.requires_grad for p in enc.parameters())


def test_unknown_arch_and_layer_are_clear_errors():
    with pytest.raises(ValueError, match="unknown OpenCLIP arch 'ViT-X'.*ViT-H-14"):
        FrozenOpenCLIPEmbedder(arch="ViT-X")
    with pytest.raises(ValueError, match="layer must be one of"):
        FrozenOpenCLIPEmbedder(text_config=TINY, layer="first")


def test_html_entities_are_unescaped_as_open_clip_does():
    enc = FrozenOpenCLIPEmbedder(text_config=TINY)
    assert torch.equal(enc.tokenize(["salt &amp; pepper"]), enc.tokenize(["salt & pepper"]))
