"""Cleaning one document: ftfy repair, line endings, control characters, NFC, trailing spaces, blank
lines, case, and the rewriting of special-token strings. Pure functions, run in worker processes.

Every step can be switched off (``CleanOptions``) except the special-string rewriting, which keeps a
document from smuggling a ``<|doc|>`` boundary (or any other ``<|name|>`` token) into the corpus.
Indentation is never touched: code and tables survive.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from dataclasses import dataclass

SPECIAL_RE = re.compile(r"<\|([^\s|<>]{1,64})\|>")  # <|doc|>, <|pad|>, <|endoftext|>, ...
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")  # C0/C1 but \t \n \r; BOM
_WS = "".join(c for c in map(chr, range(0x3001)) if c.isspace() and c not in "\r\n")  # str.split's whitespace
_RARE_WS_RE = re.compile("[" + re.escape(_WS.replace(" ", "").replace("\t", "")) + "]")
_WORD_RE = re.compile(r"\w+")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class CleanOptions:
    """Which cleaning steps run (all on by default but lowercase)."""

    ftfy: bool = True  # repair mojibake and broken HTML entities (ftfy)
    newlines: bool = True  # CRLF and lone CR -> LF
    control: bool = True  # remove control characters except tab and newline (and a stray BOM)
    nfc: bool = True  # Unicode NFC normalization
    trailing: bool = True  # strip spaces and tabs at line ends
    blank_lines: bool = True  # three or more newlines -> two
    lowercase: bool = False  # lowercase everything
    min_chars: int = 1  # drop documents shorter than this after cleaning


def _ftfy_config():
    from ftfy import TextFixerConfig

    # Line breaks, control characters and normalization are our own (switchable) steps; quotes stay curly.
    return TextFixerConfig(
        normalization=None, fix_line_breaks=False, remove_control_chars=False, uncurl_quotes=False, explain=False
    )


_CONFIG = None


def _needs_ftfy_ascii(text: str) -> bool:
    """ASCII text can only hold an HTML entity or a terminal escape for ftfy to fix."""
    return "&" in text or "\x1b" in text


def fix_text(text: str) -> str:
    """``ftfy.fix_text`` with our config, but skipping the lines that cannot hold anything to fix (ASCII
    without ``&`` or ESC): equal output, several times faster on mostly-ASCII text."""
    global _CONFIG
    if text.isascii() and not _needs_ftfy_ascii(text):
        return text
    from ftfy import fix_and_explain

    if _CONFIG is None:
        _CONFIG = _ftfy_config()
    config = _CONFIG
    out = []
    pos = 0
    n = len(text)
    while pos < n:
        brk = text.find("\n", pos) + 1 or n
        if brk - pos > config.max_decode_length:
            brk = pos + config.max_decode_length
        seg = text[pos:brk]
        if config.unescape_html == "auto" and "<" in seg:
            config = config._replace(unescape_html=False)  # sticky, as in ftfy.fix_text
        if not seg.isascii() or _needs_ftfy_ascii(seg):
            seg = fix_and_explain(seg, config).text
        out.append(seg)
        pos = brk
    return "".join(out)


def strip_trailing(text: str) -> str:
    """Strip whitespace (not line breaks) at the end of every line; leading indentation is kept."""
    if not (" \n" in text or "\t\n" in text or text[-1:] in (" ", "\t") or _RARE_WS_RE.search(text)):
        return text  # the common case, found at C speed
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.endswith("\r"):  # CRLF kept (--no-fix-newlines): strip before the CR
            lines[i] = line[:-1].rstrip(_WS) + "\r"
        else:
            lines[i] = line.rstrip(_WS)
    return "\n".join(lines)


def rewrite_special(text: str) -> tuple[str, int]:
    """Make special-token strings read as text: ``<|doc|>`` -> ``< |doc| >``. Returns (text, count)."""
    if "<|" not in text:
        return text, 0
    return SPECIAL_RE.subn(r"< |\1| >", text)


def clean_document(text: str, opts: CleanOptions) -> tuple[str, int, bool]:
    """Clean one document. Returns (cleaned text, special strings rewritten, whether ftfy repaired it)."""
    repaired = False
    if opts.newlines and "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if opts.ftfy:
        fixed = fix_text(text)
        repaired = fixed is not text and fixed != text
        text = fixed
    if opts.control:
        text = _CONTROL_RE.sub("", text)
    if opts.nfc and not text.isascii():
        text = unicodedata.normalize("NFC", text)
    if opts.trailing:
        text = strip_trailing(text)
    if opts.blank_lines:
        while "\n\n\n" in text:
            text = text.replace("\n\n\n", "\n\n")
    if opts.lowercase:
        text = text.lower()
    text, n_special = rewrite_special(text)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (from JSON escapes) cannot be written as UTF-8
            text = _SURROGATE_RE.sub("\ufffd", text)
    text = text.strip("\n")
    if not text.strip():
        text = ""
    return text, n_special, repaired


def normalized_hash(text: str) -> int:
    """64-bit hash of the text with whitespace runs collapsed: the key of exact deduplication."""
    norm = " ".join(text.split())
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def shingles(text: str, n: int = 3) -> set[bytes]:
    """Word n-grams of the lowercased text (the whole text when it has fewer than n words)."""
    words = _WORD_RE.findall(text.lower())
    if len(words) < n:
        return {" ".join(words).encode("utf-8", "surrogatepass")}
    return {" ".join(words[i : i + n]).encode("utf-8", "surrogatepass") for i in range(len(words) - n + 1)}


def minhash_values(text: str, num_perm: int):
    """MinHash signature of the text's word 3-grams (datasketch): (hash values, scheme or None)."""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, hashfunc=zlib.crc32, seed=1)
    sh = list(shingles(text))
    for i in range(0, len(sh), 8192):  # bounded memory: datasketch broadcasts (shingles, num_perm)
        m.update_batch(sh[i : i + 8192])
    return m.hashvalues, getattr(m, "scheme", None)  # datasketch >= 2 needs the scheme to rebuild it


@dataclass(frozen=True)
class CleanResult:
    """One document after cleaning, as a worker sends it back."""

    text: str  # "" when dropped
    reason: str | None  # why it was dropped: empty, too_short; None when kept
    n_special: int  # special strings rewritten
    repaired: bool  # ftfy changed something
    key: int  # exact-dedup hash (0 when dropped or dedup is off)
    minhash: object = None  # numpy signature for near-dedup, or None


def clean_batch(docs: list[str], opts: CleanOptions, dedup: bool, num_perm: int) -> list[CleanResult]:
    """Clean a batch of raw documents (the unit of work of a worker process)."""
    out = []
    for raw in docs:
        text, n_special, repaired = clean_document(raw, opts)
        if not text:
            out.append(CleanResult("", "empty", n_special, repaired, 0))
            continue
        if len(text) < opts.min_chars:
            out.append(CleanResult("", "too_short", n_special, repaired, 0))
            continue
        key = normalized_hash(text) if dedup else 0
        mh = minhash_values(text, num_perm) if num_perm else None
        out.append(CleanResult(text, None, n_special, repaired, key, mh))
    return out
