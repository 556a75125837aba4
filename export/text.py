"""Text prompts -> L2-normalised open_clip text embeddings, stored in the bundle.

The runtime never loads CLIP: export embeds each prompt once and writes
`text_embeddings.npz`; the runtime reads it back with `load_text_embeddings`, which needs
numpy only. torch and open_clip are therefore imported inside the functions that use them,
so importing this module stays cheap (DESIGN.md §5, §7).
"""

from __future__ import annotations

import difflib
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastsam2.runtime.errors import InputError, OutputError
from fastsam2.runtime.bundle import read_text_embeddings as load_text_embeddings  # noqa: F401
from fastsam2.runtime.bundle import sha256_file

DEFAULT_TEXT_MODEL = "ViT-B-32"
DEFAULT_TEXT_PRETRAINED = "laion2b_s34b_b79k"
RANDOM = "random"
# a prompts file is a short list of words; a bigger one is a mistake (/dev/zero, a video)
MAX_PROMPTS_FILE_BYTES = 1 << 20


def parse_prompts(prompts: str | None, prompts_file: str | os.PathLike | None = None) -> list[str]:
    """`--prompts "a, b"` plus one prompt per line of `--prompts-file`, de-duplicated in order;
    at least one prompt from either."""
    found: list[str] = []
    if prompts is not None:
        parts = [p.strip() for p in prompts.split(",")]
        if any(not p for p in parts):
            # "a,,b" or a trailing comma is almost always a typo; say so rather than guess.
            raise InputError(f"--prompts has an empty prompt: {prompts!r}")
        found += parts
    if prompts_file is not None:
        found += [s for s in (line.strip() for line in _read_prompts_file(prompts_file).splitlines())
                  if s and not s.startswith("#")]
    unique = list(dict.fromkeys(found))
    if not unique:
        where = f"prompts file '{prompts_file}' holds none" if prompts_file is not None else "none given"
        raise InputError(f"no text prompts: {where}; pass --prompts \"a, b\" or --prompts-file FILE "
                         "(one prompt a line, # comments)")
    return unique


def _read_prompts_file(path) -> str:
    """The prompts file's text: a regular file of at most MAX_PROMPTS_FILE_BYTES (/dev/zero or a
    FIFO would otherwise be read until memory runs out)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer before it is refused
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InputError(f"prompts file '{path}' is not a regular file")
            raw = f.read(MAX_PROMPTS_FILE_BYTES + 1)
    except OSError as e:
        raise InputError(f"cannot read prompts file '{path}': {e.strerror or e}") from None
    if len(raw) > MAX_PROMPTS_FILE_BYTES:
        raise InputError(f"prompts file '{path}' is larger than {MAX_PROMPTS_FILE_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"cannot read prompts file '{path}': not UTF-8 text ({e.reason} at byte {e.start})") from None


@dataclass(frozen=True)
class TextEncoderSpec:
    """Which open_clip text tower to use.

    pretrained: an open_clip tag, or "random"/None for a seeded random init of the same
    architecture (tests, offline demo). checkpoint: a local open_clip checkpoint file; when
    given it wins over `pretrained`, so a CLI default tag never forces a download.
    """

    model: str = DEFAULT_TEXT_MODEL
    pretrained: str | None = DEFAULT_TEXT_PRETRAINED
    checkpoint: str | os.PathLike | None = None
    seed: int = 0

    @property
    def is_random(self) -> bool:
        return self.checkpoint is None and self.pretrained in (None, RANDOM)


@dataclass
class TextEncoder:
    """A loaded open_clip model + tokenizer; `encode` can be called many times."""

    model: Any
    tokenizer: Any
    info: dict

    def encode(self, prompts: list[str]) -> dict[str, np.ndarray]:
        import torch

        _check_prompts(prompts)
        with torch.no_grad():
            emb = self.model.encode_text(self.tokenizer(list(prompts))).float()
        emb = emb.cpu().numpy().astype(np.float32)
        # Normalise in numpy so the stored vectors are unit-norm whatever open_clip's default.
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        return {p: emb[i].copy() for i, p in enumerate(prompts)}


def compute_text_embeddings(prompts: list[str], spec: TextEncoderSpec = TextEncoderSpec()
                            ) -> tuple[dict[str, np.ndarray], dict]:
    """Embed each prompt: {prompt: float32 (D,) unit vector}, plus info for the manifest."""
    _check_prompts(prompts)
    encoder = load_text_encoder(spec)
    return encoder.encode(prompts), dict(encoder.info)


def load_text_encoder(spec: TextEncoderSpec) -> TextEncoder:
    """Build the open_clip model on CPU in eval mode; user mistakes become one-line InputErrors."""
    import open_clip
    import torch

    _check_model_name(spec.model)
    sha256 = None
    if spec.checkpoint is not None:
        path = Path(spec.checkpoint)
        if not path.is_file():
            raise InputError(f"text checkpoint not found: '{path}'")
        sha256 = sha256_file(path)
        # open_clip's own loader unwraps {"state_dict": ...} and "module." prefixes, converts
        # third-party layouts, and uses torch.load(weights_only=True).
        model = _create(spec.model, str(path), lambda e: InputError(
            f"could not load open_clip checkpoint '{path}' as {spec.model}: {_one_line(e)}"))
    elif spec.is_random:
        # fork_rng: seed the init without changing the caller's global torch RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = _create(spec.model, None, lambda e: InputError(
                f"could not build open_clip model '{spec.model}': {_one_line(e)}"))
        warnings.warn(f"text encoder {spec.model} is randomly initialised (seed {spec.seed}): "
                      "prompt embeddings are not meaningful", UserWarning, stacklevel=2)
    else:
        _check_tag(spec.model, spec.pretrained)
        _check_reachable(spec.model, spec.pretrained)
        model = _create(spec.model, spec.pretrained, lambda e: InputError(
            f"could not fetch open_clip weights '{spec.model}/{spec.pretrained}' (no network?); "
            "pass --text-checkpoint FILE (a local open_clip checkpoint) "
            "or --text-pretrained random"))
    model.eval()
    try:
        tokenizer = open_clip.get_tokenizer(spec.model)
    except Exception as e:  # HF-tokenizer models need the hub too
        raise InputError(f"could not load the tokenizer for '{spec.model}': {_one_line(e)}") from e
    info = {
        "model": spec.model,
        "pretrained": None if spec.checkpoint is not None or spec.is_random else spec.pretrained,
        "checkpoint_sha256": sha256,
        "dim": _embed_dim(model, tokenizer),
        "random": spec.is_random,
        "open_clip_version": open_clip.__version__,
    }
    return TextEncoder(model=model, tokenizer=tokenizer, info=info)


def save_text_embeddings(path: str | os.PathLike, embeddings: dict[str, np.ndarray]) -> None:
    """Write `prompts` (str [K]) and `embeddings` (float32 [K, D]) to an .npz at exactly `path`."""
    if not embeddings:
        raise InputError("no text embeddings to save")
    prompts = list(embeddings)
    emb = np.stack([np.asarray(embeddings[p], dtype=np.float32) for p in prompts])
    try:
        # An open file, not a name: np.savez would append ".npz" to a name without it.
        with open(path, "wb") as f:
            np.savez(f, prompts=np.array(prompts, dtype=str), embeddings=emb)
    except OSError as e:
        raise OutputError(f"cannot write text embeddings '{path}': {e}") from None


# -- helpers ------------------------------------------------------------------------------

def _check_prompts(prompts: list[str]) -> None:
    if isinstance(prompts, str):  # a bare string would be embedded letter by letter
        raise InputError("prompts must be a list of strings, got one string")
    if not prompts:
        raise InputError("no text prompts given")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise InputError(f"empty text prompt: {p!r}")


def _check_model_name(name: str) -> None:
    import open_clip

    if name.startswith(("hf-hub:", "local-dir:")):
        return  # open_clip resolves these itself; failures surface from _create
    models = open_clip.list_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=5) or models[:5]
        raise InputError(f"unknown open_clip model '{name}'; e.g. {', '.join(close)} "
                         f"({len(models)} in open_clip.list_models())")


def _check_tag(model: str, tag: str) -> None:
    import open_clip

    if model.startswith(("hf-hub:", "local-dir:")):
        return
    tags = open_clip.list_pretrained_tags_by_model(model)
    if tag not in tags:
        hint = f"known tags: {', '.join(tags)}" if tags else "it has no published weights"
        raise InputError(f"unknown open_clip pretrained tag '{tag}' for {model} ({hint}); "
                         "pass --text-checkpoint FILE or --text-pretrained random")


def _check_reachable(model: str, tag: str) -> None:
    """Fail in a second, not after the hub's retries (~46 s measured), when the weights are
    neither in the local cache nor reachable: one TCP connect to the host they come from."""
    import socket
    from urllib.parse import urlparse

    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag) or {}
    repo = (cfg.get("hf_hub") or "").strip("/")
    if repo:
        try:
            from huggingface_hub import constants

            if (Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}").is_dir():
                return  # cached: open_clip loads it without the network
            offline = bool(constants.HF_HUB_OFFLINE)
            host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        except ImportError:
            return
    elif cfg.get("url"):
        offline, host = False, urlparse(cfg["url"]).hostname
    else:
        return
    why = "HF_HUB_OFFLINE is set" if offline else None
    if why is None:
        try:
            socket.create_connection((host, 443), timeout=5).close()
            return
        except OSError as e:
            why = f"{host} is unreachable: {e.strerror or e}"
    raise InputError(f"could not fetch open_clip weights '{model}/{tag}' ({why}); pass --text-checkpoint "
                     "FILE (a local open_clip checkpoint) or --text-pretrained random")


def _create(model: str, pretrained: str | None, error):
    """open_clip.create_model on CPU/fp32; any failure becomes `error(exc)`."""
    import open_clip

    try:
        return open_clip.create_model(model, pretrained=pretrained, device="cpu", precision="fp32")
    except Exception as e:  # download, unpickling, key mismatch: all user-side here
        raise error(e) from e


def _embed_dim(model, tokenizer) -> int:
    """Output width of encode_text, read off one forward (text_projection's layout varies by tower)."""
    import torch

    with torch.no_grad():
        return int(model.encode_text(tokenizer([""])).shape[-1])


def _one_line(e: BaseException) -> str:
    import pickle

    if isinstance(e, pickle.UnpicklingError):
        # torch's own text here advises weights_only=False, which is not a fix for users.
        return ("UnpicklingError: not a checkpoint that torch.load(weights_only=True) can read "
                "(corrupt or truncated file, or it pickles arbitrary objects)")
    lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
    # load_state_dict's message is "Error(s) in loading state_dict for CLIP:" + details below.
    text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    return (f"{type(e).__name__}: {text}" if text else type(e).__name__)[:300]
