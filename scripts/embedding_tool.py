"""Look inside an embedding file, or convert it to another tool's format. No pickled code is ever run.

``python scripts/embedding_tool.py inspect FILE [--config C --ckpt K] [--top 5]``: format, placeholders and their
token ids, vectors per placeholder, width and model family, per-vector norms, the file's metadata and, given the
model's config and checkpoint, the nearest vocabulary words of each vector (cosine against the token-embedding table).

``python scripts/embedding_tool.py convert SRC DST [--to original|a1111|diffusers|sdxl] [--placeholder P] [--name N]
[--rename OLD=NEW] [--tokenizer clip|bert|shapes]``: the format defaults to DST's suffix (``.safetensors``/``.bin``:
diffusers, else original).

SDXL words (two vector sets, CLIP-L and OpenCLIP-bigG) are read in every layout (the ``{clip_l, clip_g}`` safetensors
of AUTOMATIC1111/ComfyUI/kohya, kohya's ``.pt``, diffusers' ``learned_embeds.safetensors`` + ``learned_embeds_2
.safetensors`` given as either file or their folder, this project's ``.pt``); ``inspect`` shows both halves (nearest
words in each encoder's table with an SDXL ``--config``); ``convert`` writes ``.safetensors`` as the shared
``{clip_l, clip_g}`` file (``--to a1111``/``sdxl``), ``--to diffusers`` as diffusers' two files, ``.pt`` in the
original style with both halves keyed. Their token ids come from the CLIP tokenizer. A1111 and diffusers files hold one placeholder (``--placeholder`` picks it); ``--name`` is
the A1111 name or the diffusers token (``--token``; default: the placeholder, what its users type). A placeholder
without a token id (diffusers/kohya input, or renamed) gets one from the tokenizer (``--tokenizer``, default by width:
64 the shipped shapes model's, 768/1024 CLIP, 1280 BERT); a renamed placeholder must be one known token of it.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.checkpoint import CheckpointError, load_state_dict  # noqa: E402
from ldm.inference import load_config  # noqa: E402
from ldm.modules.embedding_formats import (  # noqa: E402
    A1111,
    DIFFUSERS,
    ORIGINAL,
    SDXL_HALVES,
    WRITABLE_FORMATS,
    LoadedEmbeddings,
    check_sdxl_widths,
    check_width,
    config_family,
    default_format,
    read_embeddings,
    resolve_token_id,
    write_embeddings,
)
from ldm.errors import ConfigError, run_cli  # noqa: E402
from ldm.modules.learned_embeds import diffusers_token  # noqa: E402
from ldm.modules.nearest_words import nearest_words  # noqa: E402
from ldm.modules.placeholders import Vocabulary  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SHAPES_TOKENIZER = REPO / "models" / "shapes" / "tokenizer"
TOKENIZER_BY_WIDTH = {64: "shapes", 768: "clip", 1024: "clip", 1280: "bert"}


def vocabulary(kind: str | None, width: int) -> Vocabulary | None:
    """The tokenizer named by ``kind``, else the one the width suggests (64: the shipped shapes model's), else None."""
    from ldm.modules.encoders.tokenizers import load_bert_tokenizer, load_clip_tokenizer

    kind = kind or TOKENIZER_BY_WIDTH.get(width)
    if kind is None:
        return None
    if kind == "clip":
        return Vocabulary.of_tokenizer(load_clip_tokenizer())
    return Vocabulary.of_tokenizer(load_bert_tokenizer(str(SHAPES_TOKENIZER) if kind == "shapes" else None))


def load_text_encoders(config_path: str, ckpt: str) -> dict[str, Any]:
    """Only the config's text encoder(s), weights from ``ckpt`` (the rest of the model is not built): ``{"": it}``,
    or SDXL's ``{"clip_l": .., "clip_g": ..}`` (the conditioner's embedders reading ``txt``)."""
    params = load_config(config_path).model.params
    if "cond_stage_config" in params:
        configs = {"": ("cond_stage_model.", params.cond_stage_config)}
    else:
        entries = [(i, e) for i, e in enumerate(params.conditioner_config.params.emb_models) if e.get("input_key") == "txt"]
        configs = {name: (f"conditioner.embedders.{i}.", e) for name, (i, e) in zip(SDXL_HALVES, entries)}
    state = load_state_dict(ckpt, what="--ckpt")
    encoders = {}
    for name, (prefix, config) in configs.items():
        embedder = instantiate_from_config(config)
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        own = embedder.state_dict()
        fitting = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
        if len(fitting) <= len(own) // 2:
            raise CheckpointError(f"checkpoint '{ckpt}' has no text-encoder weights that fit config '{config_path}'; pass the matching --config")
        embedder.load_state_dict(fitting, strict=False)
        encoders[name] = embedder.eval()
    return encoders


def tokenizer_kind(opt: argparse.Namespace, loaded: LoadedEmbeddings) -> str | None:
    """``--tokenizer``, else CLIP for SDXL words (both encoders use the CLIP BPE) and for words whose file names an SD
    family in its training config (the shapes SD models' width 64 alone would pick the shapes LDM's BERT vocabulary),
    else None (chosen by width)."""
    if opt.tokenizer:
        return opt.tokenizer
    if loaded.is_sdxl or config_family(loaded.metadata.get("config")) in ("SD v1", "SD 2.x", "SDXL"):
        return "clip"
    return None


def inspect(opt: argparse.Namespace) -> None:
    loaded = read_embeddings(opt.file)
    encoders: dict[str, Any] = {}
    if opt.config or opt.ckpt:
        if not (opt.config and opt.ckpt):
            raise ConfigError("nearest words need both --config and --ckpt")
        encoders = load_text_encoders(opt.config, opt.ckpt)
        model_name = f"the model of '{opt.ckpt}'"
        if "" in encoders:
            check_width(loaded, encoders[""].embed_dim, model_name)
        else:
            check_sdxl_widths(loaded, tuple(e.embed_dim for e in encoders.values()), model_name)
    first = next(iter(encoders.values()), None)
    vocab = Vocabulary.of_embedder(first) if first is not None else vocabulary(tokenizer_kind(opt, loaded), loaded.width)
    print(f"file: {loaded.path}")
    print(f"format: {loaded.format}")
    print(f"width: {' + '.join(map(str, loaded.widths))} ({loaded.family})")
    print(f"placeholders: {len(loaded.vectors)}")
    halves = loaded.halves() if loaded.is_sdxl else {"": loaded.vectors}
    for placeholder in loaded.vectors:
        token_id = loaded.token_ids.get(placeholder)
        token = f"token id {token_id}" if token_id is not None else "no token id in the file"
        if vocab is not None and token_id is not None and 0 <= token_id < vocab.size:
            token += f" ('{vocab.token(token_id)}')"
        for half, vectors_of in halves.items():
            vectors = vectors_of[placeholder]
            label = f" {half}" if half else ""
            print(f"  '{placeholder}'{label}: {vectors.shape[0]} vector(s) of {vectors.shape[1]}, {vectors.dtype}, {token}")
            embedder = encoders.get(half)
            neighbours = nearest_words(embedder, vectors, opt.top) if embedder is not None else None
            for i, vector in enumerate(vectors):
                line = f"    vector {i}: norm {vector.float().norm().item():.4f}"
                if neighbours is not None:
                    line += "  nearest: " + ", ".join(f"{w} ({s:.3f})" for w, s in neighbours[i])
                print(line)
    for key, value in loaded.metadata.items():
        text = " ".join(str(value).split())
        print(f"{key}: {text[:200]}{'...' if len(text) > 200 else ''}")


def renamed(loaded: LoadedEmbeddings, renames: Sequence[str]) -> LoadedEmbeddings:
    vectors, ids, clip_g = dict(loaded.vectors), dict(loaded.token_ids), dict(loaded.clip_g)
    for value in renames:
        old, sep, new = value.rpartition("=")
        if not sep or not old or not new:
            raise ConfigError(f"--rename '{value}': write OLD=NEW")
        if old not in vectors:
            raise ConfigError(f"--rename {value}: '{loaded.path}' has no placeholder '{old}' (it has {', '.join(vectors)})")
        if new in vectors:
            raise ConfigError(f"--rename {value}: '{new}' is already a placeholder of '{loaded.path}'")
        vectors = {new if k == old else k: v for k, v in vectors.items()}
        clip_g = {new if k == old else k: v for k, v in clip_g.items()}
        ids.pop(old, None)
    return LoadedEmbeddings(loaded.path, loaded.format, vectors, ids, dict(loaded.metadata), clip_g)


def warn_if_diffusers_refuses(loaded: LoadedEmbeddings, placeholder: str | None, vocab: Vocabulary | None) -> None:
    """diffusers' ``load_textual_inversion`` refuses a token its tokenizer already has (such as ``*``): say how to
    name it instead."""
    chosen = loaded.only(placeholder)[0]
    token = str(loaded.metadata.get("name") or chosen)
    if vocab is not None and vocab.single_token(token) is not None:
        logger.warning(
            "the diffusers token is '%s', which the tokenizer already has; diffusers' load_textual_inversion refuses "
            "such a token unless given token='%s': convert with --token '%s' to store one (what runs write in "
            "learned_embeds.safetensors)", token, diffusers_token(token), diffusers_token(token),
        )


def convert(opt: argparse.Namespace) -> None:
    loaded = renamed(read_embeddings(opt.src), opt.rename)
    fmt = opt.to or default_format(loaded, opt.dst)
    if fmt == A1111 and Path(opt.dst).suffix.lower() == ".safetensors" and not loaded.is_sdxl:
        raise ConfigError("--to a1111 writes a .pt file; name the output .pt (A1111 reads diffusers .safetensors too)")
    chosen = list(loaded.vectors) if fmt == ORIGINAL else [loaded.only(opt.placeholder)[0]]
    wanted = [p for p in chosen if p not in loaded.token_ids] if fmt != DIFFUSERS else []
    vocab = vocabulary(tokenizer_kind(opt, loaded), loaded.width) if wanted or opt.rename else None
    for value in opt.rename if vocab is not None else ():  # a new placeholder must be one known token
        vocab.placeholder_token(value.rpartition("=")[2], set(loaded.vectors), f"--rename {value}")
    if wanted:
        if vocab is None:
            raise ConfigError(f"placeholder(s) {', '.join(wanted)} need a token id and width {loaded.width} names no tokenizer; pass --tokenizer clip|bert")
        loaded.token_ids.update({p: resolve_token_id(vocab, p, None, opt.src) for p in wanted})
    if fmt == DIFFUSERS and opt.name is None:
        warn_if_diffusers_refuses(loaded, opt.placeholder, vocab or vocabulary(tokenizer_kind(opt, loaded), loaded.width))
    try:
        out = write_embeddings(loaded, opt.dst, fmt, placeholder=opt.placeholder, name=opt.name)
    except OSError as err:
        raise ConfigError(f"cannot write '{opt.dst}' ({err.strerror or type(err).__name__})") from err
    print(f"wrote {out} ({fmt})")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Inspect or convert textual-inversion embedding files.")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="show what an embedding file holds")
    i.add_argument("file")
    i.add_argument("--config", help="model config, for nearest vocabulary words")
    i.add_argument("--ckpt", "--ckpt_path", dest="ckpt", help="model checkpoint, for nearest vocabulary words")
    i.add_argument("--top", type=int, default=5, help="nearest words per vector")
    i.add_argument("--tokenizer", choices=["clip", "bert", "shapes"], help="tokenizer for showing token ids (default: by width)")
    c = sub.add_parser("convert", help="write an embedding file in another format")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--to", choices=WRITABLE_FORMATS, help="output format (default: from DST's suffix)")
    c.add_argument("--placeholder", help="the placeholder to write (A1111/diffusers hold one)")
    c.add_argument("--name", "--token", dest="name",
                   help="A1111 name (default: the file's, else DST's stem) / diffusers token (default: the placeholder)")
    c.add_argument("--rename", action="append", default=[], metavar="OLD=NEW", help="rename a placeholder")
    c.add_argument("--tokenizer", choices=["clip", "bert", "shapes"], help="tokenizer for token ids (default: by width)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    opt = parse_args(argv)
    run_cli(lambda: inspect(opt) if opt.command == "inspect" else convert(opt))


if __name__ == "__main__":
    main()
