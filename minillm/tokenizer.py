"""Training, saving and loading Hugging Face ``tokenizers`` models, and the special tokens.

Every document is stored as ``<|doc|>`` followed by its tokens. Special-token strings that occur
inside text are encoded as ordinary text (``encode_special_tokens``), never as the special id.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from minillm.corpus.read import DOC, check_input_file, find_inputs, iter_pieces
from minillm.errors import MiniLLMError, UsageError

PAD = "<|pad|>"
UNK = "<|unk|>"
DEFAULT_SPECIALS = (DOC, PAD)
MODELS = ("bpe", "unigram", "wordpiece")
MAX_VOCAB = 1 << 20  # the trainers allocate for the whole vocabulary up front (1e9 aborts the process)


def special_tokens_for(model: str, extra: Iterable[str] = ()) -> list[str]:
    """The special tokens a tokenizer of this type holds: ``<|doc|>``, ``<|pad|>``, ``<|unk|>`` where the
    model type needs one, then the user's extra tokens (deduplicated, order kept)."""
    specials = list(DEFAULT_SPECIALS) + ([UNK] if model != "bpe" else [])
    for s in extra:
        s = s.strip()
        if s and s not in specials:
            specials.append(s)
    return specials


def min_vocab_size(model: str, n_specials: int) -> int:
    """Smallest vocabulary that holds the base alphabet and the special tokens."""
    return (256 if model == "bpe" else 1) + n_specials


def train_tokenizer(
    texts: Iterator[str] | Iterable[str],
    vocab_size: int,
    model: str = "bpe",
    min_frequency: int = 2,
    special_tokens: Iterable[str] = (),
    length: int | None = None,
    show_progress: bool = False,
):
    """Train a tokenizer from an iterator of documents (streamed: nothing is held in memory but the
    tokenizer's own counts). Returns a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if model not in MODELS:
        raise UsageError(f"--model: {model!r} is not one of {', '.join(MODELS)}")
    specials = special_tokens_for(model, special_tokens)
    minimum = min_vocab_size(model, len(specials))
    if vocab_size < minimum:
        raise UsageError(
            f"--vocab-size {vocab_size} is too small: a {model} tokenizer needs at least {minimum} "
            f"({'256 bytes + ' if model == 'bpe' else ''}{len(specials)} special tokens); try 8000 or more"
        )
    if vocab_size > MAX_VOCAB:
        raise UsageError(f"--vocab-size {vocab_size:,} is above the limit of {MAX_VOCAB:,} (2^20); real vocabularies "
                         f"hold 8,000 to 256,000 tokens: try 32000")
    if model == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
        )
    elif model == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token=UNK, show_progress=show_progress
        )
    else:
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, show_progress=show_progress
        )
    seen = [0]

    def counted(it: Iterable[str]) -> Iterator[str]:
        for t in it:
            seen[0] += bool(t.strip())
            yield t

    tok.train_from_iterator(counted(texts), trainer=trainer, length=length)
    if not seen[0]:
        raise MiniLLMError("--files: no text to train on (the files are empty or hold only <|doc|> separator "
                           "lines); give a corpus from `minillm prepare-corpus`")
    tok.encode_special_tokens = True
    return tok


def shortfall(tok, vocab_size: int, model: str = "bpe", min_frequency: int = 2) -> str | None:
    """A warning when the corpus could not fill the vocabulary asked for (too few distinct words or pairs)."""
    got = tok.get_vocab_size()
    if got >= vocab_size:
        return None
    min_frequency = min_frequency if model != "unigram" else 1  # the unigram trainer has no minimum count
    return (f"the corpus filled only {got:,} of the {vocab_size:,} tokens asked for: it holds too few distinct "
            f"words and pairs{f' seen --min-frequency {min_frequency} times' if min_frequency > 1 else ''} to learn "
            f"more; pass --vocab-size {got} (what was learned) or give more text")


def collect_files(paths: Iterable[Path]) -> list[Path]:
    """Expand ``--files`` as prepare-corpus expands ``--input`` (``corpus.read.find_inputs``), taking every
    file of a directory: files as given, directories recursively (sorted, hidden entries skipped)."""
    return find_inputs(paths, flag="--files", suffixes=None)[0]


def iter_training_texts(files: Iterable[Path], piece_chars: int = 1 << 20) -> Iterator[str]:
    """Stream the documents of every file for tokenizer training, one piece at a time (a document longer
    than ``piece_chars`` comes in line-aligned pieces), so a corpus larger than memory trains. The
    ``<|doc|>`` separator lines are never part of the text, so no learned token holds one."""
    for f in files:
        for text, _ in iter_pieces(Path(f), piece_chars):
            yield text


def load_tokenizer(path: Path | str):
    """Load a ``tokenizer.json``; raises ``MiniLLMError`` naming the file when it is not one."""
    from tokenizers import Tokenizer

    path = Path(path)
    check_input_file(path, "tokenizer file", "create one with `minillm init-tokenizer`")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception on malformed JSON
        raise MiniLLMError(f"{path} is not a tokenizer file ({str(e)[:120]}); create one with `minillm init-tokenizer`") from e
    if tok.token_to_id(DOC) is None:
        raise MiniLLMError(f"tokenizer {path} has no {DOC} token; create one with `minillm init-tokenizer`")
    tok.encode_special_tokens = True
    return tok


def doc_id(tok) -> int:
    return int(tok.token_to_id(DOC))


def pad_id(tok) -> int:
    i = tok.token_to_id(PAD)
    return int(i) if i is not None else doc_id(tok)


def encode_documents(tok, docs: list[str]) -> list[list[int]]:
    """Encode documents in one parallel batch, each as ``<|doc|>`` + its tokens."""
    d = doc_id(tok)
    return [[d, *e.ids] for e in tok.encode_batch(docs, add_special_tokens=False)]


def save_tokenizer(tok, path: Path) -> None:
    from minillm.io import atomic_write_text

    atomic_write_text(Path(path), tok.to_str(pretty=False))


def readable_pieces(tok, ids: list[int]) -> list[str]:
    """The text of each token of ``ids`` (``" estadísticas"``, not the byte-level ``"ĠestadÃŃsticas"``); a token
    holding part of a UTF-8 character is joined with the next ones until the character is whole."""
    pieces: list[str] = []
    start = 0
    for end in range(1, len(ids) + 1):
        text = tok.decode(ids[start:end], skip_special_tokens=False)
        if not text.endswith("\ufffd") or end == len(ids):
            pieces.append(text)
            start = end
    return pieces


def describe(tok, sample: list[str], n_examples: int = 3) -> dict:
    """Vocabulary size, bytes per token on a sample and a few sample tokenizations (each token as text)."""
    encs = tok.encode_batch(sample, add_special_tokens=False) if sample else []
    n_bytes = sum(len(s.encode("utf-8")) for s in sample)
    n_tok = sum(len(e.ids) for e in encs)
    examples = []
    for s, e in list(zip(sample, encs, strict=True))[:n_examples]:
        examples.append({"text": s[:80], "tokens": readable_pieces(tok, e.ids[:24])})
    return {
        "vocab_size": tok.get_vocab_size(),
        "bytes_per_token": round(n_bytes / n_tok, 3) if n_tok else None,
        "examples": examples,
    }
