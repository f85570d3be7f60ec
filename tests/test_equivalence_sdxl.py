"""SDXL (CLIP-L + OpenCLIP-bigG, size conditioning, label_emb) against outputs of the ORIGINAL code (sdxl-tiny).

The model is built from the project's own ``tests/configs/sdxl-tiny.yaml`` and loads the released-layout file
``sdxl-tiny.safetensors`` (with its ``denoiser.sigmas``) with no missing or unexpected keys; float32, CPU.
"""
import pytest
import torch
from omegaconf import OmegaConf

from paths import REPO
from ldm.checkpoint import load_state_dict
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.schedule import SCHEDULE_BUFFERS
from ldm.util import instantiate_from_config
from test_equivalence import PlaceholderSwap, close

EQUIV2 = REPO / "tests" / "fixtures" / "equiv2"
CONFIG = REPO / "tests" / "configs" / "sdxl-tiny.yaml"
CKPT = EQUIV2 / "sdxl-tiny.safetensors"
PLACEHOLDER_ID = 265  # "*" in the CLIP BPE vocabulary (both tokenizers)
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


@pytest.fixture(scope="module")
def model():
    m = instantiate_from_config(OmegaConf.load(CONFIG).model)
    missing, unexpected = m.init_from_ckpt(str(CKPT))
    assert missing == [] and unexpected == []
    return m.eval()


@pytest.fixture(scope="module")
def F():
    return torch.load(EQUIV2 / "sdxl-tiny.fixtures.pt", weights_only=True)


@pytest.fixture(scope="module")
def batch(F):
    return {"txt": F["inputs.prompts"], **{k: F[f"inputs.{k}"] for k in SIZE_KEYS}}


def test_state_dict_is_the_released_layout(model):
    keys = set(model.state_dict())
    file_keys = set(load_state_dict(CKPT))
    assert keys == file_keys - {"denoiser.sigmas"}
    assert not any(name in keys for name in SCHEDULE_BUFFERS)  # computed from the config, as the original


def test_tokenizers_pad_differently(model, F):
    clip_l, open_clip = model.conditioner.embedders[0], model.conditioner.embedders[1]
    assert torch.equal(clip_l.tokenize(F["inputs.prompts"]), F["tokens_l"])  # pads with the end token 49407
    assert torch.equal(open_clip.tokenize(F["inputs.prompts"]), F["tokens_g"])  # pads with 0


def test_conditioner(model, F, batch):
    with torch.no_grad():
        cond = model.conditioner(batch)
    assert set(cond) == {"crossattn", "vector"}
    close(cond["crossattn"], F["cond.crossattn"])
    close(cond["vector"], F["cond.vector"])


def test_placeholder_rows_in_both_tables(model, F, batch):
    """A learned word on SDXL: a vector in each text encoder, through the embedding hooks and in the tables."""
    swaps = {0: PlaceholderSwap(PLACEHOLDER_ID, F["inputs.placeholder_vector_l"]),
             1: PlaceholderSwap(PLACEHOLDER_ID, F["inputs.placeholder_vector_g"])}
    with torch.no_grad():
        hooked = model.conditioner(batch, embedding_managers=swaps)
        close(hooked["crossattn"], F["cond_placeholder.crossattn"])
        close(hooked["vector"], F["cond_placeholder.vector"])
        tables = [model.conditioner.embedders[i].token_embedding.weight for i in (0, 1)]
        saved = [t[PLACEHOLDER_ID].clone() for t in tables]
        tables[0][PLACEHOLDER_ID] = F["inputs.placeholder_vector_l"]
        tables[1][PLACEHOLDER_ID] = F["inputs.placeholder_vector_g"]
        try:
            replaced = model.conditioner(batch)
        finally:
            for table, row in zip(tables, saved):
                table[PLACEHOLDER_ID] = row
    close(replaced["crossattn"], F["cond_placeholder.crossattn"])
    close(replaced["vector"], F["cond_placeholder.vector"])
    assert not torch.allclose(F["cond_placeholder.vector"][1], F["cond.vector"][1], atol=1e-3)


def test_placeholder_gradient_reaches_both_vectors_through_the_frozen_conditioner(model, F, batch):
    vec_l = F["inputs.placeholder_vector_l"].clone().requires_grad_(True)
    vec_g = F["inputs.placeholder_vector_g"].clone().requires_grad_(True)
    cond = model.conditioner(batch, embedding_managers={0: PlaceholderSwap(PLACEHOLDER_ID, vec_l), 1: PlaceholderSwap(PLACEHOLDER_ID, vec_g)})
    eps = model.apply_model(F["inputs.x"], F["inputs.t"], {k: v[:2] for k, v in cond.items()})
    grad_l, grad_g = torch.autograd.grad(eps.square().mean(), [vec_l, vec_g])
    assert grad_l.abs().sum() > 0 and grad_g.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_unet_and_apply_model(model, F):
    context, y = F["cond.crossattn"][:2], F["cond.vector"][:2]
    with torch.no_grad():
        close(model.model.diffusion_model(F["inputs.x"], timesteps=F["inputs.t"], context=context, y=y), F["unet"])
        close(model.apply_model(F["inputs.x"], F["inputs.t"], {"crossattn": context, "vector": y}), F["unet"])


def test_schedule_and_sigmas(model, F):
    close(model.denoiser.sigmas, F["denoiser.sigmas"], rtol=1e-6)
    close(model.alphas_cumprod, 1 / (1 + F["denoiser.sigmas"].double() ** 2), rtol=1e-6)


def test_decode_first_stage_with_the_sdxl_scale(model, F):
    assert model.scale_factor == 0.13025
    with torch.no_grad():
        close(model.decode_first_stage(F["inputs.z"]), F["decode_first_stage"])


def test_prompts_get_the_default_size_conditioning(model, F):
    """Plain prompts: original = target = (size, size), crop (0, 0), as generation uses them."""
    prompts = F["inputs.prompts"][:2]
    sizes = torch.tensor([[16, 16]] * 2)
    with torch.no_grad():
        plain = model.get_learned_conditioning(prompts)
        explicit = model.conditioner({"txt": prompts, "original_size_as_tuple": sizes,
                                      "crop_coords_top_left": torch.zeros_like(sizes), "target_size_as_tuple": sizes})
    assert model.size == 16  # latent 8 x the autoencoder's factor 2
    for key in ("crossattn", "vector"):
        assert torch.equal(plain[key], explicit[key])


def test_ddim_with_guidance_on_the_conditioning_dict(model):
    """DDIM batches the {crossattn, vector} dicts for guidance: guidance with uc = c is exactly no guidance."""
    with torch.no_grad():
        cond = model.get_learned_conditioning(["a photo of a cat", "* in a forest"])
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(S=3, batch_size=2, shape=[4, 8, 8], conditioning=cond, verbose=False, x_T=x_T)
    plain, _ = DDIMSampler(model).sample(**kwargs)
    guided, _ = DDIMSampler(model).sample(**kwargs, unconditional_guidance_scale=3.0, unconditional_conditioning=cond)
    assert torch.isfinite(plain).all() and not torch.allclose(plain, x_T)
    close(guided, plain, rtol=1e-5)


def test_bf16_autocast_on_cpu_is_close_to_fp32(model, F, batch):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cond = model.conditioner(batch)
        out = model.apply_model(F["inputs.x"], F["inputs.t"], {k: v[:2] for k, v in cond.items()})
    assert torch.isfinite(out).all()
    for key in ("crossattn", "vector"):
        assert (cond[key].float() - F[f"cond.{key}"]).abs().max() < 0.05 * F[f"cond.{key}"].abs().max()
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), F["unet"].flatten(), dim=0)
    assert cos > 0.99
