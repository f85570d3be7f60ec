"""The real ``main.py`` inverting words on tiny random-weight SD 2.x and SDXL models (CPU, a few steps)."""
import pytest
import torch

from test_main import main_args, newest_run, read_embedding
from tiny_models import TINY_CONFIGS, make_concept_folder, make_tiny_checkpoint, train_briefly


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    checkpoints = {family: make_tiny_checkpoint(family, root / f"{family}.ckpt") for family in ("sd2", "sdxl")}
    return {"root": root, "data": make_concept_folder(root / "cat_toy"), **checkpoints}


def tiny_model(family, ckpt, **overrides):
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    config = OmegaConf.load(TINY_CONFIGS[family])
    config.model.params.ckpt_path = str(ckpt)
    for key, value in overrides.items():
        OmegaConf.update(config, key, value)
    return config, instantiate_from_config(config.model)


def test_sd2_inversion_writes_the_original_files(workspace, main_in_process):
    proc = main_in_process(main_args(workspace, "--init_word", "dog", "--max_steps", "4", family="sd2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = newest_run(workspace) / "checkpoints"
    assert {"embeddings.pt", "embeddings_gs-3.pt", "last.ckpt"} <= {p.name for p in ckpt.iterdir()}
    emb = read_embedding(ckpt / "embeddings_gs-3.pt")
    assert list(emb["string_to_param"]) == ["*"] and emb["string_to_param"]["*"].shape == (1, 32)  # the tower's width
    assert set(torch.load(ckpt / "last.ckpt", weights_only=True)["state_dict"]) <= {
        "embedding_manager.string_to_param_dict.*", "embedding_manager.initial_embeddings.*"}


def test_sd2_init_vector_is_the_init_words_token_embedding(workspace):
    """OpenCLIP: no position-0 embedding is added to the init vector (the v1 quirk of the original is not carried over)."""
    _, model = tiny_model("sd2", workspace["sd2"])
    embedder = model.cond_stage_model
    (token,) = embedder.content_token_ids("sculpture")
    init = model.embedding_manager.string_to_param_dict["*"]
    assert torch.equal(init.detach()[0], embedder.token_embedding.weight[token])
    # so "*" before training gives exactly the conditioning of the init word
    assert torch.equal(model.get_learned_conditioning(["a * photo"]), model.get_learned_conditioning(["a sculpture photo"]))


@pytest.mark.parametrize("family,checkpointing", [("sd2", None), ("sdxl", None), ("sdxl", True)])
def test_only_the_placeholder_vectors_change(workspace, family, checkpointing):
    """Also with the UNet's gradient checkpointing on (every weight frozen, the vectors still learn)."""
    from ldm.util import instantiate_from_config

    config, model = tiny_model(family, workspace[family], **{
        "model.params.gradient_checkpointing": checkpointing,
        **{f"data.params.{split}.params.data_root": str(workspace["data"]) for split in ("train", "validation")}})
    if checkpointing:
        assert all(m.use_checkpoint for m in model.model.modules() if isinstance(getattr(m, "use_checkpoint", None), bool))
    keys = list(model.state_dict())
    changed = sorted(train_briefly(model, instantiate_from_config(config.data)))
    assert changed == sorted(k for k in keys if k.startswith("embedding_manager.") and "string_to_param" in k)
    assert changed
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("embedding_manager"))


def test_sdxl_inversion_writes_both_halves_in_both_formats(workspace, main_in_process):
    from safetensors.torch import load_file

    proc = main_in_process(main_args(workspace, "--init_word", "dog", "--max_steps", "4", family="sdxl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = newest_run(workspace) / "checkpoints"
    assert {"embeddings.pt", "embeddings_gs-3.pt", "embeddings.safetensors", "embeddings_gs-3.safetensors", "last.ckpt"} <= {
        p.name for p in ckpt.iterdir()}
    emb = read_embedding(ckpt / "embeddings_gs-3.pt")
    assert set(emb["string_to_param"]) == {"clip_l", "clip_g"}
    halves = {name: emb["string_to_param"][name]["*"] for name in ("clip_l", "clip_g")}
    assert all(v.shape == (1, 32) for v in halves.values())  # the tiny encoders' widths (real: 768 and 1280)
    shared = load_file(str(ckpt / "embeddings_gs-3.safetensors"))
    assert set(shared) == {"clip_l", "clip_g"}
    assert torch.equal(shared["clip_l"], halves["clip_l"]) and torch.equal(shared["clip_g"], halves["clip_g"])
    assert_diffusers_loads_the_community_file(ckpt / "embeddings_gs-3.safetensors")
    last = torch.load(ckpt / "last.ckpt", weights_only=True)["state_dict"]
    assert set(last) == {f"embedding_manager.halves.{h}.{d}.*" for h in ("clip_l", "clip_g")
                         for d in ("string_to_param_dict", "initial_embeddings")}


@pytest.mark.parametrize("init_word,k", [("sculpture", 1), ("sculpture", 3), ("teddy bear", 2), ("teddy bear", 1)])
def test_sdxl_each_half_starts_from_the_init_word_in_its_own_table(workspace, init_word, k):
    _, model = tiny_model("sdxl", workspace["sdxl"], **{
        "model.params.personalization_config.params.initializer_words": [init_word],
        "model.params.personalization_config.params.num_vectors_per_token": k})
    manager = model.embedding_manager
    for name, (_, encoder) in zip(("clip_l", "clip_g"), model.conditioner.text_embedders()):
        ids = encoder.content_token_ids(init_word)
        table = encoder.token_embedding.weight.detach()
        vectors = manager.halves[name].string_to_param_dict["*"].detach()
        assert vectors.shape == (k, 32)
        if len(ids) == 1:
            expected = table[ids].repeat(k, 1)
        elif k == 1:
            expected = table[ids].mean(0, keepdim=True)
        else:
            expected = table[ids][torch.arange(k) * len(ids) // k]
        assert torch.equal(vectors, expected)
    if k == 1 and init_word == "sculpture":  # before training "*" means exactly the init word, in both encoders
        a, b = model.get_learned_conditioning(["a * photo"]), model.get_learned_conditioning(["a sculpture photo"])
        assert torch.equal(a["crossattn"], b["crossattn"]) and torch.equal(a["vector"], b["vector"])


def test_sdxl_training_batches_carry_size_conditioning_and_use_the_latent_cache(workspace):
    from ldm.util import instantiate_from_config

    config, model = tiny_model("sdxl", workspace["sdxl"], **{
        f"data.params.{split}.params.data_root": str(workspace["data"]) for split in ("train", "validation")})
    data = instantiate_from_config(config.data)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert torch.equal(batch["original_size_as_tuple"], torch.tensor([[24, 24], [24, 24]]))  # the files' size
    assert torch.equal(batch["target_size_as_tuple"], torch.tensor([[16, 16], [16, 16]]))
    assert torch.equal(batch["crop_coords_top_left"], torch.zeros(2, 2, dtype=torch.long))
    z, c = model.get_input(batch, model.first_stage_key)
    assert set(c) == {"txt", "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"}
    assert c["txt"] == list(batch["caption"]) and z.shape == (2, 4, 8, 8)
    assert len(model.latent_cache) == len({(int(i), bool(f)) for i, f in zip(batch["index"], batch["flip"])})
    cond = model.get_learned_conditioning(c)
    other = model.get_learned_conditioning({**c, "original_size_as_tuple": c["original_size_as_tuple"] * 4})
    assert torch.equal(cond["crossattn"], other["crossattn"]) and not torch.equal(cond["vector"], other["vector"])


def test_sdxl_vae_never_runs_in_float16(workspace):
    _, model = tiny_model("sdxl", workspace["sdxl"])
    model.first_stage_model.half()
    z = torch.randn(1, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.float16):
        image = model.decode_first_stage(z)
    assert image.dtype == torch.float32 and next(model.first_stage_model.parameters()).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.decode_first_stage(z).dtype == torch.bfloat16  # bf16 is kept: it does not overflow


def test_sdxl_empty_prompt_is_the_all_zero_text_conditioning(workspace):
    _, model = tiny_model("sdxl", workspace["sdxl"])
    with torch.no_grad():
        out = model.get_learned_conditioning(model.size_batch(["", "a photo"], 32, 48))
        alone = model.get_learned_conditioning(model.size_batch(["a photo"], 32, 48))
    assert torch.count_nonzero(out["crossattn"][0]) == 0
    pooled = 16  # the tiny OpenCLIP's embed_dim: the text part of "vector" comes first
    assert torch.count_nonzero(out["vector"][0, :pooled]) == 0 and torch.equal(out["vector"][0, pooled:], alone["vector"][0, pooled:])
    assert torch.equal(out["crossattn"][1], alone["crossattn"][0])


def assert_diffusers_loads_the_community_file(path):
    """The shared SDXL file through diffusers' two documented ``load_textual_inversion`` calls (``clip_g`` into
    ``text_encoder_2``, ``clip_l`` into ``text_encoder``) on tiny text encoders: the token rows are our vectors."""
    import copy

    from diffusers.loaders import TextualInversionLoaderMixin
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ldm.modules.encoders.tokenizers import load_clip_tokenizer

    class TinySDXLPipeline(TextualInversionLoaderMixin):
        hf_device_map = None
        components: dict = {}

    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77)
    pipe = TinySDXLPipeline()
    pipe.text_encoder, pipe.text_encoder_2 = CLIPTextModel(config), CLIPTextModelWithProjection(config)
    pipe.tokenizer, pipe.tokenizer_2 = (copy.deepcopy(load_clip_tokenizer().tokenizer) for _ in range(2))
    state_dict = load_file(str(path))
    pipe.load_textual_inversion(state_dict["clip_g"], token="<s0>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(state_dict["clip_l"], token="<s0>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    for name, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer), ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<s0>")]
        assert torch.equal(row, state_dict[name][0])
