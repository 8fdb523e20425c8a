"""The offline three-domain character corpus: vocabulary, determinism, labels, batches."""
import pytest
import torch
from hypothesis import given, strategies as st

from tutorial_moe.experiments.corpus import (
    CHAR_CLASSES, DOMAINS, VOCAB, VOCAB_SIZE, arithmetic_text, build_corpus, char_classes, code_text, decode,
    encode, eval_windows, prose_text, sample_batch,
)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(chars_per_domain=3000, seed=0)


def test_vocabulary_round_trips_and_folds_unknown_characters():
    assert VOCAB_SIZE == 96 and len(set(VOCAB)) == 96
    assert decode(encode(VOCAB)) == VOCAB
    assert decode(encode("caf\u00e9 \u2019x\u2019\tend")) == "caf? 'x'    end"


def test_decode_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="96"):
        decode([3, 96])
    with pytest.raises(TypeError, match="text must be a str"):
        encode(b"bytes")


def test_char_classes_of_known_characters():
    got = char_classes(encode("aZ7 \n+"))
    assert [CHAR_CLASSES[i] for i in got] == ["lower", "upper", "digit", "space", "newline", "punct"]


@given(st.integers(0, 10_000), st.integers(1, 500))
def test_every_arithmetic_line_is_a_true_equation(seed, n):
    text = arithmetic_text(n, seed=seed)
    assert len(text) >= n
    for line in text.splitlines():
        lhs, rhs = line.split("=")
        assert eval(lhs) == int(rhs), line  # the oracle: Python's own arithmetic


def test_domain_texts_come_from_this_install():
    prose, code = prose_text(), code_text()
    assert len(prose) > 100_000 and "the" in prose and "\n   " not in prose
    assert "def " in code and "import " in code
    with pytest.raises(ValueError, match="modules"):
        code_text(modules=("no_such_module_xyz",))


def test_corpus_is_deterministic_and_labels_every_character(corpus):
    again = build_corpus(chars_per_domain=3000, seed=0)
    assert torch.equal(corpus.train.tokens, again.train.tokens) and torch.equal(corpus.val.tokens, again.val.tokens)
    other = build_corpus(chars_per_domain=3000, seed=1)
    assert not torch.equal(corpus.train.tokens, other.train.tokens)
    for split in (corpus.train, corpus.val):
        assert split.tokens.shape == split.domains.shape
        for d, (s, e) in enumerate(split.spans):
            assert (split.domains[s:e] == d).all()
        assert split.spans[-1][1] == len(split)
    # 10 % of each domain is held out, and the two parts together are the domain's text.
    for d in range(len(DOMAINS)):
        n_train = corpus.train.spans[d][1] - corpus.train.spans[d][0]
        n_val = corpus.val.spans[d][1] - corpus.val.spans[d][0]
        assert n_train + n_val == 3000 and n_val == 300


def test_math_domain_text_is_arithmetic(corpus):
    text = corpus.train.text(2, max_chars=200)
    assert set(text) <= set("0123456789+-*=\n")


def test_sample_batch_shapes_shift_and_single_domain_rows(corpus):
    g = torch.Generator().manual_seed(0)
    x, y, d = sample_batch(corpus.train, 16, 20, generator=g)
    assert x.shape == y.shape == d.shape == (16, 20) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert (d == d[:, :1]).all()
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(sample_batch(corpus.train, 16, 20, generator=g2)[0], x)


def test_domain_weights_choose_the_domains(corpus):
    _, _, d = sample_batch(corpus.train, 50, 10, domain_weights=[0, 0, 1])
    assert (d == 2).all()
    with pytest.raises(ValueError, match="domain_weights"):
        sample_batch(corpus.train, 4, 10, domain_weights=[1, -1, 0])
    with pytest.raises(ValueError, match="domain_weights"):
        sample_batch(corpus.train, 4, 10, domain_weights=[1, 1])
    with pytest.raises(ValueError, match="context=5000"):
        sample_batch(corpus.train, 4, 5000)


def test_eval_windows_are_fixed_and_non_overlapping(corpus):
    x, y, d = eval_windows(corpus.val, 32, max_windows=3)
    assert x.shape == (9, 32)
    for dom in range(3):
        rows = x[d[:, 0] == dom]
        s = corpus.val.spans[dom][0]
        assert torch.equal(rows.flatten(), corpus.val.tokens[s:s + 96])
    x1, _, d1 = eval_windows(corpus.val, 32, domain=1)
    # 300 validation characters hold 9 windows of 32 (+1 for the last target).
    assert (d1 == 1).all() and len(x1) == 9


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="val_fraction"):
        build_corpus(1000, val_fraction=0.7)
    with pytest.raises(ValueError, match="chars_per_domain"):
        build_corpus(10)
    with pytest.raises(TypeError, match="batch_size"):
        sample_batch(build_corpus(1000).train, 2.0, 8)


def test_check_arithmetic_scores_complete_lines():
    from tutorial_moe.experiments.corpus import check_arithmetic

    text = "3=4\n12+7=19\n5*6=31\n9-12=-3\nhello\n7*7=4"
    assert check_arithmetic(text) == {"lines": 4, "well_formed": 3, "correct": 2}
    r = check_arithmetic(arithmetic_text(500, seed=4) + "x")  # real arithmetic: every line true
    assert r["correct"] == r["well_formed"] == r["lines"] > 20
    with pytest.raises(TypeError, match="text must be a str"):
        check_arithmetic(None)


def test_code_comes_from_the_standard_library_even_if_a_local_file_shadows_a_module(tmp_path, monkeypatch):
    (tmp_path / "bisect.py").write_text("print('not the standard library')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    text = code_text(modules=("bisect",))
    assert "not the standard library" not in text and "def insort" in text


def test_build_corpus_bounds_the_arithmetic_operands():
    import re

    from tutorial_moe.experiments.corpus import build_corpus

    corpus = build_corpus(chars_per_domain=2000, seed=0, max_operand=5)
    lines = corpus.train.text(2, max_chars=2000).split("\n")[1:-1]
    operands = [int(x) for line in lines for x in re.match(r"(\d+)[+*-](\d+)=", line).groups()]
    assert operands and max(operands) <= 5 and "operands 0..5" in corpus.info
