"""Merge several embedding files into one, so that their placeholders can be used together in one prompt.

``python merge_embeddings.py --manager_ckpts A.pt B.pt ... --output_path M.pt [-sd]`` as the original: files are
read in order (any format :mod:`ldm.modules.embedding_formats` reads); a placeholder already taken asks for a
replacement when a person is at the terminal. For scripts: ``--rename OLD=NEW`` (used for the next clash of OLD;
repeat it for several) or ``--rename FILE:OLD=NEW`` (renames OLD of that file, clash or not; FILE as given or by its
base name when only one file has it), and ``--auto_rename`` (the first free single-token string of
``* @ & # $ % ^ ~ א ב ...``). Without an answer and without a terminal the merge stops with one line saying which flag
to add.

SD 2.x files (width 1024) merge with ``-sd`` as SD v1 files do; SDXL files (clip_l + clip_g, any layout the readers
know) too, each placeholder's two halves moving together, into the original-style ``.pt`` with both halves keyed.

Differences from the original, all deliberate: replacements are checked against every placeholder already merged
(by string and by token id), files of different families (LDM 1280 vs SD 768, SD v1 vs SD 2.x, SDXL vs either) are
refused naming both files and both families, and no
model is built: only the tokenizer (``-sd``: CLIP, else BERT, or ``--config``'s), loaded offline. The output is
the original two-key format (plus a ``merged_from`` key recording each placeholder's source file, by a path
relative to where the merge ran or by its name, never an absolute one, and its sha256). Replacements must be one
token the tokenizer knows (:mod:`ldm.modules.placeholders`).
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ldm.config import load_configs
from ldm.errors import ConfigError, run_cli
from ldm.modules.embedding_formats import (
    EmbeddingFileError,
    LoadedEmbeddings,
    diffusers_pair,
    family_for_width,
    read_embeddings,
    resolve_token_id,
    save_original,
    save_sdxl_original,
)
from ldm.modules.placeholders import SUGGESTED_PLACEHOLDERS, PlaceholderError, Vocabulary, per_img_token_list, vocabulary_of_config
from ldm.provenance import file_sha256

logger = logging.getLogger(__name__)

AUTO_CANDIDATES = tuple(SUGGESTED_PLACEHOLDERS) + tuple(per_img_token_list) + tuple("+=!?§£¥©®°±¶")
SD_WIDTH, LDM_WIDTH = 768, 1280


@dataclass(frozen=True)
class Rename:
    old: str
    new: str
    file: str | None = None

    def matches_file(self, path: str) -> bool:
        return self.file is not None and same_file(self.file, path)


def same_file(given: str, path: str) -> bool:
    """Whether ``given`` (from ``--rename FILE:...``) names ``path``: as typed, as the same file, or by base name."""
    return given == path or Path(given).resolve() == Path(path).resolve() or (Path(given).name == given and Path(path).name == given)


def parse_renames(values: Sequence[str], files: Sequence[str]) -> list[Rename]:
    """``OLD=NEW`` or ``FILE:OLD=NEW`` (FILE one of ``files``: as given, by path, or by base name when that is unique)."""
    renames = []
    for value in values:
        left, sep, new = value.rpartition("=")
        if not sep or not left or not new:
            raise ConfigError(f"--rename '{value}': write OLD=NEW or FILE:OLD=NEW")
        file, colon, old = left.rpartition(":")
        matching = [f for f in files if same_file(file, f)] if colon and file else []
        if len(matching) > 1:
            raise ConfigError(
                f"--rename '{value}': '{file}' names {len(matching)} of the files ({', '.join(matching)}); write the path as "
                "given to --manager_ckpts"
            )
        if matching:
            renames.append(Rename(old, new, matching[0]))
        else:
            renames.append(Rename(left, new))
    return renames


def recorded_path(path: str) -> str:
    """How the merge record names a source file: as given when that is a path inside the folder the merge ran in,
    else by its name; never a machine's absolute folders (the sha256 beside it identifies the file)."""
    given = Path(path)
    return given.as_posix() if not given.is_absolute() and ".." not in given.parts else given.name


class Merger:
    """Collects placeholders file by file, resolving clashes by rename rules, automatically, or by asking."""

    def __init__(
        self,
        vocab: Vocabulary,
        renames: Sequence[Rename] = (),
        auto_rename: bool = False,
        ask: Callable[[str], str] | None = None,
        sd: bool = False,
        token_hint: str = "",
    ) -> None:
        self.vocab = vocab
        self.token_hint = token_hint
        self.qualified = [r for r in renames if r.file is not None]
        self.pending = [r for r in renames if r.file is None]
        self.auto_rename = auto_rename
        self.ask = ask
        self.sd = sd
        self.vectors: dict[str, torch.Tensor] = {}
        self.vectors_g: dict[str, torch.Tensor] = {}  # SDXL files: the clip_g half (vectors holds clip_l)
        self.token_ids: dict[str, int] = {}
        self.sources: dict[str, dict[str, str]] = {}  # the record written to the file: file names, not paths
        self.given: dict[str, str] = {}  # each placeholder's file as given on the command line (for the screen)
        self.first: tuple[str, LoadedEmbeddings] | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.first is not None and self.first[1].is_sdxl

    def check_family(self, path: str, loaded: LoadedEmbeddings) -> None:
        """The first file sets the family (its widths, one encoder or SDXL's two); every later file must match."""
        if self.first is None:
            if self.sd and loaded.width == LDM_WIDTH and not loaded.is_sdxl:
                raise EmbeddingFileError(f"'{path}' holds {family_for_width(loaded.width)} vectors; merge them without -sd")
            if not self.sd and (loaded.width == SD_WIDTH or loaded.is_sdxl):
                raise EmbeddingFileError(f"'{path}' holds {loaded.family} vectors; merge them with -sd")
            self.first = (path, loaded)
        elif (loaded.is_sdxl, loaded.widths) != (self.first[1].is_sdxl, self.first[1].widths):
            raise EmbeddingFileError(
                f"cannot merge '{path}' ({loaded.family}) with '{self.first[0]}' ({self.first[1].family}): "
                "all files must come from one model family"
            )

    def add_file(self, path: str) -> None:
        loaded = read_embeddings(path)
        self.check_family(path, loaded)
        pair = diffusers_pair(Path(path))  # diffusers' SDXL output: both files' digests
        digest = " + ".join(file_sha256(f) for f in pair) if pair else file_sha256(path)
        for placeholder, vector in loaded.vectors.items():
            name, token_id = self.place(path, placeholder, loaded.token_ids.get(placeholder))
            self.vectors[name] = vector
            if loaded.is_sdxl:
                self.vectors_g[name] = loaded.clip_g[placeholder]
            self.token_ids[name] = token_id
            self.sources[name] = {"file": recorded_path(path), "placeholder": placeholder, "sha256": digest}
            self.given[name] = str(path)

    def taken_by(self, name: str, token_id: int | None) -> str | None:
        """The merged placeholder that ``name`` (or its token id) would collide with."""
        if name in self.vectors:
            return name
        return next((p for p, i in self.token_ids.items() if token_id is not None and i == token_id), None)

    def place(self, path: str, placeholder: str, file_id: int | None) -> tuple[str, int]:
        """The (placeholder, token id) under which ``placeholder`` of ``path`` is merged."""
        rule = next((r for r in self.qualified if r.matches_file(path) and r.old == placeholder), None)
        if rule is not None:
            return rule.new, self.check_replacement(rule.new, f"--rename {rule.file}:{rule.old}={rule.new}")
        try:
            token_id: int | None = resolve_token_id(self.vocab, placeholder, file_id, path, self.token_hint)
        except PlaceholderError:
            token_id, problem = None, f"is not one known token of the {self.tokenizer_name} tokenizer"
        else:
            other = self.taken_by(placeholder, token_id)
            if other is None:
                return placeholder, token_id
            problem = "was already used" if other == placeholder else f"has the token id of '{other}'"
        return self.replacement(path, placeholder, problem)

    def replacement(self, path: str, placeholder: str, problem: str) -> tuple[str, int]:
        rule = next((r for r in self.pending if r.old == placeholder), None)
        if rule is not None:
            self.pending.remove(rule)
            return rule.new, self.check_replacement(rule.new, f"--rename {rule.old}={rule.new}")
        if self.auto_rename:
            for candidate in AUTO_CANDIDATES:
                token_id = self.vocab.single_token(candidate)
                if token_id is not None and self.taken_by(candidate, token_id) is None:
                    logger.warning("'%s': placeholder '%s' %s; merged as '%s'", path, placeholder, problem, candidate)
                    return candidate, token_id
            raise ConfigError(f"--auto_rename found no free single-token placeholder for '{placeholder}' of '{path}'; use --rename")
        if self.ask is None:
            raise ConfigError(
                f"placeholder '{placeholder}' of '{path}' {problem} and stdin is not a terminal to ask for a replacement; "
                f"pass --rename '{path}:{placeholder}=NEW' (or --rename '{placeholder}=NEW') or --auto_rename"
            )
        return self.ask_replacement(placeholder, problem)

    def ask_replacement(self, placeholder: str, problem: str) -> tuple[str, int]:
        """The original's interactive prompt, repeated until the answer is one free token."""
        question = f"Placeholder string {placeholder} {problem}. Please enter a replacement string: "
        while True:
            answer = self.ask(question).strip()
            token_id = self.vocab.single_token(answer) if answer else None
            if token_id is None and len(self.vocab.content_ids(answer)) == 1:
                question = f"Placeholder string '{answer}' is not in the tokenizer's vocabulary. Please enter another string: "
            elif token_id is None:
                question = f"Placeholder string '{answer}' maps to more than a single token. Please enter another string: "
            elif self.taken_by(answer, token_id) is not None:
                question = f"Placeholder string '{answer}' is already taken (by '{self.taken_by(answer, token_id)}'). Please enter another string: "
            else:
                return answer, token_id

    @property
    def tokenizer_name(self) -> str:
        return "CLIP" if self.sd else "BERT"

    def check_replacement(self, name: str, flag: str) -> int:
        token_id = self.vocab.placeholder_token(name, set(self.vectors), flag, f"the {self.tokenizer_name}")
        other = self.taken_by(name, token_id)
        if other is not None:
            raise ConfigError(f"{flag}: '{name}' is already taken by merged placeholder '{other}'; choose another string")
        return token_id


def load_vocabulary(sd: bool, config: str | None = None) -> tuple[Vocabulary, bool]:
    """The tokenizer (offline: HF cache or the shipped vocabularies) as a :class:`Vocabulary`, and whether it is CLIP's.

    Without ``config``, the model family's default tokenizer (``-sd``: CLIP, else BERT); with it, the tokenizer that
    config's text encoder uses (its ``tokenizer_path`` or CLIP ``version``), e.g. the shapes model's own vocabulary.
    """
    from ldm.modules.encoders.tokenizers import load_bert_tokenizer, load_clip_tokenizer

    if config is None:
        return Vocabulary.of_tokenizer(load_clip_tokenizer() if sd else load_bert_tokenizer()), sd
    from omegaconf import DictConfig

    encoder = load_configs([config], [], flag="--config").get("model", {}).get("params", {}).get("cond_stage_config")
    if not isinstance(encoder, DictConfig):
        raise ConfigError(f"--config: '{config}' has no model.params.cond_stage_config (the text encoder) to take a tokenizer from")
    return vocabulary_of_config(encoder)


def merge(opt: argparse.Namespace) -> dict[str, str]:
    ask = input if sys.stdin is not None and sys.stdin.isatty() else None
    vocab, sd = load_vocabulary(opt.stable_diffusion, opt.config)
    hint = "" if opt.config else "; if the files were trained on a model with its own tokenizer (e.g. the shapes model), pass its config with --config"
    merger = Merger(vocab, parse_renames(opt.rename, opt.manager_ckpts), opt.auto_rename, ask, sd, hint)
    for path in opt.manager_ckpts:
        merger.add_file(path)
    for rule in merger.pending:
        logger.warning("--rename %s=%s was not needed: no later file clashed on '%s'", rule.old, rule.new, rule.old)
    try:
        record = {"merged_from": merger.sources}
        if merger.is_sdxl:
            save_sdxl_original(opt.output_path, {"clip_l": merger.vectors, "clip_g": merger.vectors_g}, merger.token_ids, record)
        else:
            save_original(opt.output_path, merger.vectors, merger.token_ids, record)
    except OSError as err:
        raise ConfigError(f"--output_path: cannot write '{opt.output_path}' ({err.strerror or type(err).__name__})") from err
    final = dict(merger.given)
    print("Managers merged. Final list of placeholders: ")
    print(final)
    return final


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Merge textual-inversion embedding files into one.")
    p.add_argument("--manager_ckpts", type=str, nargs="+", required=True, help="embedding files to merge, in order")
    p.add_argument("--output_path", type=str, required=True, help="the merged file (original .pt format)")
    p.add_argument("-sd", "--stable_diffusion", action="store_true", help="SD v1, SD 2.x or SDXL (CLIP tokenizer) embeddings instead of LDM (BERT)")
    p.add_argument("--config", help="the model's config: use its text encoder's tokenizer (e.g. a shapes model's own "
                   "vocabulary) instead of the family default")
    p.add_argument("--rename", action="append", default=[], metavar="[FILE:]OLD=NEW", help="replacement for a clashing placeholder")
    p.add_argument("--auto_rename", action="store_true", help="replace clashing placeholders by the first free single-token string")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    opt = parse_args(argv)
    run_cli(lambda: merge(opt))


if __name__ == "__main__":
    main()
