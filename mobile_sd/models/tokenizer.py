"""The CLIP BPE tokenizer of Stable Diffusion, built without network access.

No model hub is reachable here, so the tokenizer files are derived from the BPE merge list
``bpe_simple_vocab_16e6.txt.gz`` that OpenAI's CLIP ships, taken from the PyPI package
``clip-anytorch`` (installed with ``--no-deps``). That package is never imported: its
``__init__`` imports torchvision, which does not load beside this machine's CPU torch. Only its
data file is read.

The derived ``vocab.json`` / ``merges.txt`` are the ones of SD-v1.5's ``tokenizer/`` folder
(49408 entries, ``"a photo of a cat"`` -> ``49406 320 1125 539 320 2368 49407``), so
``transformers.CLIPTokenizer.from_pretrained`` and Apple's Swift ``BPETokenizer`` both read them.

Public API::

    write_tokenizer_folder(out_dir, max_length=77)  # diffusers-style tokenizer/ folder
    write_vocab_files(out_dir)                      # vocab.json + merges.txt only (Core ML bundle)
    load_tokenizer(folder)                          # -> transformers.CLIPTokenizer
    default_tokenizer(max_length=77)                # the same, without a folder of your own
    tokenize(tokenizer, prompts, max_length=77)     # -> LongTensor [B, max_length]
    clean_prompt(text)                              # CLIP's own text cleaning (used by tokenize)
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.metadata
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from mobile_sd.errors import (BackendUnavailableError, InvalidArgumentError, ModelFolderError,
                              OutputDirError)

if TYPE_CHECKING:  # heavy imports stay out of module import
    import torch
    from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
MAX_LENGTH = 77  # CLIP's context length; SD pads every prompt to it

CLIP_DISTRIBUTION = "clip-anytorch"
BPE_RESOURCE = "clip/bpe_simple_vocab_16e6.txt.gz"
INSTALL_HINT = "pip install --no-deps clip-anytorch==2.6.0"
# CLIP keeps the first 49152 - 256 - 2 merges (vocab = 2 * 256 byte symbols + merges + 2 specials).
N_MERGES = 49152 - 256 - 2
MERGES_HEADER = "#version: 0.2"

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"

# SD-v1.5's tokenizer folder: unknown bytes cannot happen (byte-level BPE) but unk must be set;
# SD pads with <|endoftext|> (49407), unlike CLIP's own zero padding.
SPECIAL_TOKENS = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
                  "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}


# ---------------------------------------------------------------------------------------------
# Deriving vocab.json / merges.txt from CLIP's merge list
# ---------------------------------------------------------------------------------------------

def _find_bpe_file() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``clip-anytorch``.

    Looked up through package metadata (or ``find_spec``, which does not execute the package):
    importing ``clip`` would import torchvision.
    """
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(CLIP_DISTRIBUTION)
        candidates.append(Path(dist.locate_file(BPE_RESOURCE)))
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        spec = importlib.util.find_spec("clip")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / Path(BPE_RESOURCE).name)
    for path in candidates:
        if path.is_file():
            return path
    raise BackendUnavailableError(
        f"the CLIP BPE vocabulary ({BPE_RESOURCE}) was not found: it comes from the PyPI "
        f"package {CLIP_DISTRIBUTION}. Install it with `{INSTALL_HINT}` (--no-deps: its "
        "torchvision requirement is not needed and does not load beside this torch)")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the rest (controls, space...) to chr(256 + n),
    so that BPE symbols never contain whitespace or control characters.

    >>> table = bytes_to_unicode()
    >>> len(table), table[ord("a")], table[ord(" ")]
    (256, 'a', 'Ġ')
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    byte_values, chars = printable[:], [chr(b) for b in printable]
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            chars.append(chr(256 + len(chars) - len(printable)))
    # Insertion order matters: the values in this order are vocabulary ids 0..255.
    return dict(zip(byte_values, chars))


def _read_merges(path: Path) -> list[str]:
    """CLIP's merges: lines 1..48894 of the gz file (line 0 is a header), as ``"a b"`` strings."""
    try:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise BackendUnavailableError(f"{path} is unreadable or corrupt ({exc}); reinstall it "
                                      f"with `{INSTALL_HINT} --force-reinstall`") from exc
    merges = [" ".join(line.split()) for line in lines[1:N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise BackendUnavailableError(f"{path} does not hold CLIP's {N_MERGES} BPE merges; "
                                      f"reinstall it with `{INSTALL_HINT} --force-reinstall`")
    return merges


@functools.lru_cache(maxsize=1)
def _clip_bpe() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(vocab in id order, merges in rank order), derived exactly as CLIP's SimpleTokenizer does.

    Cached: the gz file is read and the 49408-entry vocabulary built once per process.
    """
    path = _find_bpe_file()
    merges = _read_merges(path)
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
    vocab += [m.replace(" ", "") for m in merges]
    vocab += [BOS_TOKEN, EOS_TOKEN]
    if len(vocab) != VOCAB_SIZE or len(set(vocab)) != VOCAB_SIZE:
        raise BackendUnavailableError(f"the CLIP vocabulary derived from {path} has "
                                      f"{len(set(vocab))} distinct entries, not {VOCAB_SIZE}; "
                                      f"reinstall it with `{INSTALL_HINT} --force-reinstall`")
    return tuple(vocab), tuple(merges)


@functools.lru_cache(maxsize=1)
def _vocab_files_text() -> tuple[str, str]:
    """The text of ``vocab.json`` and ``merges.txt`` (cached: folder writes only copy strings).

    vocab.json is compact, in id order and not ASCII-escaped, so the bytes are deterministic
    (stable sha256 in manifests). merges.txt has the ``#version: 0.2`` header of HF's files.
    """
    vocab, merges = _clip_bpe()
    vocab_json = json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False)
    merges_txt = "\n".join([MERGES_HEADER, *merges]) + "\n"
    return vocab_json, merges_txt


# ---------------------------------------------------------------------------------------------
# Writing folders
# ---------------------------------------------------------------------------------------------

def _write_text(path: Path, text: str) -> None:
    """Write ``path`` via a temp sibling + rename, so a crash never leaves a truncated file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(text.encode("utf-8"))  # bytes: same file on every OS (no \r\n)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputDirError(f"cannot write {path}: {exc.strerror or exc}; choose a writable "
                             "output folder") from exc


def _make_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"cannot create tokenizer folder {out}: {exc.strerror or exc}; "
                             "choose a writable output folder") from exc
    return out


def _check_max_length(max_length: int) -> int:
    # bool is an int subclass; True would silently mean 1.
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise InvalidArgumentError(f"max_length must be an int >= 2 (room for <|startoftext|> "
                                   f"and <|endoftext|>), got {max_length!r}")
    return max_length


def write_vocab_files(out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write CLIP's ``vocab.json`` and ``merges.txt`` into ``out_dir`` (created if needed).

    These two files are all Apple's Swift ``BPETokenizer`` (ml-stable-diffusion) needs next to
    the Core ML models. Existing files are replaced. Returns ``(vocab_path, merges_path)``.

    Example (not run by the tests: it needs real artifacts)::

        vocab_path, merges_path = write_vocab_files(tmp_path)
        len(json.loads(vocab_path.read_text()))
        # -> 49408
    """
    out = _make_dir(out_dir)
    vocab_json, merges_txt = _vocab_files_text()
    vocab_path, merges_path = out / VOCAB_FILE, out / MERGES_FILE
    _write_text(vocab_path, vocab_json)
    _write_text(merges_path, merges_txt)
    return vocab_path, merges_path


def write_tokenizer_folder(out_dir: str | os.PathLike, max_length: int = MAX_LENGTH) -> None:
    """Write a diffusers-style ``tokenizer/`` folder equal to SD-v1.5's.

    Files: ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` (``CLIPTokenizer``,
    ``model_max_length=max_length``) and ``special_tokens_map.json`` (bos ``<|startoftext|>``;
    eos, unk and pad ``<|endoftext|>``). ``transformers.CLIPTokenizer.from_pretrained`` loads
    it offline. Existing files are replaced; for an all-or-nothing folder, call this inside
    :func:`mobile_sd.utils.files.atomic_output_dir`.

    Example (not run by the tests: it needs real artifacts)::

        write_tokenizer_folder(tmp_path / "tokenizer")
        load_tokenizer(tmp_path / "tokenizer")("a photo of a cat").input_ids
        # -> [49406, 320, 1125, 539, 320, 2368, 49407]
    """
    _check_max_length(max_length)
    out = _make_dir(out_dir)
    write_vocab_files(out)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
              "do_lower_case": True, "add_prefix_space": False, "errors": "replace",
              "clean_up_tokenization_spaces": True, **SPECIAL_TOKENS}
    _write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    _write_text(out / SPECIAL_TOKENS_FILE, json.dumps(SPECIAL_TOKENS, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Loading and tokenizing
# ---------------------------------------------------------------------------------------------

def load_tokenizer(folder: str | os.PathLike) -> "CLIPTokenizer":
    """``transformers.CLIPTokenizer`` from a tokenizer folder (local files only, no hub).

    Needs ``vocab.json`` and ``merges.txt``; without ``tokenizer_config.json`` (e.g. a Core ML
    bundle's two files) ``model_max_length`` defaults to 77.

    Example (not run by the tests: it needs real artifacts)::

        tok = load_tokenizer("model/tokenizer")
        tok.pad_token_id, tok.model_max_length
        # -> (49407, 77)
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"tokenizer folder {folder} does not exist; write one with "
                               "mobile_sd.models.tokenizer.write_tokenizer_folder")
    missing = [name for name in (VOCAB_FILE, MERGES_FILE) if not (folder / name).is_file()]
    if missing:
        raise ModelFolderError(f"tokenizer folder {folder} has no {' or '.join(missing)}; "
                               "rewrite it with mobile_sd.models.tokenizer.write_tokenizer_folder")
    _check_tokenizer_files(folder)
    from transformers import CLIPTokenizer

    extra = {} if (folder / CONFIG_FILE).is_file() else {"model_max_length": MAX_LENGTH}
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, **extra)
    except Exception as exc:  # transformers raises many types; the user needs the folder name
        from mobile_sd.config import one_line

        raise ModelFolderError(one_line(f"cannot load the CLIP tokenizer from {folder}: "
                                        f"{type(exc).__name__}: {exc}")[:600]) from exc


def _check_tokenizer_files(folder: Path) -> None:
    """UTF-8 text, and JSON objects where JSON is expected: one-line errors naming the file."""
    from mobile_sd.config import read_json_object, read_text

    def fail(problem: str):
        return ModelFolderError(f"cannot load the CLIP tokenizer from {folder}: {problem}")

    for name in (VOCAB_FILE, MERGES_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE):
        path = folder / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".json"):
                read_json_object(path, ModelFolderError, name)
            else:
                read_text(path, ModelFolderError)
        except ModelFolderError as exc:
            raise fail(str(exc).replace(str(path), name, 1)) from None


def default_tokenizer(max_length: int = MAX_LENGTH) -> "CLIPTokenizer":
    """SD's CLIP tokenizer without a folder of your own (written to a temp folder and loaded).

    Example (not run by the tests: it needs real artifacts)::

        default_tokenizer().model_max_length
        # -> 77
    """
    with tempfile.TemporaryDirectory(prefix="mobile-sd-tokenizer-") as tmp:
        write_tokenizer_folder(tmp, max_length=max_length)
        return load_tokenizer(tmp)  # the tokenizer holds its vocab in memory after loading


def clean_prompt(text: str) -> str:
    """CLIP's own text cleaning, as in ``SimpleTokenizer.encode`` (openai/CLIP).

    ftfy ``fix_text`` (mojibake, curly quotes, ligatures, full-width forms, control chars),
    HTML unescaping twice, whitespace runs -> one space, strip, lowercase. HF's
    ``CLIPTokenizer`` (transformers 5) does only NFC + whitespace + lowercase, so without this
    "don’t", "&amp;" or "ﬁ" get other ids than CLIP (and SD) were trained with. Python's
    ``lower()`` also gives Greek final sigma (ς) like CLIP; HF lowercases char by char (σ).

    >>> clean_prompt("  A “Café” &amp; ﬁsh  ")
    'a "café" & fish'
    """
    import ftfy
    import regex  # as CLIP: the regex module's Unicode \s, not re's

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def tokenize(tokenizer: "CLIPTokenizer", prompts: str | Sequence[str],
             max_length: int = MAX_LENGTH, *, clean: bool = True) -> "torch.Tensor":
    """Token ids ``[B, max_length]`` (int64), SD's convention: bos, ids, eos, padded with eos.

    Prompts longer than ``max_length - 2`` tokens are truncated (eos kept last). ``clean``
    applies :func:`clean_prompt` first, matching openai/CLIP's tokenizer; ``clean=False`` gives
    exactly what ``tokenizer(...)`` gives (and what a device-side BPE tokenizer without ftfy
    gives).

    Example (not run by the tests: it needs real artifacts)::

        tokenize(tok, ["a photo of a cat"])[0, :8].tolist()
        # -> [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    """
    _check_max_length(max_length)
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    bad = [type(p).__name__ for p in batch if not isinstance(p, str)]
    if bad:
        raise InvalidArgumentError(f"prompts must be strings, got {', '.join(sorted(set(bad)))}")
    if not batch:  # HF's tokenizer raises IndexError on an empty batch
        import torch

        return torch.empty((0, max_length), dtype=torch.long)
    if clean:
        batch = [clean_prompt(p) for p in batch]
    encoded = tokenizer(batch, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt")
    return encoded.input_ids
