"""Input files as people have them: existence and extension checks, compressed files (.gz, .bz2,
.xz, single-member .zip; the format comes from the inner name, e.g. train.csv.gz), and text
decoding with a clear error naming the line and byte (and the --encoding that would read it),
including Windows-1252 text read as Latin-1 (C1 control characters). And the modes of the files a
run writes: what the umask gives, also for files first written privately (mkstemp, safetensors)."""
from __future__ import annotations

import atexit
import bz2
import codecs
import gzip
import hashlib
import lzma
import os
import re
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
        raise UserError(f"--encoding '{encoding}' is not a text encoding Python knows; use e.g. utf-8, cp1252 "
                        "or latin-1.") from None


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
    hint = "pass the file's real encoding with --encoding"
    if codecs.lookup(encoding).name == "utf-8":
        try:
            data.decode("cp1252")
            hint = (f"the file looks like Windows-1252 (what Excel and older tools save; 0x{byte:02x} is "
                    f"{bytes([byte]).decode('cp1252')!r} there): pass --encoding cp1252, or re-save the file as UTF-8")
        except UnicodeDecodeError:
            hint = ("it is not Windows-1252 either; pass the file's real encoding with --encoding (e.g. cp1250, "
                    "cp1251, shift_jis, gb18030), or re-save the file as UTF-8")
    return UserError(f"{flag} '{path}', line {line}: byte 0x{byte:02x} (position {err.start}) is not valid "
                     f"{encoding} text; {hint}.")


# ---------------------------------------------------------------------------------------------
# C1 control characters: Windows-1252 text read as Latin-1
# ---------------------------------------------------------------------------------------------

# No real text uses the control characters U+0080-U+009F, but Latin-1 (and the other ISO-8859 encodings)
# decode the bytes 0x80-0x9F to them, where Windows-1252 has the ellipsis, curly quotes, dashes and the euro
# sign. So they mean a Windows-1252 file decoded as Latin-1 (or saved again after such a reading), and they
# are not harmless: str.split() and strip() take U+0085 for a line break, and tokenizers drop them all.
C1 = re.compile("[\x80-\x9f]")
_C1_TEXT = "".join(map(chr, range(0x80, 0xA0)))
# The Windows code page that is its ISO-8859 encoding with printable characters at 0x80-0x9F.
_WINDOWS_PAGE = {"iso8859-1": "cp1252", "iso8859-15": "cp1252", "iso8859-2": "cp1250", "iso8859-7": "cp1253",
                 "iso8859-9": "cp1254", "iso8859-13": "cp1257"}


def decodes_to_c1(encoding: str) -> bool:
    """Whether the encoding reads the bytes 0x80-0x9F as C1 control characters (Latin-1, the ISO-8859 family)."""
    return bytes(range(0x80, 0xA0)).decode(encoding, errors="replace") == _C1_TEXT


def c1_meaning(chars: str, page: str = "cp1252") -> str:
    """The distinct C1 characters of `chars` (three at most) with what their byte is in the Windows code page:
    "U+0085 ('…' in Windows-1252)"."""
    shown = []
    for c in sorted(set(C1.findall(chars)))[:3]:
        try:
            meant = f"{bytes([ord(c)]).decode(page)!r} in Windows-{page[2:]}"
        except UnicodeDecodeError:
            meant = f"no character in Windows-{page[2:]}"
        shown.append(f"U+{ord(c):04X} ({meant})")
    return ", ".join(shown)


def c1_only(value: object) -> Optional[str]:
    """For a text that is nothing but C1 control characters (and spaces): what it is and what to do, for a
    message ("only the control character U+0085 ('…' in Windows-1252), not text: ..."); else None. Such a
    cell is dropped by tokenizers, and U+0085 is even blank to str.strip(), so it would be called empty. (A
    file read as Latin-1 never gets this far: `read_text` refuses it, naming --encoding cp1252.)"""
    if not isinstance(value, str) or not C1.search(value) or C1.sub("", value).strip():
        return None
    what = "control character" if len(set(C1.findall(value))) == 1 else "control characters"
    return (f"only the {what} {c1_meaning(value)}, not text: Windows-1252 text was decoded as Latin-1 on its way "
            "here; decode the original with cp1252 (--encoding cp1252), or repair the data")


def _check_c1(text: str, data: bytes, path: str, flag: str, encoding: str) -> None:
    """C1 control characters in a decoded file: refused when the encoding made them (a Latin-1 reading: the flag
    to pass is named), else (UTF-8 text that was converted wrongly once) one warning with the line."""
    first = C1.search(text)
    if first is None:
        return
    line = text.count("\n", 0, first.start()) + 1
    found = C1.findall(text)
    if not decodes_to_c1(encoding):
        logger.warning("%s '%s', line %d: %d C1 control character(s) (%s), which no text uses: was this file "
                       "converted from Windows-1252 as if it were Latin-1? The tokenizer drops them; repair the file "
                       "to keep the characters they stood for", flag, path, line, len(found), c1_meaning(text))
        return
    page = _WINDOWS_PAGE.get(codecs.lookup(encoding).name)
    byte = ord(first.group())
    bytes_ = ", ".join(f"0x{ord(c):02x}" for c in sorted(set(found))[:5]) + (" ..." if len(set(found)) > 5 else "")
    where = (f"{flag} '{path}', line {line}: byte 0x{byte:02x} is a control character in {encoding}, not text "
             f"({len(found)} such byte(s) in the file: {bytes_})")
    if page is None:  # no Windows code page shares this encoding's letters: only the kind of fix can be named
        raise UserError(f"{where}; the file is in another encoding, likely a Windows code page (cp1250-cp1258, the "
                        "one of its language): pass it with --encoding.")
    try:
        data.decode(page)
    except UnicodeDecodeError as err:
        raise UserError(f"{where}, and byte 0x{data[err.start]:02x} has no character in Windows-{page[2:]} either; "
                        "pass the file's real encoding with --encoding.") from None
    raise UserError(f"{where}; the file is Windows-{page[2:]} text, where 0x{byte:02x} is "
                    f"{bytes([byte]).decode(page)!r}: pass --encoding {page}.")


def read_text(path: str, flag: str, encoding: str = "utf-8") -> str:
    """The whole file (decompressed) as text, with "\n" line breaks also for old-Mac files (CR only). A byte
    the encoding cannot read, a NUL character (binary data, or UTF-16 without a byte-order mark), a file
    whose line breaks vanish once decoded (the wrong --encoding) and C1 control characters made by a Latin-1
    reading of Windows-1252 text are errors naming the file (other C1 characters: a warning)."""
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
                            f"{encoding} text; pass its real encoding with --encoding (e.g. utf-8 or cp1252).")
        text = text.replace("\r", "\n")  # old Mac line endings
    _check_c1(text, data, path, flag, encoding)
    return text


def first_line(path: str, flag: str, encoding: str = "utf-8") -> str:
    """The first line of a (possibly compressed) text file, decoded leniently (for format sniffing)."""
    with open(local_file(path, flag), "rb") as fh:
        head = fh.read(1 << 16)
    text = head.decode(_codec(encoding, head[:4]), errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")[0]


# ---------------------------------------------------------------------------------------------
# The modes of what a run writes
# ---------------------------------------------------------------------------------------------

def _umask_from_proc() -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_umask_once() -> int:
    found = _umask_from_proc()
    if found is None:  # os.umask reads only by setting: done once, at import, before any thread writes files
        found = os.umask(0o022)
        os.umask(found)
    return found


_UMASK_AT_IMPORT = _read_umask_once()


def umask() -> int:
    """The process's umask, read without changing it (os.umask would, racing with threads creating files):
    Linux shows it in /proc/self/status; elsewhere the value at import."""
    found = _umask_from_proc()
    return _UMASK_AT_IMPORT if found is None else found


def honour_umask(*paths: str) -> None:
    """Give files the mode a plain open() gives (0666 less the umask) and folders a plain mkdir's (0777 less
    the umask). For what is first written privately -- tempfile.mkstemp/mkdtemp and safetensors create mode
    0600/0700 -- so that a model, its results and predictions are as readable as config.json beside them."""
    mask = umask()
    for path in paths:
        os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def honour_umask_tree(folder: str) -> None:
    """honour_umask for a folder this process created and everything in it (symbolic links left alone)."""
    honour_umask(folder)
    for root, dirs, names in os.walk(folder):
        honour_umask(*(os.path.join(root, n) for n in dirs + names if not os.path.islink(os.path.join(root, n))))


def honour_umask_files(folder: str) -> None:
    """honour_umask for the files directly in a folder (not the folder: it may be the user's own), e.g. what a
    library's save_pretrained wrote; files owned by someone else are left as they are."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not os.path.islink(path):
            try:
                honour_umask(path)
            except PermissionError:
                pass
