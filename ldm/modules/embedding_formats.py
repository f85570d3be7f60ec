"""The project's one reader and writer of textual-inversion embedding files, in every layout the common tools use.

Read (all pickles through ``torch.load(weights_only=True)`` with only the few container classes the original format
needs, so no code in a file ever runs; or through safetensors):

* ``original``: ``{"string_to_token": {p: id}, "string_to_param": {p: [K, D]}}`` as written by rinongal's
  EmbeddingManager (also pickled as an ``nn.ParameterDict``, also saved on CUDA), plus any extra keys;
* ``a1111``: the same two keys with ``name``/``step``/``sd_checkpoint``/``sd_checkpoint_name`` (AUTOMATIC1111);
* ``diffusers``: ``{token: [K, D]}`` (``learned_embeds.safetensors``/``.bin``; the legacy 1-D ``[D]`` form too);
* ``kohya``: ``{"emb_params": [K, D]}`` (``.pt`` or ``.safetensors``);
* ``.safetensors`` of each: the two-key layouts flattened as ``string_to_param.<p>`` / ``string_to_token.<p>``;
* SDXL (one vector set per text encoder: CLIP-L and OpenCLIP-bigG): ``{"clip_l": [K, 768], "clip_g": [K, 1280]}``
  (``sdxl``: the file AUTOMATIC1111, ComfyUI and kohya's sd-scripts share, ``.safetensors`` or ``.pt``); diffusers'
  two files ``learned_embeds.safetensors`` (CLIP-L) + ``learned_embeds_2.safetensors`` (OpenCLIP-bigG), given as
  either file or their folder; and this project's original-style ``.pt``: ``{"string_to_token": {p: id},
  "string_to_param": {"clip_l": {p: [K, 768]}, "clip_g": {p: [K, 1280]}}}``.

Everything comes back as a :class:`LoadedEmbeddings` (SDXL files with both halves). Written: the original ``.pt``
(default), the A1111 ``.pt`` and the diffusers ``.safetensors`` (``.bin`` on request); SDXL words as the ``sdxl``
safetensors, the original-style ``.pt`` or diffusers' two files; always atomically. Our diffusers files carry the placeholder
and its token id in the safetensors metadata (``ti.placeholder``/``ti.token_id``; diffusers ignores them), so a
round trip original -> A1111 -> diffusers -> original gives back the same placeholders, ids and bit-identical vectors.
A file that is none of these raises :class:`EmbeddingFileError` with one line naming the file.
"""
from __future__ import annotations

import logging
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from torch import nn

from ldm.checkpoint import atomic_torch_save, refused_global
from ldm.errors import UserError
from ldm.file_kinds import foreign_kind
from ldm.io import atomic_write
from ldm.modules.placeholders import PlaceholderError, Vocabulary
from ldm.provenance import metadata_to_record, record_to_metadata

logger = logging.getLogger(__name__)

ORIGINAL, A1111, DIFFUSERS, KOHYA, SDXL = "original", "a1111", "diffusers", "kohya", "sdxl"
WRITABLE_FORMATS = (ORIGINAL, A1111, DIFFUSERS, SDXL)
SDXL_HALVES = ("clip_l", "clip_g")  # CLIP ViT-L/14 (conditioner.embedders.0), OpenCLIP ViT-bigG/14 (embedders.1)
DIFFUSERS_FIRST, DIFFUSERS_SECOND = "learned_embeds", "learned_embeds_2"
KOHYA_PLACEHOLDER = "*"

FAMILIES = {
    64: "a shapes model (width 64: models/shapes' BERT-style encoder, or a shapes SD v1, 2.x or SDXL encoder)",
    768: "SD v1 (CLIP ViT-L/14, width 768)",
    1024: "SD v2 (OpenCLIP ViT-H/14, width 1024)",
    1280: "LDM-1.4B (BERT-style encoder, width 1280) or one half of SDXL (OpenCLIP ViT-bigG/14)",
}
_SAFE_GLOBALS = [nn.ParameterDict, nn.Parameter, OrderedDict, set]
_XTI_KEYS = {"IN01", "MID", "OUT11"}


class EmbeddingFileError(UserError, ValueError):
    """An embedding file that cannot be used with this model; ``str()`` is a one-line message."""


# the text encoder class a config names -> its family (SDXL's configs have a conditioner_config instead)
ENCODER_FAMILIES = {"FrozenCLIPEmbedder": "SD v1", "FrozenOpenCLIPEmbedder": "SD 2.x", "BERTEmbedder": "LDM"}


def config_family(config_text: Any) -> str | None:
    """The family a model config names (the YAML an embedding file's provenance record holds, ``config``): "SDXL",
    "SD 2.x", "SD v1" or "LDM"; None when the text is not such a config. Exact where the width is a guess: the shapes
    models of every family have width-64 encoders."""
    if not isinstance(config_text, str) or not config_text.strip():
        return None
    try:
        params = yaml.safe_load(config_text)["model"]["params"]
    except (yaml.YAMLError, KeyError, TypeError):
        return None
    if not isinstance(params, dict):
        return None
    if "conditioner_config" in params:
        return "SDXL"
    encoder = params.get("cond_stage_config")
    target = str(encoder.get("target", "")) if isinstance(encoder, dict) else ""
    return ENCODER_FAMILIES.get(target.rsplit(".", 1)[-1])


def family_for_width(width: int) -> str:
    """The model family whose text encoder has token embeddings of ``width`` (a guess: width is all a file tells)."""
    return FAMILIES.get(int(width), f"an unknown model family (width {int(width)})")


@dataclass
class LoadedEmbeddings:
    """The placeholders of one embedding file, whatever its layout.

    ``vectors`` maps each placeholder to its ``[K, D]`` tensor (dtype as stored); ``token_ids`` holds the token id the
    file gives for a placeholder, where it gives one; ``metadata`` the file's other entries (A1111 fields, the
    provenance record, safetensors metadata).
    """

    path: Path
    format: str
    vectors: dict[str, torch.Tensor]
    token_ids: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    clip_g: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: the OpenCLIP-bigG half (vectors: CLIP-L)

    @property
    def is_sdxl(self) -> bool:
        return bool(self.clip_g)

    @property
    def width(self) -> int:
        """The vectors' width (SDXL: the CLIP-L half's; see :attr:`widths`)."""
        return int(next(iter(self.vectors.values())).shape[-1])

    @property
    def widths(self) -> tuple[int, ...]:
        """``(width,)``, or SDXL's ``(clip_l width, clip_g width)``."""
        if not self.is_sdxl:
            return (self.width,)
        return self.width, int(next(iter(self.clip_g.values())).shape[-1])

    @property
    def family(self) -> str:
        """The family that made the vectors: named by the file's own training config where it holds one (files this
        project wrote), else guessed from the width."""
        if self.is_sdxl:
            return sdxl_family(self.widths)
        named = config_family(self.metadata.get("config"))
        if named is not None and named != "SDXL":
            return f"{named} (width {self.width})"
        return family_for_width(self.width)

    def halves(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"clip_l": ..., "clip_g": ...}`` of an SDXL file."""
        return dict(zip(SDXL_HALVES, (self.vectors, self.clip_g)))

    def half(self, name: str) -> LoadedEmbeddings:
        """One half of an SDXL file as a one-encoder :class:`LoadedEmbeddings` (same placeholders and token ids)."""
        return LoadedEmbeddings(self.path, self.format, dict(self.halves()[name]), dict(self.token_ids), dict(self.metadata))

    def only(self, placeholder: str | None = None) -> tuple[str, torch.Tensor]:
        """The one placeholder a single-placeholder format can hold (``placeholder`` picks one of several)."""
        if placeholder is None:
            if len(self.vectors) != 1:
                raise EmbeddingFileError(
                    f"'{self.path}' holds {len(self.vectors)} placeholders ({', '.join(self.vectors)}); this format holds "
                    "one: pick it with --placeholder"
                )
            placeholder = next(iter(self.vectors))
        if placeholder not in self.vectors:
            raise EmbeddingFileError(f"'{self.path}' has no placeholder '{placeholder}' (it has {', '.join(self.vectors)})")
        return placeholder, self.vectors[placeholder]


def sdxl_family(widths: tuple[int, ...]) -> str:
    return f"SDXL (clip_l width {widths[0]} + clip_g width {widths[1]})"


def check_width(loaded: LoadedEmbeddings, model_width: int, model_name: str = "this model") -> None:
    """A one-line :class:`EmbeddingFileError` naming both families when the file does not fit ``model_width``."""
    if loaded.is_sdxl or loaded.width != int(model_width):
        raise EmbeddingFileError(
            f"embedding file '{loaded.path}' holds {loaded.family} vectors, but {model_name}'s text encoder is "
            f"{family_for_width(model_width)}; use an embedding trained for this model family"
        )


def check_sdxl_widths(loaded: LoadedEmbeddings, widths: tuple[int, int], model_name: str = "this model") -> None:
    """An SDXL model needs both halves, each of its encoder's width: else one line naming both families."""
    if not loaded.is_sdxl:
        raise EmbeddingFileError(
            f"embedding file '{loaded.path}' holds one set of {loaded.family} vectors, but {model_name} is "
            f"{sdxl_family(widths)} and needs both halves (clip_l and clip_g); use an embedding trained for SDXL"
        )
    if loaded.widths != tuple(widths):
        raise EmbeddingFileError(
            f"embedding file '{loaded.path}' holds {loaded.family} vectors, but {model_name} is {sdxl_family(widths)}; "
            "use an embedding trained for this model"
        )


# ------------------------------------------------------------------------------------------------------------ read
def read_embeddings(path: str | os.PathLike) -> LoadedEmbeddings:
    """Read any supported embedding file (see the module docstring) without executing pickled code."""
    p = Path(path)
    pair = diffusers_pair(p)
    if pair is not None:
        return _read_diffusers_pair(p, *pair)
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "does not exist"
        raise EmbeddingFileError(f"embedding file '{p}' {what}; pass an embedding file (.pt, .bin or .safetensors)")
    loaded = _read_one(p)
    for half in (loaded.vectors, loaded.clip_g) if loaded.is_sdxl else (loaded.vectors,):
        widths = {int(v.shape[-1]) for v in half.values()}
        if len(widths) != 1:
            raise EmbeddingFileError(f"'{p}' mixes vector widths {sorted(widths)}; the file is damaged")
    if loaded.is_sdxl:
        _check_halves_agree(p, loaded.vectors, loaded.clip_g)
    return loaded


def _read_one(p: Path) -> LoadedEmbeddings:
    kind = foreign_kind(p)
    if kind is not None:
        raise EmbeddingFileError(f"'{p}' is {kind}, not an embedding file; pass an embedding (.pt, .bin or .safetensors)")
    if _looks_like_safetensors(p):
        return _read_safetensors(p)
    return _from_pickled(p, _torch_load(p))


def diffusers_pair(path: Path) -> tuple[Path, Path] | None:
    """diffusers' SDXL output as ``(learned_embeds*, learned_embeds_2*)`` when ``path`` is either file (its partner
    beside it) or a folder holding both; else None."""
    if path.is_dir():
        for suffix in (".safetensors", ".bin"):
            first, second = path / f"{DIFFUSERS_FIRST}{suffix}", path / f"{DIFFUSERS_SECOND}{suffix}"
            if first.is_file() and second.is_file():
                return first, second
        return None
    if not path.is_file() or DIFFUSERS_FIRST not in path.name:
        return None
    if DIFFUSERS_SECOND in path.name:
        first, second = path.with_name(path.name.replace(DIFFUSERS_SECOND, DIFFUSERS_FIRST, 1)), path
    else:
        first, second = path, second_file(path)
    return (first, second) if first.is_file() and second.is_file() and first != second else None


def second_file(path: str | os.PathLike) -> Path:
    """Where diffusers keeps the OpenCLIP-bigG half beside ``path``: ``learned_embeds`` -> ``learned_embeds_2``
    (any other name gets ``_2`` before its suffix)."""
    p = Path(path)
    if DIFFUSERS_FIRST in p.name:
        return p.with_name(p.name.replace(DIFFUSERS_FIRST, DIFFUSERS_SECOND, 1))
    return p.with_name(f"{p.stem}_2{p.suffix}")


def _read_diffusers_pair(given: Path, first: Path, second: Path) -> LoadedEmbeddings:
    loaded_l, loaded_g = _read_one(first), _read_one(second)
    if loaded_l.is_sdxl or loaded_g.is_sdxl or loaded_l.format != DIFFUSERS or loaded_g.format != DIFFUSERS:
        raise EmbeddingFileError(f"'{given}': '{first.name}' and '{second.name}' are not diffusers' two SDXL files ({{token: tensor}} each)")
    if set(loaded_l.vectors) != set(loaded_g.vectors):
        raise EmbeddingFileError(
            f"'{given}': '{first.name}' holds tokens {sorted(loaded_l.vectors)} but '{second.name}' holds "
            f"{sorted(loaded_g.vectors)}; the two halves of an SDXL embedding name the same tokens"
        )
    _check_halves_agree(given, loaded_l.vectors, loaded_g.vectors)
    metadata = {**loaded_g.metadata, **loaded_l.metadata, "files": f"{first.name} + {second.name}"}
    return LoadedEmbeddings(given, DIFFUSERS, loaded_l.vectors, loaded_l.token_ids, metadata, dict(loaded_g.vectors))


def _check_halves_agree(p: Path, first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> None:
    for placeholder, vectors in first.items():
        other = second.get(placeholder)
        if other is None or other.shape[0] != vectors.shape[0]:
            theirs = "none" if other is None else other.shape[0]
            raise EmbeddingFileError(
                f"'{p}': placeholder '{placeholder}' has {vectors.shape[0]} clip_l vector(s) but {theirs} clip_g; the "
                "SDXL file is damaged"
            )


def _looks_like_safetensors(p: Path) -> bool:
    with open(p, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < header_len <= p.stat().st_size - 8


def _torch_load(p: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = refused_global(err)
        if refused is None:
            raise EmbeddingFileError(
                f"'{p}' is a damaged or truncated PyTorch file (UnpicklingError), not a readable embedding; pass a .pt, "
                ".bin or .safetensors embedding"
            ) from err
        raise EmbeddingFileError(
            f"'{p}' was refused by the safe reader ({refused[:160]}): it needs Python code to load, which is never run; "
            "pass an embedding file holding tensors only"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError, TypeError, KeyError, IndexError,
            struct.error) as err:  # what the safe unpickler trips on in a damaged or cut file
        raise EmbeddingFileError(
            f"'{p}' is a damaged or truncated PyTorch file ({type(err).__name__}), not a readable embedding; pass a .pt, "
            ".bin or .safetensors embedding"
        ) from err


def _plain_params(container: Any) -> dict[str, torch.Tensor]:
    """``{placeholder: tensor}`` of a dict or an ``nn.ParameterDict`` (also one pickled by torch 1.x)."""
    if isinstance(container, nn.Module):
        container = container.__dict__.get("_parameters", {})
    return {str(k): v.detach() for k, v in dict(container).items() if isinstance(v, torch.Tensor)}


def _as_id(value: Any) -> int | None:
    try:
        return int(torch.as_tensor(value).reshape(()))
    except (TypeError, ValueError, RuntimeError):
        return None


def _two_key(p: Path, params: dict[str, torch.Tensor], tokens: Mapping[str, Any], extra: dict[str, Any]) -> LoadedEmbeddings:
    if not params:
        raise EmbeddingFileError(f"'{p}' has an empty string_to_param; the file holds no vectors")
    token_ids = {s: i for s, i in ((str(s), _as_id(t)) for s, t in tokens.items()) if i is not None and s in params}
    fmt = A1111 if "name" in extra else ORIGINAL
    vectors = {s: v if v.dim() == 2 else v.reshape(-1, v.shape[-1]) for s, v in params.items()}
    return LoadedEmbeddings(p, fmt, vectors, token_ids, extra)


def _tensor_dict(p: Path, obj: Mapping[str, Any], metadata: dict[str, Any]) -> LoadedEmbeddings:
    """Layouts with one tensor per key: kohya ``emb_params`` or diffusers ``{token: [K, D] or [D]}``."""
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    halves = [k for k in SDXL_HALVES if k in tensors]
    if halves:
        return _sdxl_tensors(p, tensors, halves, metadata)
    if _XTI_KEYS <= set(tensors):
        raise EmbeddingFileError(f"'{p}' is a kohya XTI (per-UNet-layer) embedding, which LDM/SD v1 prompts cannot use")
    if not tensors or len(tensors) != len(obj) or any(v.dim() not in (1, 2) for v in tensors.values()):
        raise EmbeddingFileError(
            f"'{p}' holds none of the known embedding layouts (original/A1111 string_to_param, diffusers "
            "{token: tensor}, kohya emb_params)"
        )
    if set(tensors) == {"emb_params"}:
        return LoadedEmbeddings(p, KOHYA, {KOHYA_PLACEHOLDER: tensors["emb_params"].reshape(-1, tensors["emb_params"].shape[-1])}, {}, metadata)
    vectors = {k: v.reshape(1, -1) if v.dim() == 1 else v for k, v in tensors.items()}
    if any(v.dim() == 1 for v in tensors.values()):
        metadata = {**metadata, "layout": "legacy 1-D"}
    token_ids: dict[str, int] = {}
    placeholder, token_id = metadata.pop("ti.placeholder", None), metadata.pop("ti.token_id", None)
    if placeholder and len(vectors) == 1:  # our own diffusers export: restore the original placeholder and id
        token = next(iter(vectors))
        metadata.setdefault("name", token)
        vectors = {placeholder: vectors[token]}
        if token_id is not None and str(token_id).lstrip("-").isdigit():
            token_ids[placeholder] = int(token_id)
    return LoadedEmbeddings(p, DIFFUSERS, vectors, token_ids, metadata)


def _sdxl_tensors(p: Path, tensors: Mapping[str, torch.Tensor], halves: list[str], metadata: dict[str, Any]) -> LoadedEmbeddings:
    """The shared SDXL layout ``{"clip_l": [K, 768], "clip_g": [K, 1280]}`` (one placeholder; ours names it and its
    token id in the metadata, others are read as ``*``)."""
    if len(halves) == 1:
        (have,) = halves
        width = int(tensors[have].shape[-1])
        raise EmbeddingFileError(
            f"'{p}' holds only the {have} half of an SDXL embedding (width {width}); an SDXL word needs clip_l and "
            "clip_g (the file is incomplete)"
        )
    if set(tensors) != set(SDXL_HALVES) or any(v.dim() not in (1, 2) for v in tensors.values()):
        raise EmbeddingFileError(f"'{p}' holds clip_l/clip_g and other keys ({', '.join(sorted(tensors))}); not a known SDXL layout")
    placeholder = str(metadata.pop("ti.placeholder", None) or KOHYA_PLACEHOLDER)
    token_id = metadata.pop("ti.token_id", None)
    token_ids = {placeholder: int(token_id)} if token_id is not None and str(token_id).lstrip("-").isdigit() else {}
    l, g = (tensors[k].reshape(-1, tensors[k].shape[-1]) for k in SDXL_HALVES)
    return LoadedEmbeddings(p, SDXL, {placeholder: l}, token_ids, metadata, {placeholder: g})


def _sdxl_two_key(p: Path, params: Mapping[str, Any], tokens: Mapping[str, Any], extra: dict[str, Any]) -> LoadedEmbeddings:
    """This project's original-style SDXL ``.pt``: ``string_to_param`` = ``{"clip_l": {p: ..}, "clip_g": {p: ..}}``."""
    missing = [k for k in SDXL_HALVES if k not in params]
    if missing:
        raise EmbeddingFileError(f"'{p}' is an SDXL embedding without its {' and '.join(missing)} half; the file is incomplete")
    loaded_l = _two_key(p, _plain_params(params["clip_l"]), tokens, extra)
    loaded_g = _two_key(p, _plain_params(params["clip_g"]), tokens, extra)
    return LoadedEmbeddings(p, ORIGINAL, loaded_l.vectors, loaded_l.token_ids, extra, loaded_g.vectors)


def _from_pickled(p: Path, obj: Any) -> LoadedEmbeddings:
    if isinstance(obj, torch.Tensor) and obj.dim() in (1, 2):
        return LoadedEmbeddings(p, DIFFUSERS, {KOHYA_PLACEHOLDER: obj.reshape(-1, obj.shape[-1])}, {}, {"layout": "bare tensor"})
    if not isinstance(obj, Mapping):
        raise EmbeddingFileError(f"'{p}' holds a {type(obj).__name__}, not an embedding dict; pass an embedding file")
    if "state_dict" in obj:
        raise EmbeddingFileError(f"'{p}' is a model checkpoint, not an embedding file; pass it as the checkpoint (--ckpt)")
    if "string_to_param" in obj:
        extra = {str(k): v for k, v in obj.items() if k not in ("string_to_param", "string_to_token")}
        tokens = obj.get("string_to_token") or {}
        params = obj["string_to_param"]
        if isinstance(params, Mapping) and any(isinstance(params.get(k), Mapping) for k in SDXL_HALVES):
            return _sdxl_two_key(p, params, dict(tokens), extra)
        return _two_key(p, _plain_params(params), dict(tokens), extra)
    return _tensor_dict(p, obj, {})


def _read_safetensors(p: Path) -> LoadedEmbeddings:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as handle:
            raw_meta = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise EmbeddingFileError(f"'{p}' is not a readable safetensors file ({' '.join(str(err).split())[:160]})") from err
    if raw_meta.get("format") == "pt":  # diffusers' container marker, not a property of the embedding
        del raw_meta["format"]
    metadata = metadata_to_record(raw_meta)
    params = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("string_to_param.")}
    if params:
        tokens = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("string_to_token.")}
        return _two_key(p, params, tokens, metadata)
    return _tensor_dict(p, tensors, metadata)


# ----------------------------------------------------------------------------------------------------------- write
def _vector(v: torch.Tensor) -> torch.Tensor:
    return v.detach().to("cpu").clone().contiguous()


def _pt_extras(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata entries that can go into a ``.pt`` as plain values (the safe reader must read them back)."""
    keep = (str, int, float, bool, type(None), dict, list)
    return {k: v for k, v in metadata.items() if isinstance(v, keep) and not k.startswith("ti.") and k != "layout"}


def original_payload(
    vectors: Mapping[str, torch.Tensor], token_ids: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The original two-key dict (plain CPU tensors, so safe loaders read it) plus the plain-valued ``extra`` keys."""
    missing = [p for p in vectors if p not in token_ids]
    if missing:
        raise PlaceholderError(f"no token id for placeholder(s) {', '.join(missing)}; the original format needs one")
    payload: dict[str, Any] = {
        "string_to_token": {p: torch.tensor(int(token_ids[p])) for p in vectors},
        "string_to_param": {p: _vector(v) for p, v in vectors.items()},
    }
    payload.update({k: v for k, v in _pt_extras(extra or {}).items() if k != "name"})  # "name" marks A1111 files
    return payload


def save_original(
    path: str | os.PathLike,
    vectors: Mapping[str, torch.Tensor],
    token_ids: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """The original two-key ``.pt`` (see :func:`original_payload`), written atomically."""
    atomic_torch_save(original_payload(vectors, token_ids, extra), path)
    return Path(path)


def save_a1111(
    path: str | os.PathLike,
    placeholder: str,
    vector: torch.Tensor,
    token_id: int,
    *,
    name: str,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """AUTOMATIC1111's ``.pt``: one placeholder, ``name`` (the prompt word there), step and model fields."""
    meta = dict(metadata or {})
    payload: dict[str, Any] = {
        "string_to_token": {placeholder: int(token_id)},
        "string_to_param": {placeholder: _vector(vector)},
        "name": name,
        "step": meta.get("step"),
        "sd_checkpoint": meta.get("sd_checkpoint"),
        "sd_checkpoint_name": meta.get("sd_checkpoint_name"),
    }
    payload.update({k: v for k, v in _pt_extras(meta).items() if k not in payload})
    atomic_torch_save(payload, path)
    return Path(path)


def save_diffusers(
    path: str | os.PathLike,
    token: str,
    vector: torch.Tensor,
    *,
    placeholder: str | None = None,
    token_id: int | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """diffusers' ``{token: [K, D]}``: ``.safetensors`` (metadata ``format: pt`` + ours) or, for ``.bin``, a ``.pt``."""
    p = Path(path)
    tensors = {token: _vector(vector)}
    if p.suffix.lower() != ".safetensors":
        atomic_torch_save(tensors, p)
        return p
    from safetensors.torch import save_file

    meta = {"format": "pt"}
    if placeholder is not None:
        meta["ti.placeholder"] = placeholder
    if token_id is not None:
        meta["ti.token_id"] = str(int(token_id))
    extra = {k: v for k, v in (metadata or {}).items() if k not in meta and k != "layout" and not k.startswith("ti.")}
    meta.update(record_to_metadata(_pt_extras(extra)))
    return atomic_write(p, lambda temp: save_file(tensors, str(temp), metadata=meta))


def sdxl_payload(
    halves: Mapping[str, Mapping[str, torch.Tensor]], token_ids: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The original style for SDXL: ``string_to_token`` as ever, ``string_to_param`` keyed by half (``clip_l``,
    ``clip_g``), each ``{placeholder: [K, width]}``; plus the plain-valued ``extra`` keys."""
    payload = original_payload(halves["clip_l"], token_ids, extra)
    payload["string_to_param"] = {name: {p: _vector(v) for p, v in halves[name].items()} for name in SDXL_HALVES}
    return payload


def save_sdxl_original(
    path: str | os.PathLike, halves: Mapping[str, Mapping[str, torch.Tensor]], token_ids: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """:func:`sdxl_payload` as a ``.pt``, written atomically."""
    atomic_torch_save(sdxl_payload(halves, token_ids, extra), path)
    return Path(path)


def save_sdxl(
    path: str | os.PathLike, placeholder: str, clip_l: torch.Tensor, clip_g: torch.Tensor, *,
    token_id: int | None = None, metadata: Mapping[str, Any] | None = None,
) -> Path:
    """The SDXL file people share: ``{"clip_l": [K, 768], "clip_g": [K, 1280]}``. ``.safetensors`` (our placeholder,
    token id and provenance in its metadata, which other tools ignore), or any other suffix as a ``.pt`` (kohya)."""
    p = Path(path)
    tensors = {"clip_l": _vector(clip_l), "clip_g": _vector(clip_g)}
    if p.suffix.lower() != ".safetensors":
        atomic_torch_save(tensors, p)
        return p
    from safetensors.torch import save_file

    meta = {"ti.placeholder": placeholder}
    if token_id is not None:
        meta["ti.token_id"] = str(int(token_id))
    extra = {k: v for k, v in (metadata or {}).items() if k not in ("layout", "files", "format") and not k.startswith("ti.")}
    meta.update(record_to_metadata(_pt_extras(extra)))
    return atomic_write(p, lambda temp: save_file(tensors, str(temp), metadata=meta))


def _write_sdxl(loaded: LoadedEmbeddings, path: str | os.PathLike, fmt: str, placeholder: str | None, name: str | None) -> Path:
    if fmt == ORIGINAL:
        return save_sdxl_original(path, loaded.halves(), loaded.token_ids, loaded.metadata)
    chosen, clip_l = loaded.only(placeholder)
    clip_g = loaded.clip_g[chosen]
    if fmt in (SDXL, A1111):
        return save_sdxl(path, chosen, clip_l, clip_g, token_id=loaded.token_ids.get(chosen), metadata=loaded.metadata)
    if fmt == DIFFUSERS:
        token = name or str(loaded.metadata.get("name") or chosen)
        meta = {k: v for k, v in loaded.metadata.items() if k not in ("name", "files")}
        first = save_diffusers(path, token, clip_l, placeholder=chosen, token_id=loaded.token_ids.get(chosen), metadata=meta)
        save_diffusers(second_file(path), token, clip_g, placeholder=chosen, token_id=loaded.token_ids.get(chosen), metadata=meta)
        return first
    raise ValueError(f"cannot write format '{fmt}'; choose one of {', '.join(WRITABLE_FORMATS)}")


def diffusers_target(path: str | os.PathLike) -> Path:
    """Where a diffusers file goes: ``path`` itself when it names a file (has a suffix), else diffusers' folder layout,
    ``path/learned_embeds.safetensors`` (SDXL: and ``learned_embeds_2.safetensors`` beside it), as its training script
    writes and its loaders (and :func:`read_embeddings`) read a folder."""
    p = Path(path)
    return p / f"{DIFFUSERS_FIRST}.safetensors" if p.is_dir() or not p.suffix else p


def format_for_path(path: str | os.PathLike) -> str:
    """The format a file name asks for: ``.safetensors``/``.bin`` -> diffusers, anything else -> original."""
    return DIFFUSERS if Path(path).suffix.lower() in (".safetensors", ".bin") else ORIGINAL


def default_format(loaded: LoadedEmbeddings, path: str | os.PathLike) -> str:
    """The format ``path``'s suffix asks for (:func:`format_for_path`); an SDXL word's ``.safetensors`` is the shared
    ``sdxl`` file."""
    fmt = format_for_path(path)
    return SDXL if loaded.is_sdxl and Path(path).suffix.lower() == ".safetensors" else fmt


def write_embeddings(
    loaded: LoadedEmbeddings,
    path: str | os.PathLike,
    fmt: str | None = None,
    *,
    placeholder: str | None = None,
    name: str | None = None,
) -> Path:
    """Write ``loaded`` in ``fmt`` (default: from the suffix). A1111/diffusers hold one placeholder (``placeholder``).

    SDXL words (default by suffix: ``.safetensors`` the shared ``sdxl`` file, ``.bin`` diffusers, else the
    original-style ``.pt``): ``a1111`` is the ``sdxl`` file (what AUTOMATIC1111 reads), ``diffusers`` writes ``path``
    (CLIP-L) and its ``learned_embeds_2`` partner (OpenCLIP-bigG, see :func:`second_file`).

    A diffusers ``path`` without a suffix (or an existing folder) is a folder: ``learned_embeds.safetensors`` goes in it
    (:func:`diffusers_target`).

    ``name`` is the A1111 name (default: the file's name, else the output stem) or the diffusers token, the word its
    users type in prompts (default: the file's A1111 name if it has one, else the placeholder itself, never the
    output file's name). Token ids must be known for the two-key formats (see :func:`fill_token_ids`).
    """
    fmt = fmt or default_format(loaded, path)
    if fmt == DIFFUSERS:
        path = diffusers_target(path)
    if loaded.is_sdxl:
        return _write_sdxl(loaded, path, fmt, placeholder, name)
    if fmt == SDXL:
        raise EmbeddingFileError(f"'{loaded.path}' holds {loaded.family} vectors, not an SDXL word (clip_l + clip_g); choose another format")
    if fmt == ORIGINAL:
        return save_original(path, loaded.vectors, loaded.token_ids, loaded.metadata)
    chosen, vector = loaded.only(placeholder)
    if fmt == A1111:
        label = name or str(loaded.metadata.get("name") or Path(path).stem)
        if chosen not in loaded.token_ids:
            raise PlaceholderError(f"no token id for placeholder '{chosen}'; the A1111 format needs one")
        return save_a1111(path, chosen, vector, loaded.token_ids[chosen], name=label, metadata=loaded.metadata)
    if fmt == DIFFUSERS:
        token = name or str(loaded.metadata.get("name") or chosen)
        meta = {k: v for k, v in loaded.metadata.items() if k != "name"}
        return save_diffusers(path, token, vector, placeholder=chosen, token_id=loaded.token_ids.get(chosen), metadata=meta)
    raise ValueError(f"cannot write format '{fmt}'; choose one of {', '.join(WRITABLE_FORMATS)}")


# ------------------------------------------------------------------------------------------------ token resolution
def resolve_token_id(
    vocab: Vocabulary, placeholder: str, file_id: int | None, source: str | os.PathLike, hint: str = ""
) -> int:
    """The token id a placeholder from ``source`` gets under ``vocab``.

    A single-token placeholder gets the tokenizer's id (a warning if the file said otherwise). Otherwise the file's id
    is kept when it lies in the vocabulary and is not the unknown token (a warning names the token that triggers it);
    else :class:`PlaceholderError`. ``hint`` is appended to the warnings (e.g. which flag picks another tokenizer).
    """
    model_id = vocab.single_token(placeholder)
    if model_id is not None:
        if file_id is not None and file_id != model_id:
            logger.warning(
                "'%s': placeholder '%s' has token id %d in the file but %d in this model's tokenizer; using %d%s",
                source, placeholder, file_id, model_id, model_id, hint,
            )
        return model_id
    if file_id is not None and 0 <= file_id < vocab.size and not vocab.is_unknown(file_id):
        logger.warning(
            "'%s': placeholder '%s' is not one token of this model's tokenizer; keeping the file's token id %d, so "
            "prompts trigger it with '%s'%s", source, placeholder, file_id, vocab.token(file_id), hint,
        )
        return file_id
    suggestions = ", ".join(f"'{s}'" for s in vocab.alternatives()[:5])
    raise PlaceholderError(
        f"'{source}': placeholder '{placeholder}' is not one known token of this model's tokenizer and the file gives no "
        f"usable token id; rename it to a single-token string such as {suggestions} "
        f"(scripts/embedding_tool.py convert --rename '{placeholder}=*')"
    )


def fill_token_ids(loaded: LoadedEmbeddings, vocab: Vocabulary) -> LoadedEmbeddings:
    """``loaded`` with every placeholder's token id resolved under ``vocab`` (see :func:`resolve_token_id`)."""
    ids = {p: resolve_token_id(vocab, p, loaded.token_ids.get(p), loaded.path) for p in loaded.vectors}
    return LoadedEmbeddings(loaded.path, loaded.format, dict(loaded.vectors), ids, dict(loaded.metadata), dict(loaded.clip_g))
