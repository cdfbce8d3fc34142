"""Word- and character-level corpora for language modelling.

`read_corpus` reads a folder of text files into integer token arrays, one per
split, and a `Vocabulary` that maps tokens to ids and back. The vocabulary can
be saved and loaded (`save_vocabulary`, `load_vocabulary`), so that a model is
evaluated with the ids it was trained on. The library ships no corpus; it reads
any user's text files, laid out as the usual benchmarks are:

  ptb.train.txt, ptb.valid.txt, ptb.test.txt      Penn Treebank (Mikolov's)
  train.txt, valid.txt, test.txt                   pytorch/examples' layout
  wiki.train.tokens, wiki.valid.tokens, ...        the WikiText archives
  input.txt                                        one text (tiny shakespeare)

Word-level tokens are the whitespace-separated words of each line plus one
`<eos>` per line, as pytorch/examples' `word_language_model/data.py` and
TensorFlow's PTB reader count them; so the standard figures come out: PTB has
929,589 / 73,760 / 82,430 tokens and 10,000 types, WikiText-2 has 2,088,628 /
217,646 / 245,569 tokens and 33,278 types. Character-level tokens are the
characters, newlines included.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from tbptt_jax import _files

EOS = "<eos>"
UNK = "<unk>"
LEVELS = ("word", "char")

_FORMAT = "tbptt_jax.vocabulary"
_VERSION = 1
# Unicode's replacement character: the char-level unk, added only when valid or
# test hold a character that train does not.
_CHAR_UNK = "\ufffd"
_SPLITS = ("train", "valid", "test")
# Checked in this order; the first set with any file present is the corpus.
_FILE_SETS = (
  ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"),
  ("train.txt", "valid.txt", "test.txt"),
  ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
)
_SINGLE_FILE = "input.txt"
_SHOWN_NAMES = 5  # how many of a folder's names an error message lists


def _check_level(where: str, level: Any) -> str:
  if level not in LEVELS:
    raise ValueError(f"{where}: level must be one of {LEVELS}, got {level!r}")
  return level


def tokenize(text: str, level: str) -> list[str]:
  """Cuts a text into word- or character-level tokens.

  Word level: every line (the text split on "\\n"; the empty piece after a
  final newline is not a line) gives its whitespace-separated words and then
  one `EOS`, so a blank line gives just `EOS`. This is how pytorch/examples'
  `word_language_model/data.py` and TensorFlow's PTB reader count tokens.
  Character level: every character, newlines included, and no `EOS`.

  Args:
    text: the text.
    level: "word" or "char".

  Returns:
    The tokens, a list of strings.

  Example:
    >>> tokenize("the cat\\n\\nsat\\n", "word")
    ['the', 'cat', '<eos>', '<eos>', 'sat', '<eos>']
    >>> tokenize("ab\\n", "char")
    ['a', 'b', '\\n']
  """
  where = "tokenize"
  if not isinstance(text, str):
    raise ValueError(f"{where}: text must be a str, got {type(text).__name__}")
  if _check_level(where, level) == "char":
    return list(text)
  lines = text.split("\n")
  if lines[-1] == "":
    lines.pop()
  tokens = []
  for line in lines:
    tokens += line.split()
    tokens.append(EOS)
  return tokens


def _check_vocabulary(where: str, tokens: Sequence[Any], level: Any, unk: Any) -> None:
  _check_level(where, level)
  if not tokens:
    raise ValueError(f"{where}: tokens must hold at least one token, got none")
  for i, token in enumerate(tokens):
    if not isinstance(token, str) or not token or (level == "char" and len(token) != 1):
      expected = "a single character" if level == "char" else "a non-empty str"
      raise ValueError(
        f"{where}: every token of a {level}-level vocabulary must be {expected}, "
        f"got {token!r} at position {i}"
      )
  if len(set(tokens)) != len(tokens):
    duplicate = next(t for t, n in collections.Counter(tokens).items() if n > 1)
    raise ValueError(f"{where}: tokens must be distinct, got {duplicate!r} more than once")
  if unk is not None and (not isinstance(unk, str) or unk not in set(tokens)):
    raise ValueError(f"{where}: unk must be None or one of the tokens, got {unk!r}")


@dataclasses.dataclass(frozen=True, repr=False)
class Vocabulary:
  """An immutable map between tokens and integer ids: token `tokens[i]` has id i.

  `len(vocab)` is the number of types. Vocabularies compare equal when their
  tokens, level and unk are equal, and are hashable.

  Attributes:
    tokens: the types in id order, distinct.
    level: "word" or "char" (char-level tokens are single characters).
    unk: the token that stands for any token not in the vocabulary, or None
      when `encode` should reject such tokens.

  Example:
    >>> vocab = Vocabulary(("<unk>", "a", "b"), "word", "<unk>")
    >>> vocab.encode(["b", "a", "zebra"])
    array([2, 1, 0], dtype=int32)
    >>> vocab.decode([1, 2])
    ['a', 'b']
  """

  tokens: tuple[str, ...]
  level: str
  unk: str | None = None
  _ids: dict[str, int] = dataclasses.field(init=False, compare=False)

  def __post_init__(self):
    if isinstance(self.tokens, str):
      raise ValueError("Vocabulary: tokens must be a sequence of str, got a str")
    tokens = tuple(self.tokens)
    _check_vocabulary("Vocabulary", tokens, self.level, self.unk)
    # The instance is frozen; these are its construction, not a mutation.
    object.__setattr__(self, "tokens", tokens)
    object.__setattr__(self, "_ids", {token: i for i, token in enumerate(tokens)})

  def __len__(self) -> int:
    return len(self.tokens)

  def __repr__(self) -> str:
    return f"Vocabulary(level={self.level!r}, size={len(self)}, unk={self.unk!r})"

  def encode(self, tokens: Sequence[str]) -> np.ndarray:
    """Maps tokens to their ids.

    A token not in the vocabulary maps to the id of `unk`; without an unk
    token it is an error.

    Args:
      tokens: a sequence of tokens, e.g. from `tokenize` (not a str).

    Returns:
      A 1-D int32 NumPy array of ids, one per token.
    """
    where = "Vocabulary.encode"
    if isinstance(tokens, str):
      raise ValueError(f"{where}: tokens must be a sequence of str (see tokenize), got a str")
    tokens = list(tokens)
    try:
      # Fast path: every token is known, so no per-token default is needed.
      return np.fromiter(map(self._ids.__getitem__, tokens), np.int32, count=len(tokens))
    except KeyError:
      pass
    unk_id = -1 if self.unk is None else self._ids[self.unk]
    ids = np.fromiter((self._ids.get(t, unk_id) for t in tokens), np.int32, count=len(tokens))
    if self.unk is None:
      unknown = np.flatnonzero(ids < 0)
      first = int(unknown[0])
      raise ValueError(
        f"{where}: {len(unknown)} of {len(tokens)} tokens are not in the vocabulary, which has "
        f"no unk token; the first is {tokens[first]!r} at position {first}"
      )
    return ids

  def decode(self, ids: Any) -> list[str]:
    """Maps ids to their tokens.

    Args:
      ids: a 1-D array or sequence of integers in [0, len(vocab)).

    Returns:
      The tokens, a list of strings; `"".join` them at char level.
    """
    where = "Vocabulary.decode"
    ids = np.asarray(ids)
    if ids.size == 0 and ids.ndim == 1:
      return []
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(
        f"{where}: ids must be a 1-D array of integers, got an array of shape {ids.shape} "
        f"and dtype {ids.dtype}"
      )
    bad = np.flatnonzero((ids < 0) | (ids >= len(self.tokens)))
    if bad.size:
      raise ValueError(
        f"{where}: ids must be in [0, {len(self.tokens)}), got {ids[bad[0]]} at position "
        f"{bad[0]} ({bad.size} ids out of range)"
      )
    return [self.tokens[i] for i in ids.tolist()]


def build_vocabulary(tokens: Sequence[str], level: str, *, unk: str | None = None) -> Vocabulary:
  """Builds the vocabulary of a token sequence, frequent tokens first.

  Types are sorted by descending count, ties broken by the token string, so the
  ids do not depend on the order of the text and frequent tokens get small ids.
  `unk`, when given and absent from `tokens`, is added with count 0 (last).
  `read_corpus` passes `unk=UNK` at word level.

  Args:
    tokens: the tokens, e.g. `tokenize(text, level)` of the training text.
    level: "word" or "char".
    unk: the token that stands for unknown tokens, or None for none.

  Returns:
    A `Vocabulary`.

  Example:
    >>> build_vocabulary(["b", "a", "b", "c", "a", "b"], "word", unk="<unk>").tokens
    ('b', 'a', 'c', '<unk>')
  """
  where = "build_vocabulary"
  _check_level(where, level)
  if isinstance(tokens, str):
    raise ValueError(f"{where}: tokens must be a sequence of str (see tokenize), got a str")
  counts = collections.Counter(tokens)
  if unk is not None:
    counts[unk] += 0  # adds unk with count 0 when absent
  types = sorted(counts, key=lambda token: (-counts[token], token))
  return Vocabulary(tuple(types), level, unk)


def save_vocabulary(vocab: Vocabulary, path: str | os.PathLike[str]) -> None:
  """Writes a vocabulary to a JSON file, atomically.

  The file is `{"format": "tbptt_jax.vocabulary", "version": 1, "level": ...,
  "unk": ..., "tokens": [...]}` in UTF-8. It is written to `path + ".tmp"`,
  flushed to disk and then renamed over `path`, so a crash never leaves a
  half-written vocabulary at `path`.

  Args:
    vocab: the vocabulary.
    path: the file to write.

  Example:
    >>> save_vocabulary(corpus.vocab, "run/vocab.json")  # doctest: +SKIP
  """
  if not isinstance(vocab, Vocabulary):
    raise ValueError(f"save_vocabulary: vocab must be a Vocabulary, got {type(vocab).__name__}")
  path = os.fspath(path)
  record = {
    "format": _FORMAT,
    "version": _VERSION,
    "level": vocab.level,
    "unk": vocab.unk,
    "tokens": list(vocab.tokens),
  }
  _files.atomic_write(path, json.dumps(record, ensure_ascii=False, indent=1) + "\n")


def load_vocabulary(path: str | os.PathLike[str]) -> Vocabulary:
  """Reads a vocabulary written by `save_vocabulary`.

  Args:
    path: the JSON file.

  Returns:
    The `Vocabulary`, equal to the one saved.

  Raises:
    ValueError: naming the file when it is missing, not UTF-8 JSON, not a
      tbptt_jax vocabulary, of another version, or inconsistent (duplicate
      tokens, an unk that is not a token, an unknown level).

  Example:
    >>> vocab = load_vocabulary("run/vocab.json")  # doctest: +SKIP
    >>> corpus = read_corpus("data/ptb", vocab.level, vocab=vocab)  # doctest: +SKIP
  """
  where = f"load_vocabulary: {os.fspath(path)}"
  data = _read_bytes(where, Path(path))
  try:
    record = json.loads(data.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise ValueError(
      f"{where}: not a vocabulary file: not UTF-8 (byte {data[e.start]:#04x} at offset {e.start})"
    ) from None
  except json.JSONDecodeError as e:
    raise ValueError(
      f"{where}: not a vocabulary file: not JSON ({e.msg} at line {e.lineno} column {e.colno})"
    ) from None
  if not isinstance(record, dict):
    raise ValueError(
      f"{where}: not a tbptt_jax vocabulary file: expected a JSON object, got a JSON "
      f"{type(record).__name__}"
    )
  if record.get("format") != _FORMAT:
    raise ValueError(
      f'{where}: not a tbptt_jax vocabulary file: expected "format": "{_FORMAT}", '
      f"got {record.get('format')!r}"
    )
  version = record.get("version")
  if isinstance(version, bool) or version != _VERSION:
    raise ValueError(f"{where}: version must be {_VERSION}, got {version!r}")
  missing = [key for key in ("level", "unk", "tokens") if key not in record]
  if missing:
    raise ValueError(f"{where}: the vocabulary lacks the key(s) {', '.join(missing)}")
  tokens, level, unk = record["tokens"], record["level"], record["unk"]
  if not isinstance(tokens, list):
    raise ValueError(f"{where}: tokens must be a JSON list, got {type(tokens).__name__}")
  _check_vocabulary(where, tokens, level, unk)
  return Vocabulary(tuple(tokens), level, unk)


class Corpus(NamedTuple):
  """The three splits of a corpus as token ids, and their vocabulary."""

  train: np.ndarray  # shape=[n_train], int32
  valid: np.ndarray  # shape=[n_valid], int32
  test: np.ndarray  # shape=[n_test], int32
  vocab: Vocabulary
  # (train, valid, test): the fraction of each split's tokens that the vocabulary does not hold
  # as written, so encoded as its unk. An unk written in the text (PTB's "<unk>") is a token of
  # the vocabulary and is not counted: this is what the vocabulary fails to cover.
  unknown: tuple[float, float, float] = (0.0, 0.0, 0.0)


def _read_bytes(where: str, path: Path) -> bytes:
  try:
    return path.read_bytes()
  except FileNotFoundError:
    raise ValueError(f"{where}: no such file") from None
  except IsADirectoryError:
    raise ValueError(f"{where}: is a folder, not a file") from None
  except OSError as e:
    raise ValueError(f"{where}: cannot be read ({e.strerror})") from None


def _read_text(where: str, path: Path, level: str) -> str:
  data = _read_bytes(f"{where}: {path}", path)
  try:
    # From bytes, not a text-mode file: the error's offset is then the file's.
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(
      f"{where}: {path} is not UTF-8 text: byte {data[e.start]:#04x} at byte offset {e.start}"
    ) from None
  text = text.removeprefix("\ufeff")  # a byte-order mark, as some editors write, is no text
  if not text or (level == "word" and text.isspace()):
    raise ValueError(
      f"{where}: {path} is empty" + (" (only whitespace)" if text else "") + "; it needs text"
    )
  return text


def _find_files(where: str, folder: Path) -> tuple[Path, ...]:
  """The folder's (train, valid, test) files, or its single `input.txt`."""
  for names in _FILE_SETS:
    present = [(folder / name).exists() for name in names]
    if any(present):
      if not all(present):
        found = [name for name, p in zip(names, present, strict=True) if p]
        missing = [name for name, p in zip(names, present, strict=True) if not p]
        raise ValueError(
          f"{where}: {folder / missing[0]} is missing: {folder} has {', '.join(found)} but not "
          f"{', '.join(missing)} (a corpus needs all of {', '.join(names)})"
        )
      return tuple(folder / name for name in names)
  if (folder / _SINGLE_FILE).exists():
    return (folder / _SINGLE_FILE,)
  listed = sorted(p.name for p in folder.iterdir())
  shown = ", ".join(listed[:_SHOWN_NAMES]) or "nothing"
  if len(listed) > _SHOWN_NAMES:
    shown += f", ... ({len(listed)} names in all)"
  expected = "; ".join("/".join(names) for names in _FILE_SETS)
  raise ValueError(
    f"{where}: {folder} holds no corpus: expected {expected}; or a single {_SINGLE_FILE}; "
    f"it holds {shown}"
  )


def read_corpus(
  folder: str | os.PathLike[str], level: str = "word", *, vocab: Vocabulary | None = None
) -> Corpus:
  """Reads a corpus from a folder of UTF-8 text files.

  The folder holds one of these sets of files, looked for in this order:
  `ptb.{train,valid,test}.txt` (Penn Treebank), `{train,valid,test}.txt`
  (pytorch/examples' layout, e.g. its WikiText-2) or
  `wiki.{train,valid,test}.tokens` (the WikiText archives). A set with a file
  missing is an error. Without any set, a single `input.txt` (tiny-shakespeare
  style) is read whole and its tokens are cut contiguously into the first 90%
  for train, the next 5% for valid and the last 5% for test; the train split is
  nanoGPT's (its valid is our valid and test together).

  Files are decoded as UTF-8 with no newline translation (a "\\r" stays a
  character at char level and is whitespace at word level); a leading
  byte-order mark is dropped. See `tokenize` for the tokens of each level.

  Without `vocab`, the vocabulary is built from the train split alone
  (`build_vocabulary`). At word level its unk token is always `UNK`, added when
  train lacks it (PTB and WikiText-2 have it, so they keep 10,000 and 33,278
  types). At char level it has no unk token unless valid or test hold a
  character that train does not; then U+FFFD ("\\ufffd", the replacement
  character) is added as the unk token. With `vocab` (e.g. loaded with a
  checkpoint), all three splits are encoded with it; a token it lacks maps to
  its unk, or is an error if it has none.

  Args:
    folder: the folder of text files.
    level: "word" or "char".
    vocab: an optional `Vocabulary` of the same level to encode with.

  Returns:
    A `Corpus` of int32 arrays `train`, `valid`, `test`, the `vocab`, and the
    fraction of each split's tokens the vocabulary does not hold (`unknown`).

  Example:
    >>> corpus = read_corpus("data/ptb")  # doctest: +SKIP
    >>> len(corpus.vocab), corpus.train.shape  # doctest: +SKIP
    (10000, (929589,))
  """
  where = "read_corpus"
  _check_level(where, level)
  _check_vocab_argument(where, vocab, level)
  folder = Path(folder)
  if not folder.exists():
    raise ValueError(f"{where}: no such folder {folder}")
  if not folder.is_dir():
    raise ValueError(f"{where}: {folder} is a file; folder must be a folder of text files")
  splits, sources = _read_splits(where, _find_files(where, folder), level)
  if vocab is None:
    vocab = _train_vocabulary(splits, level)
  arrays = []
  for tokens, source in zip(splits, sources, strict=True):
    try:
      arrays.append(vocab.encode(tokens))
    except ValueError as e:
      raise ValueError(f"{where}: {source}: {e}") from None
  train, valid, test = arrays
  known = set(vocab.tokens)
  unknown = [sum(t not in known for t in tokens) / max(1, len(tokens)) for tokens in splits]
  return Corpus(train, valid, test, vocab, (unknown[0], unknown[1], unknown[2]))


def _check_vocab_argument(where: str, vocab: Any, level: str) -> None:
  if vocab is None:
    return
  if not isinstance(vocab, Vocabulary):
    raise ValueError(f"{where}: vocab must be a Vocabulary or None, got {type(vocab).__name__}")
  if vocab.level != level:
    raise ValueError(
      f"{where}: vocab must have the level being read, {level!r}, got a vocabulary of "
      f"level {vocab.level!r}"
    )


def _read_splits(
  where: str, paths: tuple[Path, ...], level: str
) -> tuple[list[list[str]], list[str]]:
  """The tokens of train, valid and test, and where each comes from (for error messages)."""
  if len(paths) == len(_SPLITS):
    splits = [tokenize(_read_text(where, path, level), level) for path in paths]
    return splits, [str(path) for path in paths]
  (path,) = paths
  tokens = tokenize(_read_text(where, path, level), level)
  n = len(tokens)
  # Integer cut points: no float rounding, and the train cut is nanoGPT's int(0.9 n).
  train_end, valid_end = n * 9 // 10, n * 19 // 20
  splits = [tokens[:train_end], tokens[train_end:valid_end], tokens[valid_end:]]
  if not all(splits):
    raise ValueError(
      f"{where}: {path} has {n} tokens, too few to cut 90/5/5 into non-empty train, valid and "
      f"test splits (they would have {', '.join(str(len(s)) for s in splits)})"
    )
  return splits, [f"{path} ({split} split)" for split in _SPLITS]


def _train_vocabulary(splits: list[list[str]], level: str) -> Vocabulary:
  """The vocabulary of the train split, with the unk token `read_corpus` describes."""
  unk: str | None = UNK
  if level == "char":
    unseen = (set(splits[1]) | set(splits[2])) - set(splits[0])
    unk = _CHAR_UNK if unseen else None
  return build_vocabulary(splits[0], level, unk=unk)
