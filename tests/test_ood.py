"""OOD and in-distribution loaders on fixture files written here in the datasets' formats."""
import json

import pytest
import torch

from regdrop_fast.sparse import (hans_accuracy, load_fever, load_hans, load_mnli, load_paws,
                                 load_qqp, mnli_to_hans)
from regdrop_fast.sparse.ood import FEVER_LABELS, HANS_LABELS, MNLI_LABELS

HANS_HEADER = ["gold_label", "sentence1_binary_parse", "sentence2_binary_parse",
               "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "pairID",
               "heuristic", "subcase", "template"]
MNLI_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
               "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
               "sentence2", "label1", "label2", "label3", "label4", "label5", "gold_label"]


def _tsv(path, header, rows):
    path.write_text("\n".join("\t".join(r) for r in [header] + rows) + "\n", encoding="utf-8")
    return str(path)


def test_hans(tmp_path):
    rows = [
        ["non-entailment", "( ( The doctor ) ( saw ( the lawyer ) ) )", "( ( The lawyer ) ( saw "
         "( the doctor ) ) )", "(ROOT (S (NP (DT The) (NN doctor))))", "(ROOT (S))",
         "The doctor saw the lawyer .", "The lawyer saw the doctor .", "ex0",
         "lexical_overlap", "ln_subject/object_swap", "temp1"],
        ["entailment", "( a )", "( b )", "(ROOT a)", "(ROOT b)", "The actor and the doctor ran .",
         "The doctor ran .", "ex1", "subsequence", "se_conjunction", "temp22"],
        ["non-entailment", "( a )", "( b )", "(ROOT a)", "(ROOT b)", "If the judge slept , "
         "the tourist waited .", "The judge slept .", "ex2", "constituent", "cn_embedded_under_if",
         "temp40"],
    ]
    examples = load_hans(_tsv(tmp_path / "heuristics_evaluation_set.txt", HANS_HEADER, rows))
    assert [e.label for e in examples] == [1, 0, 1]
    assert HANS_LABELS[examples[1].label] == "entailment"
    assert examples[0].text_a == "The doctor saw the lawyer ." and examples[0].guid == "ex0"
    assert examples[2].meta == {"heuristic": "constituent", "subcase": "cn_embedded_under_if",
                                "template": "temp40"}
    # MNLI predictions: contradiction, entailment, neutral -> non-ent, ent, non-ent
    mnli_preds = torch.tensor([MNLI_LABELS.index(x) for x in
                               ("contradiction", "entailment", "neutral")])
    assert mnli_to_hans(mnli_preds).tolist() == [1, 0, 1]
    acc = hans_accuracy(mnli_preds, examples)
    assert acc["all"] == 1.0 and acc[("non-entailment", "constituent")] == 1.0
    wrong = hans_accuracy(torch.tensor([MNLI_LABELS.index("entailment")] * 3), examples)
    assert wrong["all"] == pytest.approx(1 / 3) and wrong["non-entailment"] == 0.0


def test_mnli_dev_and_test_splits(tmp_path):
    rows = [["0", "31193", "31193n", "government", "( a )", "( b )", "(ROOT a)", "(ROOT b)",
             "Conceptually cream skimming has two basic dimensions .",
             "Product and geography are what make cream skimming work . ", "neutral", "neutral",
             "contradiction", "neutral", "neutral", "neutral"],
            ["1", "101457", "101457e", "telephone", "( a )", "( b )", "(ROOT a)", "(ROOT b)",
             "you know during the season \"and i guess\"", "You lose the things .",
             "entailment", "entailment", "entailment", "entailment", "entailment",
             "entailment"]]
    dev = load_mnli(_tsv(tmp_path / "dev_matched.tsv", MNLI_HEADER, rows))
    assert [MNLI_LABELS[e.label] for e in dev] == ["neutral", "entailment"]
    assert dev[1].text_a == 'you know during the season "and i guess"'  # quotes kept verbatim
    assert dev[0].meta == {"genre": "government"}
    test_header = MNLI_HEADER[:10]
    test = load_mnli(_tsv(tmp_path / "test_matched.tsv", test_header, [r[:10] for r in rows]))
    assert [e.label for e in test] == [None, None]


def test_qqp_and_paws(tmp_path):
    qqp = load_qqp(_tsv(tmp_path / "dev.tsv",
                        ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                        [["201359", "303345", "303346", "Why are African-Americans so "
                          "beautiful?", "Why are hispanics so beautiful?", "0"],
                         ["263843", "69383", "380476", "I want to pursue PhD in Computer "
                          "Science?", "I handle social media?", "1"]]))
    assert [e.label for e in qqp] == [0, 1] and qqp[0].guid == "201359"
    paws = load_paws(_tsv(tmp_path / "dev_and_test.tsv", ["id", "sentence1", "sentence2", "label"],
                          [["1", "b'What is the best way to learn ?'",
                            "b'What is the way to learn best ?'", "0"],
                           ["2", "In Paris, in October 1560, he met.",
                            "In October 1560, he met in Paris.", "1"]]))
    assert [e.label for e in paws] == [0, 1]
    assert paws[0].text_a == "What is the best way to learn ?"  # PAWS-QQP bytes literal
    assert paws[1].text_b == "In October 1560, he met in Paris."


def test_fever_symmetric_and_train_formats(tmp_path):
    symmetric = tmp_path / "fever_symmetric_test.jsonl"
    symmetric.write_text("\n".join(json.dumps(r) for r in [
        {"id": "113501", "label": "SUPPORTS", "claim": "Nikolaj Coster-Waldau worked with Fox.",
         "evidence_sentence": "He then played Detective John Amsterdam in Fox's New Amsterdam."},
        {"id": "113502", "label": "REFUTES", "claim": "Nikolaj did not work with Fox.",
         "evidence_sentence": "He then played Detective John Amsterdam in Fox's New Amsterdam."},
    ]) + "\n", encoding="utf-8")
    examples = load_fever(str(symmetric))
    assert [FEVER_LABELS[e.label] for e in examples] == ["SUPPORTS", "REFUTES"]
    assert examples[1].text_a == "Nikolaj did not work with Fox." and examples[1].guid == "113502"
    train = tmp_path / "fever.train.jsonl"
    train.write_text(json.dumps({"id": 7, "claim": "c", "evidence": "e",
                                 "gold_label": "NOT ENOUGH INFO"}) + "\n\n", encoding="utf-8")
    (ex,) = load_fever(str(train))
    assert (ex.text_a, ex.text_b, FEVER_LABELS[ex.label], ex.guid) == ("c", "e",
                                                                      "NOT ENOUGH INFO", "7")


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="existing file"):
        load_hans(str(tmp_path / "missing.txt"))
    bad_label = _tsv(tmp_path / "h.txt", HANS_HEADER,
                     [["contradiction"] + ["x"] * (len(HANS_HEADER) - 1)])
    with pytest.raises(ValueError, match=r"h.txt:2: label 'contradiction' is not one of"):
        load_hans(bad_label)
    with pytest.raises(ValueError, match="missing columns"):
        load_paws(_tsv(tmp_path / "p.tsv", ["id", "s1", "s2", "label"], [["1", "a", "b", "0"]]))
    broken = tmp_path / "f.jsonl"
    broken.write_text('{"claim": "c"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="needs 'claim' and 'evidence'"):
        load_fever(str(broken))
