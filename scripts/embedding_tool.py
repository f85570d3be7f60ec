"""Look inside an embedding file, or convert it to another tool's format. No pickled code is ever run.

``python scripts/embedding_tool.py inspect FILE [--config C --ckpt K] [--top 5]``: format, placeholders and their
token ids, vectors per placeholder, width and model family, per-vector norms, the file's metadata and, given the
model's config and checkpoint, the nearest vocabulary words of each vector (cosine against the token-embedding table).

``python scripts/embedding_tool.py convert SRC DST [--to original|a1111|diffusers] [--placeholder P] [--name N]
[--rename OLD=NEW] [--tokenizer clip|bert]``: the format defaults to DST's suffix (``.safetensors``/``.bin``:
diffusers, else original). A1111 and diffusers files hold one placeholder (``--placeholder`` picks it); ``--name`` is
the A1111 name or the diffusers token. A placeholder without a token id (diffusers/kohya input, or renamed) gets one
from the tokenizer (``--tokenizer``, default by width: 768/1024 CLIP, 1280 BERT).
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
    WRITABLE_FORMATS,
    LoadedEmbeddings,
    Vocabulary,
    check_width,
    format_for_path,
    read_embeddings,
    resolve_token_id,
    write_embeddings,
)
from ldm.modules.nearest_words import nearest_words  # noqa: E402
from ldm.train.errors import ConfigError, run_cli  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

logger = logging.getLogger(__name__)

TOKENIZER_BY_WIDTH = {768: "clip", 1024: "clip", 1280: "bert"}


def vocabulary(kind: str | None, width: int) -> Vocabulary | None:
    """The tokenizer named by ``kind``, else the one the width suggests, else None."""
    from ldm.modules.encoders.tokenizers import load_bert_tokenizer, load_clip_tokenizer

    kind = kind or TOKENIZER_BY_WIDTH.get(width)
    if kind is None:
        return None
    return Vocabulary.of_tokenizer(load_clip_tokenizer() if kind == "clip" else load_bert_tokenizer())


def load_text_encoder(config_path: str, ckpt: str) -> Any:
    """Only the config's text encoder, with its weights from ``ckpt`` (the rest of the model is not built)."""
    cfg = load_config(config_path)
    embedder = instantiate_from_config(cfg.model.params.cond_stage_config)
    prefix = "cond_stage_model."
    weights = {k[len(prefix):]: v for k, v in load_state_dict(ckpt, what="--ckpt").items() if k.startswith(prefix)}
    own = embedder.state_dict()
    fitting = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    if len(fitting) <= len(own) // 2:
        raise CheckpointError(f"checkpoint '{ckpt}' has no text-encoder weights that fit config '{config_path}'; pass the matching --config")
    embedder.load_state_dict(fitting, strict=False)
    return embedder.eval()


def inspect(opt: argparse.Namespace) -> None:
    loaded = read_embeddings(opt.file)
    embedder = None
    if opt.config or opt.ckpt:
        if not (opt.config and opt.ckpt):
            raise ConfigError("nearest words need both --config and --ckpt")
        embedder = load_text_encoder(opt.config, opt.ckpt)
        check_width(loaded, embedder.embed_dim, f"the model of '{opt.ckpt}'")
    vocab = Vocabulary.of_embedder(embedder) if embedder is not None else vocabulary(opt.tokenizer, loaded.width)
    print(f"file: {loaded.path}")
    print(f"format: {loaded.format}")
    print(f"width: {loaded.width} ({loaded.family})")
    print(f"placeholders: {len(loaded.vectors)}")
    for placeholder, vectors in loaded.vectors.items():
        token_id = loaded.token_ids.get(placeholder)
        token = f"token id {token_id}" if token_id is not None else "no token id in the file"
        if vocab is not None and token_id is not None and 0 <= token_id < vocab.size:
            token += f" ('{vocab.token(token_id)}')"
        print(f"  '{placeholder}': {vectors.shape[0]} vector(s) of {vectors.shape[1]}, {vectors.dtype}, {token}")
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
    vectors, ids = dict(loaded.vectors), dict(loaded.token_ids)
    for value in renames:
        old, sep, new = value.rpartition("=")
        if not sep or not old or not new:
            raise ConfigError(f"--rename '{value}': write OLD=NEW")
        if old not in vectors:
            raise ConfigError(f"--rename {value}: '{loaded.path}' has no placeholder '{old}' (it has {', '.join(vectors)})")
        if new in vectors:
            raise ConfigError(f"--rename {value}: '{new}' is already a placeholder of '{loaded.path}'")
        vectors = {new if k == old else k: v for k, v in vectors.items()}
        ids.pop(old, None)
    return LoadedEmbeddings(loaded.path, loaded.format, vectors, ids, dict(loaded.metadata))


def convert(opt: argparse.Namespace) -> None:
    loaded = renamed(read_embeddings(opt.src), opt.rename)
    fmt = opt.to or format_for_path(opt.dst)
    if fmt == A1111 and Path(opt.dst).suffix.lower() == ".safetensors":
        raise ConfigError("--to a1111 writes a .pt file; name the output .pt (A1111 reads diffusers .safetensors too)")
    chosen = list(loaded.vectors) if fmt == ORIGINAL else [loaded.only(opt.placeholder)[0]]
    wanted = [p for p in chosen if p not in loaded.token_ids] if fmt != DIFFUSERS else []
    if wanted:
        vocab = vocabulary(opt.tokenizer, loaded.width)
        if vocab is None:
            raise ConfigError(f"placeholder(s) {', '.join(wanted)} need a token id and width {loaded.width} names no tokenizer; pass --tokenizer clip|bert")
        loaded.token_ids.update({p: resolve_token_id(vocab, p, None, opt.src) for p in wanted})
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
    i.add_argument("--tokenizer", choices=["clip", "bert"], help="tokenizer for showing token ids (default: by width)")
    c = sub.add_parser("convert", help="write an embedding file in another format")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--to", choices=WRITABLE_FORMATS, help="output format (default: from DST's suffix)")
    c.add_argument("--placeholder", help="the placeholder to write (A1111/diffusers hold one)")
    c.add_argument("--name", help="A1111 name / diffusers token (default: from the file, else DST's stem)")
    c.add_argument("--rename", action="append", default=[], metavar="OLD=NEW", help="rename a placeholder")
    c.add_argument("--tokenizer", choices=["clip", "bert"], help="tokenizer for token ids (default: by width)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    opt = parse_args(argv)
    run_cli(lambda: inspect(opt) if opt.command == "inspect" else convert(opt))


if __name__ == "__main__":
    main()
