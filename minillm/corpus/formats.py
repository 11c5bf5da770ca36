"""Input containers: compressed files (.gz, .bz2, .xz from the standard library; .zst through Python 3.14's
``compression.zstd`` or the ``zstandard`` package) and Parquet tables (through ``pyarrow``). Every reader
streams: memory holds one read buffer, or one Parquet record batch. ``corpus.read`` decodes what they give.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from minillm.errors import MiniLLMError, UsageError

PARQUET_SUFFIXES = (".parquet",)
PARQUET_BATCH = 1024  # rows per record batch read from a Parquet file
# what a broken or truncated compressed stream raises (a zstd error is turned into OSError by _ZstdReader)
READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, lzma.LZMAError)


def _open_zstd(path: Path) -> IO[bytes]:
    """A .zst file as a binary stream (every frame), or a MiniLLMError naming the extra to install."""
    try:
        from compression import zstd  # type: ignore[import-not-found]  # Python 3.14+

        return io.BufferedReader(_ZstdReader(zstd.open(path, "rb"), zstd.ZstdError))
    except ImportError:
        pass
    try:
        import zstandard
    except ImportError:
        raise MiniLLMError(f"{path}: reading .zst files needs the zstandard package (or Python 3.14+); "
                           f"pip install 'minillm[zstd]', or decompress it with `zstd -d`") from None
    reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)
    return io.BufferedReader(_ZstdReader(reader, zstandard.ZstdError))


class _ZstdReader(io.RawIOBase):
    """A zstd decompressing stream whose decoding errors are ``OSError`` (as gzip's, bz2's and lzma's are)."""

    def __init__(self, stream: Any, error: type[BaseException]) -> None:
        self._stream, self._error = stream, error

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            data = self._stream.read(len(b))
        except self._error as e:
            raise OSError(f"invalid zstd data ({e})") from e
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()


OPENERS: dict[str, Callable[[Path], IO[bytes]]] = {
    ".gz": lambda p: gzip.open(p, "rb"),
    ".bz2": lambda p: bz2.open(p, "rb"),
    ".xz": lambda p: lzma.open(p, "rb"),
    ".zst": _open_zstd,
}


def compression(name: str) -> str:
    """The compression suffix of a file name (``.gz``, ``.bz2``, ``.xz``, ``.zst``), or ``""``."""
    return next((s for s in OPENERS if name.lower().endswith(s)), "")


def base_name(name: str) -> str:
    """A file name, lowercased, without its compression suffix: ``Book.TXT.zst`` -> ``book.txt``."""
    name = name.lower()
    return name.removesuffix(compression(name))


def open_binary(path: Path | str) -> IO[bytes]:
    """A file's bytes, decompressed by its suffix."""
    opener = OPENERS.get(compression(Path(path).name))
    return opener(path) if opener else open(path, "rb")


def is_parquet(path: Path) -> bool:
    return path.name.lower().endswith(PARQUET_SUFFIXES)


def iter_parquet(path: Path, field: str) -> Iterator[str]:
    """The texts of column ``field`` of a Parquet file, one record batch in memory at a time; null cells
    are skipped."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MiniLLMError(f"{path}: reading Parquet files needs pyarrow; pip install 'minillm[parquet]'") from None
    try:
        table = pq.ParquetFile(path)
        schema = table.schema_arrow
        if field not in schema.names:
            raise UsageError(f"{path}: no column {field!r} (found: {', '.join(schema.names)}); pass --text-field NAME")
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise MiniLLMError(f"{path}: column {field!r} is {kind}, not text; pass --text-field with a text column")
        for batch in table.iter_batches(batch_size=PARQUET_BATCH, columns=[field]):
            yield from (v for v in batch.column(0).to_pylist() if v is not None)
    except (pa.ArrowException, OSError) as e:
        raise MiniLLMError(f"cannot read {path} as Parquet ({e}); check the file") from e
