"""Tests of `tbptt_jax.data`: tokens, vocabularies and corpora.

The figures of the real corpora are those of the READMEs in the shared data
folder (see `conftest.shared_data`); each corpus is read once per module.
"""

import json
import re

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from tbptt_jax import data


def _write_set(folder, train, valid, test, names=("train.txt", "valid.txt", "test.txt")):
  folder.mkdir(parents=True, exist_ok=True)
  for name, text in zip(names, (train, valid, test), strict=True):
    (folder / name).write_text(text, encoding="utf-8")
  return folder


def _count(split, vocab, token):
  return int(np.sum(split == vocab.encode([token])[0]))


# Real corpora.


@pytest.fixture(scope="module")
def ptb(shared_data):
  return data.read_corpus(shared_data / "ptb", "word")


@pytest.fixture(scope="module")
def wikitext2(shared_data):
  return data.read_corpus(shared_data / "wikitext-2", "word")


@pytest.fixture(scope="module")
def shakespeare(shared_data):
  return data.read_corpus(shared_data / "tinyshakespeare", "char")


def test_ptb_has_the_standard_figures(ptb):
  splits = (ptb.train, ptb.valid, ptb.test)
  for split in splits:
    assert split.dtype == np.int32 and split.ndim == 1
  assert [len(s) for s in splits] == [929_589, 73_760, 82_430]
  assert len(ptb.vocab) == 10_000
  assert ptb.vocab.level == "word" and ptb.vocab.unk == data.UNK
  # One <eos> per line.
  assert [_count(s, ptb.vocab, data.EOS) for s in splits] == [42_068, 3_370, 3_761]
  assert [_count(s, ptb.vocab, data.UNK) for s in splits] == [45_020, 3_485, 4_794]


def test_ptb_vocabulary_covers_its_valid_and_test_text(ptb):
  """PTB's splits write "<unk>" where the word was rare: a token of the vocabulary, not unknown."""
  assert ptb.unknown == (0.0, 0.0, 0.0)


def test_ptb_ids_follow_train_frequency(ptb):
  counts = np.bincount(ptb.train, minlength=len(ptb.vocab))
  assert np.all(np.diff(counts) <= 0)
  assert counts.min() >= 1  # every type occurs in train: unk was not added
  assert ptb.vocab.tokens[:3] == ("the", data.UNK, data.EOS)


def test_ptb_decode_gives_the_tokens_of_the_file(ptb, shared_data):
  text = (shared_data / "ptb" / "ptb.valid.txt").read_text(encoding="utf-8")
  assert ptb.vocab.decode(ptb.valid) == data.tokenize(text, "word")


def test_wikitext2_has_the_standard_figures(wikitext2):
  splits = (wikitext2.train, wikitext2.valid, wikitext2.test)
  assert [len(s) for s in splits] == [2_088_628, 217_646, 245_569]
  assert len(wikitext2.vocab) == 33_278
  assert wikitext2.vocab.unk == data.UNK
  # Blank lines count: one <eos> per line, 36,718 / 3,760 / 4,358 lines.
  assert [_count(s, wikitext2.vocab, data.EOS) for s in splits] == [36_718, 3_760, 4_358]
  assert [_count(s, wikitext2.vocab, data.UNK) for s in splits] == [54_625, 11_718, 15_218]


def test_tinyshakespeare_char_level_is_cut_90_5_5_and_round_trips(shakespeare, shared_data):
  text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
  vocab = shakespeare.vocab
  assert len(vocab) == 65 and vocab.level == "char" and vocab.unk is None
  lengths = [len(shakespeare.train), len(shakespeare.valid), len(shakespeare.test)]
  assert sum(lengths) == 1_115_394 == len(text)
  assert lengths == [1_003_854, 55_770, 55_770]  # train is nanoGPT's first 90%
  ids = np.concatenate([shakespeare.train, shakespeare.valid, shakespeare.test])
  np.testing.assert_array_equal(vocab.encode(data.tokenize(text, "char")), ids)
  assert "".join(vocab.decode(ids)) == text


# Tokens.


def test_tokenize_word_level_counts_one_eos_per_line():
  eos = data.EOS
  assert data.tokenize("the cat\n\nsat \t on\r\n", "word") == [
    "the", "cat", eos, eos, "sat", "on", eos,
  ]  # fmt: skip
  assert data.tokenize("a b\nc", "word") == ["a", "b", eos, "c", eos]  # last line unterminated
  assert data.tokenize("\n", "word") == [eos]
  assert data.tokenize("\n\n", "word") == [eos, eos]
  assert data.tokenize("", "word") == []
  assert data.tokenize(" <unk> x \n", "word") == [data.UNK, "x", eos]


def test_tokenize_char_level_keeps_every_character():
  assert data.tokenize("ab \n\u00e9", "char") == ["a", "b", " ", "\n", "\u00e9"]
  assert data.tokenize("", "char") == []


def test_tokenize_rejects_a_bad_level_and_non_text():
  with pytest.raises(ValueError, match=r"tokenize: level must be one of \('word', 'char'\)"):
    data.tokenize("a b", "byte")
  with pytest.raises(ValueError, match="tokenize: text must be a str, got bytes"):
    data.tokenize(b"a b", "word")


# Vocabularies.


def test_build_vocabulary_orders_by_frequency_then_token():
  tokens = ["b", "a", "b", "c", "a", "b", "d"]
  vocab = data.build_vocabulary(tokens, "word")
  assert vocab.tokens == ("b", "a", "c", "d") and vocab.unk is None
  assert data.build_vocabulary(tokens[::-1], "word") == vocab  # independent of order
  with_unk = data.build_vocabulary(tokens, "word", unk="<unk>")
  assert with_unk.tokens == ("b", "a", "c", "d", "<unk>")  # absent unk comes last
  assert data.build_vocabulary(tokens, "word", unk="a").tokens == vocab.tokens


def test_encode_maps_unknown_tokens_to_unk():
  vocab = data.Vocabulary(("<unk>", "a", "b"), "word", "<unk>")
  np.testing.assert_array_equal(vocab.encode(["b", "zebra", "a", "yak"]), [2, 0, 1, 0])
  assert vocab.encode(["a"]).dtype == np.int32
  assert vocab.encode([]).shape == (0,)
  assert vocab.decode([2, 0, 1]) == ["b", "<unk>", "a"]
  assert vocab.decode(np.array([], np.int32)) == []


def test_encode_without_unk_names_the_first_unknown_token():
  vocab = data.Vocabulary(("a", "b"), "word")
  with pytest.raises(ValueError, match=r"encode: 3 of 5 tokens .* the first is 'x' at position 1"):
    vocab.encode(["a", "x", "b", "y", "x"])
  with pytest.raises(ValueError, match="encode: tokens must be a sequence of str"):
    vocab.encode("ab")


def test_decode_rejects_ids_out_of_range():
  vocab = data.Vocabulary(("a", "b"), "word")
  with pytest.raises(ValueError, match=r"decode: ids must be in \[0, 2\), got 2 at position 1"):
    vocab.decode([0, 2])
  with pytest.raises(ValueError, match=r"got -1 at position 0 \(2 ids out of range\)"):
    vocab.decode([-1, 1, 5])
  with pytest.raises(ValueError, match="decode: ids must be a 1-D array of integers"):
    vocab.decode([0.0, 1.0])


def test_vocabulary_checks_its_fields():
  with pytest.raises(ValueError, match="Vocabulary: tokens must be distinct, got 'a' more than"):
    data.Vocabulary(("a", "b", "a"), "word")
  with pytest.raises(ValueError, match="Vocabulary: unk must be None or one of the tokens"):
    data.Vocabulary(("a", "b"), "word", "<unk>")
  with pytest.raises(ValueError, match=r"Vocabulary: level must be one of \('word', 'char'\)"):
    data.Vocabulary(("a",), "words")
  with pytest.raises(ValueError, match="must be a single character, got 'ab' at position 1"):
    data.Vocabulary(("a", "ab"), "char")
  with pytest.raises(ValueError, match="at least one token"):
    data.Vocabulary((), "word")


def test_vocabulary_is_an_immutable_value():
  vocab = data.Vocabulary(["a", "b"], "word")
  assert vocab.tokens == ("a", "b") and len(vocab) == 2
  assert vocab == data.Vocabulary(("a", "b"), "word")
  assert vocab != data.Vocabulary(("b", "a"), "word")
  assert hash(vocab) == hash(data.Vocabulary(("a", "b"), "word"))
  assert repr(vocab) == "Vocabulary(level='word', size=2, unk=None)"
  with pytest.raises(AttributeError):
    vocab.unk = "a"


@settings(deadline=None, max_examples=50)
@given(text=st.text(min_size=1, max_size=60))
def test_char_vocabulary_round_trips_any_text(text):
  vocab = data.build_vocabulary(data.tokenize(text, "char"), "char")
  assert "".join(vocab.decode(vocab.encode(data.tokenize(text, "char")))) == text


def test_save_and_load_give_an_equal_vocabulary(tmp_path):
  path = tmp_path / "vocab.json"
  for vocab in (
    data.build_vocabulary(["z", "\u00e9t\u00e9", "<eos>", "z"], "word", unk=data.UNK),
    data.Vocabulary(tuple("\n ab\u00e9"), "char"),
  ):
    data.save_vocabulary(vocab, path)  # the second call overwrites the first file
    loaded = data.load_vocabulary(path)
    assert loaded == vocab and loaded.unk == vocab.unk and loaded.level == vocab.level
    np.testing.assert_array_equal(loaded.encode(vocab.tokens), np.arange(len(vocab)))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab.json"]  # no .tmp left over
  record = json.loads(path.read_text(encoding="utf-8"))
  assert record == {
    "format": "tbptt_jax.vocabulary",
    "version": 1,
    "level": "char",
    "unk": None,
    "tokens": ["\n", " ", "a", "b", "\u00e9"],
  }


def test_save_and_load_ptb_vocabulary(ptb, tmp_path):
  data.save_vocabulary(ptb.vocab, str(tmp_path / "ptb.json"))
  assert data.load_vocabulary(str(tmp_path / "ptb.json")) == ptb.vocab


_FORMAT = "tbptt_jax.vocabulary"


def _record(**changes):
  record = {"format": _FORMAT, "version": 1, "level": "word", "unk": "<unk>"}
  record["tokens"] = ["<unk>", "a"]
  record.update(changes)
  return record


@pytest.mark.parametrize(
  ("content", "message"),
  [
    (b"\xff\xfe{}", r"not a vocabulary file: not UTF-8 \(byte 0xff at offset 0\)"),
    (b'{"format": "tbptt_jax.vocabulary", ', r"not a vocabulary file: not JSON \(Expecting prop"),
    (b"", r"not a vocabulary file: not JSON \(Expecting value"),
    (json.dumps({"model": "gpt"}), r"not a tbptt_jax vocabulary file: expected \"format\""),
    (json.dumps(["a", "b"]), r"not a tbptt_jax vocabulary file: .* got a JSON list"),
    (json.dumps(_record(version=2)), r"version must be 1, got 2"),
    (json.dumps(_record(version=True)), r"version must be 1, got True"),
    (json.dumps(_record(tokens=["<unk>", "a", "a"])), r"tokens must be distinct, got 'a'"),
    (json.dumps(_record(unk="<oov>")), r"unk must be None or one of the tokens, got '<oov>'"),
    (json.dumps(_record(level="byte")), r"level must be one of \('word', 'char'\), got 'byte'"),
    (json.dumps(_record(tokens="<unk> a")), r"tokens must be a JSON list, got str"),
    (json.dumps({"format": _FORMAT, "version": 1}), r"the vocabulary lacks the key\(s\) level"),
  ],
)
def test_load_vocabulary_rejects_bad_files(tmp_path, content, message):
  path = tmp_path / "vocab.json"
  if isinstance(content, str):
    path.write_text(content, encoding="utf-8")
  else:
    path.write_bytes(content)
  with pytest.raises(ValueError, match=f"load_vocabulary: {re.escape(str(path))}: {message}"):
    data.load_vocabulary(path)


def test_load_vocabulary_names_a_missing_file(tmp_path):
  path = tmp_path / "nowhere.json"
  with pytest.raises(ValueError, match=f"load_vocabulary: {re.escape(str(path))}: no such file"):
    data.load_vocabulary(path)


# Corpora from small files.


def test_read_corpus_word_level(tmp_path):
  folder = _write_set(tmp_path / "c", "a b a\n\nc a\n", "a d\n", "b\n")
  corpus = data.read_corpus(folder)
  vocab = corpus.vocab
  # Train counts: a 3, <eos> 3, b 1, c 1; <unk> absent, so added last.
  assert vocab.tokens == ("<eos>", "a", "b", "c", "<unk>") and vocab.unk == data.UNK
  assert vocab.decode(corpus.train) == ["a", "b", "a", "<eos>", "<eos>", "c", "a", "<eos>"]
  assert vocab.decode(corpus.valid) == ["a", "<unk>", "<eos>"]  # d is not in train
  np.testing.assert_array_equal(corpus.test, [2, 0])
  assert all(s.dtype == np.int32 for s in corpus[:3])
  # Valid's d (1 of 3 tokens) is not in the vocabulary; test's tokens all are.
  assert corpus.unknown == (0.0, 1 / 3, 0.0)


def test_an_unk_written_in_the_text_is_not_counted_unknown(tmp_path):
  folder = _write_set(tmp_path / "c", "a <unk> b\n", "<unk> c\n", "x y a\n")
  corpus = data.read_corpus(folder)
  assert corpus.vocab.decode(corpus.valid) == ["<unk>", "<unk>", "<eos>"]  # c was not in train
  assert corpus.unknown == (0.0, 1 / 3, 2 / 4)


def test_read_corpus_recognises_each_layout_in_order(tmp_path):
  wiki = ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")
  folder = _write_set(tmp_path / "w", "x y\n", "x\n", "y\n", names=wiki)
  corpus = data.read_corpus(folder)
  assert corpus.vocab.decode(corpus.train) == ["x", "y", "<eos>"]
  _write_set(folder, "p\n", "p\n", "p\n", names=("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"))
  _write_set(folder, "t\n", "t\n", "t\n")
  corpus = data.read_corpus(folder)  # PTB names come first
  assert corpus.vocab.decode(corpus.train) == ["p", "<eos>"]
  (folder / "input.txt").write_text("ignored while a set is present\n", encoding="utf-8")
  assert data.read_corpus(folder).vocab == corpus.vocab


def test_read_corpus_cuts_a_single_input_file_90_5_5(tmp_path):
  folder = tmp_path / "single"
  folder.mkdir()
  text = "abcdefghi\n" * 20
  (folder / "input.txt").write_text(text, encoding="utf-8")
  (folder / "README.md").write_text("not read", encoding="utf-8")
  corpus = data.read_corpus(folder, "char")
  assert [len(corpus.train), len(corpus.valid), len(corpus.test)] == [180, 10, 10]
  ids = np.concatenate(corpus[:3])
  assert "".join(corpus.vocab.decode(ids)) == text  # contiguous, in order
  text = "x y\n" * 20  # 60 word-level tokens
  (folder / "input.txt").write_text(text, encoding="utf-8")
  words = data.read_corpus(folder, "word")
  assert [len(words.train), len(words.valid), len(words.test)] == [54, 3, 3]
  assert words.vocab.decode(np.concatenate(words[:3])) == data.tokenize(text, "word")


def test_read_corpus_single_file_too_short_to_cut(tmp_path):
  folder = tmp_path / "short"
  folder.mkdir()
  (folder / "input.txt").write_text("a b c\n", encoding="utf-8")
  with pytest.raises(ValueError, match=r"input.txt has 4 tokens, too few to cut 90/5/5 .* 3, 0, 1"):
    data.read_corpus(folder, "word")


def test_read_corpus_char_level_adds_unk_only_for_unseen_characters(tmp_path):
  seen = data.read_corpus(_write_set(tmp_path / "seen", "abca\n", "ab\n", "c"), "char")
  assert seen.vocab.unk is None and seen.vocab.tokens == ("a", "\n", "b", "c")
  unseen = data.read_corpus(_write_set(tmp_path / "unseen", "abca\n", "abz\n", "c"), "char")
  assert unseen.vocab.unk == "\ufffd" and unseen.vocab.tokens[-1] == "\ufffd"
  assert "".join(unseen.vocab.decode(unseen.valid)) == "ab\ufffd\n"


def test_read_corpus_encodes_with_a_given_vocabulary(tmp_path):
  folder = _write_set(tmp_path / "c", "a b\n", "b q\n", "a\n")
  vocab = data.Vocabulary(("<unk>", "<eos>", "b", "a"), "word", "<unk>")
  corpus = data.read_corpus(folder, "word", vocab=vocab)
  assert corpus.vocab is vocab
  np.testing.assert_array_equal(corpus.train, [3, 2, 1])
  np.testing.assert_array_equal(corpus.valid, [2, 0, 1])
  strict = data.Vocabulary(("<eos>", "a", "b"), "word")
  valid = re.escape(str(folder / "valid.txt"))
  with pytest.raises(ValueError, match=f"read_corpus: {valid}: .*1 of 3 .* the first is 'q'"):
    data.read_corpus(folder, "word", vocab=strict)


def test_read_corpus_rejects_a_vocabulary_of_the_wrong_level(tmp_path):
  folder = _write_set(tmp_path / "c", "ab\n", "a\n", "b\n")
  chars = data.read_corpus(folder, "char").vocab
  with pytest.raises(ValueError, match="read_corpus: vocab must have the level being read, 'word'"):
    data.read_corpus(folder, "word", vocab=chars)
  with pytest.raises(ValueError, match="read_corpus: vocab must be a Vocabulary or None"):
    data.read_corpus(folder, "char", vocab=list(chars.tokens))
  with pytest.raises(ValueError, match=r"read_corpus: level must be one of"):
    data.read_corpus(folder, "bpe")


def test_read_corpus_drops_a_byte_order_mark(tmp_path):
  folder = _write_set(tmp_path / "c", "\ufeffa\n", "a\n", "a\n")
  corpus = data.read_corpus(folder, "char")
  assert corpus.vocab.tokens == ("\n", "a")


# Corpus errors.


def test_read_corpus_missing_folder_or_a_file(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(ValueError, match=f"read_corpus: no such folder {re.escape(str(missing))}"):
    data.read_corpus(missing)
  file = tmp_path / "train.txt"
  file.write_text("a\n", encoding="utf-8")
  with pytest.raises(ValueError, match=f"read_corpus: {re.escape(str(file))} is a file"):
    data.read_corpus(file)


def test_read_corpus_partial_set_names_the_missing_file(tmp_path):
  folder = tmp_path / "c"
  folder.mkdir()
  (folder / "train.txt").write_text("a\n", encoding="utf-8")
  (folder / "test.txt").write_text("a\n", encoding="utf-8")
  missing = re.escape(str(folder / "valid.txt"))
  with pytest.raises(ValueError, match=f"read_corpus: {missing} is missing: .* but not valid.txt"):
    data.read_corpus(folder)


def test_read_corpus_without_recognised_files_lists_expected_and_found(tmp_path):
  folder = tmp_path / "c"
  folder.mkdir()
  for i in range(7):
    (folder / f"notes{i}.txt").write_text("a\n", encoding="utf-8")
  with pytest.raises(ValueError) as error:
    data.read_corpus(folder)
  message = str(error.value)
  assert message.startswith(f"read_corpus: {folder} holds no corpus: expected ")
  for name in ("ptb.train.txt", "valid.txt", "wiki.test.tokens", "input.txt"):
    assert name in message
  assert "notes0.txt, notes1.txt" in message and "(7 names in all)" in message
  assert "notes6.txt" not in message and "\n" not in message
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match="it holds nothing"):
    data.read_corpus(empty)


@pytest.mark.parametrize(
  ("text", "level", "message"),
  [
    ("", "word", "is empty; it needs text"),
    ("", "char", "is empty; it needs text"),
    (" \n\t\n", "word", r"is empty \(only whitespace\)"),
  ],
)
def test_read_corpus_rejects_an_empty_file(tmp_path, text, level, message):
  folder = _write_set(tmp_path / "c", "a\n", text, "a\n")
  valid = re.escape(str(folder / "valid.txt"))
  with pytest.raises(ValueError, match=f"read_corpus: {valid} {message}"):
    data.read_corpus(folder, level)


def test_read_corpus_accepts_a_whitespace_file_at_char_level(tmp_path):
  corpus = data.read_corpus(_write_set(tmp_path / "c", "a \n", " \n", "a"), "char")
  assert corpus.vocab.decode(corpus.valid) == [" ", "\n"]


def test_read_corpus_names_the_file_and_offset_of_bad_utf8(tmp_path):
  folder = _write_set(tmp_path / "c", "a\n", "a\n", "a\n")
  (folder / "test.txt").write_bytes("caf\u00e9 ok\n".encode() + b"bad \xe9t\xe9\n")
  test = re.escape(str(folder / "test.txt"))
  message = f"read_corpus: {test} is not UTF-8 text: byte 0xe9 at byte offset 13$"
  with pytest.raises(ValueError, match=message):
    data.read_corpus(folder)


def test_read_corpus_a_recognised_name_that_is_a_folder(tmp_path):
  folder = _write_set(tmp_path / "c", "a\n", "a\n", "a\n")
  (folder / "test.txt").unlink()
  (folder / "test.txt").mkdir()
  test = re.escape(str(folder / "test.txt"))
  with pytest.raises(ValueError, match=f"read_corpus: {test}: is a folder, not a file"):
    data.read_corpus(folder)
