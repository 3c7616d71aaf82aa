"""Input files as people have them: existence and extension checks, compressed files (.gz, .bz2,
.xz, single-member .zip; the format comes from the inner name, e.g. train.csv.gz), and text
decoding with a clear error naming the line and byte (and the --encoding that would read it)."""
from __future__ import annotations

import atexit
import bz2
import codecs
import gzip
import hashlib
import lzma
import os
import shutil
import tempfile
import zipfile
import zlib
from typing import Optional, Sequence

from .errors import UserError
from .log import logger

COMPRESSIONS = (".gz", ".bz2", ".xz", ".zip")
KNOWN_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".conll", ".tokens")
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_tmpdir: Optional[str] = None


def split_compression(path: str) -> tuple[str, Optional[str]]:
    """(the name without its compression suffix, the suffix or None)."""
    lower = path.lower()
    for suffix in COMPRESSIONS:
        if lower.endswith(suffix):
            return path[: -len(suffix)], suffix
    return path, None


def _extension(name: str) -> str:
    lower = name.lower()
    for ext in KNOWN_EXTENSIONS:
        if lower.endswith(ext):
            return ext
    return os.path.splitext(lower)[1]


def _zip_members(path: str, flag: str) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n for n in zf.namelist() if not n.endswith("/") and not n.startswith("__MACOSX/")
                    and not os.path.basename(n).startswith("._")]
    except (zipfile.BadZipFile, OSError) as err:
        raise UserError(f"{flag} '{path}' is not a readable zip archive ({err}).") from None


def file_extension(path: str, flag: str = "") -> str:
    """The format extension of a file, looking through a compression suffix (train.csv.gz -> .csv; a zip
    without an inner extension in its name: its one member's)."""
    inner, compression = split_compression(path)
    ext = _extension(inner)
    if compression == ".zip" and ext not in KNOWN_EXTENSIONS and os.path.isfile(path):
        members = _zip_members(path, flag)
        if len(members) == 1:
            ext = _extension(members[0])
    return ext


def check_file(path: str, flag: str, allowed: Sequence[str]) -> str:
    """The file exists, is not empty and has one of the allowed (inner) extensions; returns it."""
    if not os.path.exists(path):
        raise UserError(f"{flag} '{path}' does not exist.")
    if os.path.isdir(path):
        raise UserError(f"{flag} '{path}' is a directory; pass a file.")
    if os.path.getsize(path) == 0:
        raise UserError(f"{flag} '{path}' is empty.")
    if split_compression(path)[1] == ".zip":
        members = _zip_members(path, flag)
        if len(members) != 1:
            listed = ", ".join(f"'{m}'" for m in members[:10]) + (" ..." if len(members) > 10 else "")
            raise UserError(f"{flag} '{path}' is a zip archive with {len(members)} files ({listed or 'none'}); "
                            "pass a zip holding exactly one file, or extract the one you mean and pass it.")
    ext = file_extension(path, flag)
    if ext not in allowed:
        compressed = f" (inside {split_compression(path)[1]})" if split_compression(path)[1] else ""
        raise UserError(f"{flag} '{path}' has an unsupported extension '{ext or '(none)'}'{compressed}; "
                        f"use one of {', '.join(allowed)} (optionally compressed as {', '.join(COMPRESSIONS)}).")
    return ext


def _scratch() -> str:
    global _tmpdir
    if _tmpdir is None:
        _tmpdir = tempfile.mkdtemp(prefix="bert-finetune-inputs-")
        atexit.register(shutil.rmtree, _tmpdir, True)
    return _tmpdir


def local_file(path: str, flag: str) -> str:
    """The path to read: the file itself, or its decompressed copy in a temporary folder that is
    removed when the process exits (one copy per file and process)."""
    inner, compression = split_compression(path)
    if compression is None:
        return path
    stat = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = os.path.join(_scratch(), f"{key}-{os.path.basename(inner)}")
    if os.path.isfile(dest):
        return dest
    tmp = dest + ".part"
    try:
        if compression == ".zip":
            with zipfile.ZipFile(path) as zf, zf.open(_zip_members(path, flag)[0]) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        else:
            with _OPENERS[compression](path, "rb") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except (OSError, EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile, RuntimeError) as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise UserError(f"{flag} '{path}' could not be decompressed as {compression[1:]} "
                        f"({type(err).__name__}: {err}); check that the file is complete.") from None
    os.replace(tmp, dest)
    if os.path.getsize(dest) == 0:
        raise UserError(f"{flag} '{path}' is empty once decompressed.")
    return dest


def check_encoding(encoding: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise UserError(f"--encoding '{encoding}' is not a text encoding Python knows; use e.g. utf-8, latin-1 "
                        "or cp1252.") from None


# Byte-order marks that say which Unicode encoding a file is in (UTF-32 first: its LE mark begins like UTF-16's).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))


def _codec(encoding: str, head: bytes = b"") -> str:
    """The codec to decode with. With the default --encoding utf-8, a byte-order mark decides: UTF-8's (Excel's
    "CSV UTF-8") is dropped, UTF-16/UTF-32 ones (Excel's "Unicode text") select that encoding."""
    if codecs.lookup(encoding).name != "utf-8":
        return encoding
    return next((name for bom, name in _BOMS if head.startswith(bom)), "utf-8-sig")


def decode_error(err: UnicodeDecodeError, data: bytes, path: str, flag: str, encoding: str) -> UserError:
    line = data.count(b"\n", 0, err.start) + 1
    byte = data[err.start]
    hint = ("if the file is Latin-1 or Windows-1252 text (common for files saved by Excel or older tools), pass "
            "--encoding latin-1 (or --encoding cp1252); otherwise re-save it as UTF-8"
            if codecs.lookup(encoding).name == "utf-8" else "pass the file's real encoding with --encoding")
    return UserError(f"{flag} '{path}', line {line}: byte 0x{byte:02x} (position {err.start}) is not valid "
                     f"{encoding} text; {hint}.")


def read_text(path: str, flag: str, encoding: str = "utf-8") -> str:
    """The whole file (decompressed) as text, with "\n" line breaks also for old-Mac files (CR only). A byte
    the encoding cannot read, a NUL character (binary data, or UTF-16 without a byte-order mark) and a file
    whose line breaks vanish once decoded (the wrong --encoding) are errors naming the file."""
    with open(local_file(path, flag), "rb") as fh:
        data = fh.read()
    codec = _codec(encoding, data[:4])
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as err:
        raise decode_error(err, data, path, flag, encoding) from None
    if codec in ("utf-16", "utf-32"):
        logger.info("%s '%s' starts with a %s byte-order mark: read as %s", flag, path, codec.upper(), codec.upper())
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise UserError(f"{flag} '{path}', line {line}: a NUL character (byte 0x00), so this is not a text file: "
                        "binary data, or UTF-16/UTF-32 text without a byte-order mark (then pass --encoding utf-16).")
    if "\n" not in text:
        if b"\n" in data:
            raise UserError(f"{flag} '{path}' has line breaks, but none once decoded as {encoding}: it is not "
                            f"{encoding} text; pass its real encoding with --encoding (e.g. utf-8 or latin-1).")
        text = text.replace("\r", "\n")  # old Mac line endings
    return text


def first_line(path: str, flag: str, encoding: str = "utf-8") -> str:
    """The first line of a (possibly compressed) text file, decoded leniently (for format sniffing)."""
    with open(local_file(path, flag), "rb") as fh:
        head = fh.read(1 << 16)
    text = head.decode(_codec(encoding, head[:4]), errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")[0]
