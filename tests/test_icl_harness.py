"""The Hugging Face ICL harness end to end on a tiny randomly initialized GPT-2 and a local word-level tokenizer."""

import json
import subprocess
import sys

import pytest
import torch

from ratelab.icl import (
    PromptTemplate,
    TextDataset,
    Verbalizer,
    build_prompt,
    evaluate_regimes,
    label_log_probs,
    label_log_probs_ref,
    load_causal_lm,
    load_text_classification,
    plan_icl,
    run_icl,
    summarize,
)

transformers = pytest.importorskip("transformers", reason="the ICL harness needs the optional transformers package")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ("[UNK] [PAD] Review : Sentiment great bad good not very film dull fun boring movie plot the a was and "
         "acting story long short").split()
TEMPLATE = PromptTemplate(q_prefix="Review: ", a_prefix="Sentiment:")


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tk.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(WORDS), n_positions=160, bos_token_id=0,
                     eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # sharpen the random model so label probabilities are far from uniform
        model.lm_head.weight.mul_(40.0)
    d = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(d)
    _tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def lm(lm_dir):
    return load_causal_lm(lm_dir)


PROMPTS = [
    "Review: fun film\nSentiment:",
    "Review: dull\nSentiment: bad\n\nReview: the boring movie plot was long\nSentiment:",
    "Review: film\nSentiment:",
    "Review: great acting\nSentiment: good\n\nReview: short story\nSentiment: bad\n\nReview: a film\nSentiment:",
    "Review: the story\nSentiment:",
]


def _manual(model, tok, prompt, word_ids):
    """log p(word | prompt) from a single unpadded forward over prompt + word (teacher forcing)."""
    p = tok(prompt)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + word_ids])).logits[0].double().log_softmax(-1)
    return sum(float(logits[len(p) - 1 + j, t]) for j, t in enumerate(word_ids))


def test_single_token_probs_equal_next_token_softmax(lm):
    model, tok = lm
    v = Verbalizer(("good", "bad"))
    lp = label_log_probs(model, tok, PROMPTS, v, batch_size=2)
    ids = [tok.convert_tokens_to_ids(w) for w in v.words]
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            last = model(input_ids=torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1].double()
        want = torch.softmax(last[ids], 0)  # restricted to the label tokens, renormalized
        assert torch.allclose(torch.softmax(lp[i], 0), want, atol=1e-6)
        assert torch.allclose(lp[i], last.log_softmax(0)[ids], atol=1e-5)
    assert (torch.softmax(lp, 1).max(1).values > 0.6).any()  # a non-trivial distribution is being compared


def test_multi_token_words_use_the_whole_sequence(lm):
    model, tok = lm
    v = Verbalizer(("good", "not good", "very very bad"))
    lp = label_log_probs(model, tok, PROMPTS, v, batch_size=4)
    word_ids = [tok(v.continuation(k), add_special_tokens=False)["input_ids"] for k in range(3)]
    assert [len(w) for w in word_ids] == [1, 2, 3]
    for i, prompt in enumerate(PROMPTS):
        want = torch.tensor([_manual(model, tok, prompt, w) for w in word_ids], dtype=torch.float64)
        assert torch.allclose(lp[i], want, atol=1e-5)
    # the first token alone would give a different answer: the later tokens really count
    first_only = label_log_probs(model, tok, PROMPTS, Verbalizer(("good", "not", "very")))
    assert not torch.allclose(torch.softmax(lp, 1), torch.softmax(first_only, 1), atol=1e-3)


@pytest.mark.parametrize("words", [("good", "bad"), ("good", "not good")])
@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_equals_one_at_a_time(lm, words, side):
    model, tok = lm
    v = Verbalizer(words)
    batched = label_log_probs(model, tok, PROMPTS, v, batch_size=4, padding_side=side)
    single = label_log_probs(model, tok, PROMPTS, v, batch_size=1)
    ref = label_log_probs_ref(model, tok, PROMPTS, v)
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(batched, ref, atol=1e-5)


def _dataset(n, seed, name="mem"):
    g = torch.Generator().manual_seed(seed)
    pos, neg = ["great", "fun", "good"], ["dull", "boring", "bad", "long"]
    filler = ["film", "movie", "plot", "acting", "story", "the", "a"]
    texts, labels = [], []
    for _ in range(n):
        y = int(torch.randint(2, (1,), generator=g))
        src = pos if y == 0 else neg
        words = [src[int(torch.randint(len(src), (1,), generator=g))]]
        words += [filler[int(torch.randint(len(filler), (1,), generator=g))] for _ in range(2)]
        texts.append(" ".join(words))
        labels.append(y)
    return TextDataset(tuple(texts), tuple(labels), ("positive", "negative"), name)


def test_plan_prompts_have_k_demonstrations_without_the_query():
    train, test = _dataset(60, 1, "train"), _dataset(20, 2, "test")
    v = Verbalizer(("good", "bad"))
    plan = plan_icl(train, test, template=TEMPLATE, verbalizer=v, shots=(0, 1, 4), n_prompt_seeds=3, n_test=10,
                    n_calib=8, seed=3)
    assert len(plan.test_indices) == 10 and len(plan.calib_indices) == 8
    assert not set(plan.calib_indices) & set(plan.demo_pool)
    query_texts = {test.texts[i] for i in plan.test_indices} | {train.texts[j] for j in plan.calib_indices}
    assert not {train.texts[j] for j in plan.demo_pool} & query_texts  # duplicates of queries are not demos
    assert sorted(plan.demo_sets) == [(0, 0), (1, 0), (1, 1), (1, 2), (4, 0), (4, 1), (4, 2)]
    assert len(plan.rows) == 7 * 18
    for r in plan.rows:
        assert len(r.demos) == r.shots == len(set(r.demos)) and r.demos == plan.demo_sets[(r.shots, r.prompt_id)]
        assert r.text.count("Review: ") == r.shots + 1 and r.text.endswith(f"Review: {r.query}\nSentiment:")
        assert all(train.texts[j] != r.query for j in r.demos)
        assert r.text == build_prompt(TEMPLATE, v, [(train.texts[j], train.labels[j]) for j in r.demos], r.query)
    ids = {r.split: set() for r in plan.rows}
    for r in plan.rows:
        ids[r.split].add(r.example_id)
    assert not ids["test"] & ids["calib"]
    # same seed -> same plan; another seed -> other demonstrations
    again = plan_icl(train, test, template=TEMPLATE, verbalizer=v, shots=(0, 1, 4), n_prompt_seeds=3, n_test=10,
                     n_calib=8, seed=3)
    other = plan_icl(train, test, template=TEMPLATE, verbalizer=v, shots=(0, 1, 4), n_prompt_seeds=3, n_test=10,
                     n_calib=8, seed=4)
    assert again.demo_sets == plan.demo_sets and other.demo_sets != plan.demo_sets
    with pytest.raises(ValueError, match="cannot draw 80 demonstrations"):
        plan_icl(train, test, template=TEMPLATE, verbalizer=v, shots=(80,), n_test=5, n_calib=5)


def test_run_icl_end_to_end_from_local_files(lm_dir, tmp_path):
    train, test = _dataset(40, 5), _dataset(30, 6)
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(
        f"{t},{train.label_names[y]}\n" for t, y in zip(train.texts, train.labels)))
    (tmp_path / "test.jsonl").write_text("".join(
        json.dumps({"sentence": t, "y": y}) + "\n" for t, y in zip(test.texts, test.labels)))
    tr = load_text_classification(tmp_path / "train.csv", labels=("positive", "negative"))
    te = load_text_classification(tmp_path / "test.jsonl", text_field="sentence", label_field="y",
                                  labels=("positive", "negative"))
    assert tr.texts == train.texts and tr.labels == train.labels and te.labels == test.labels
    v = Verbalizer(("good", "not good"))
    test_rec, calib_rec = run_icl(str(lm_dir), None, tr, te, template=TEMPLATE, verbalizer=v, shots=(0, 1, 2),
                                  n_prompt_seeds=2, n_test=12, n_calib=12, seed=0, batch_size=16)
    assert len(test_rec) == 12 * 5 and len(calib_rec) == 12 * 5
    assert sorted(set(zip(test_rec.shots.tolist(), test_rec.prompt_id.tolist()))) == \
        sorted(set(zip(calib_rec.shots.tolist(), calib_rec.prompt_id.tolist()))) == [(0, 0), (1, 0), (1, 1), (2, 0),
                                                                                       (2, 1)]
    assert torch.allclose(torch.softmax(test_rec.logits, 1), test_rec.probs)
    # the stored probabilities are those of the prompts the plan describes
    model, tok = load_causal_lm(lm_dir)
    plan = plan_icl(tr, te, template=TEMPLATE, verbalizer=v, shots=(0, 1, 2), n_prompt_seeds=2, n_test=12,
                    n_calib=12, seed=0)
    rows = [r for r in plan.rows if r.split == "test"][::13]
    ref = label_log_probs_ref(model, tok, [r.text for r in rows], v)
    for r, want in zip(rows, ref):
        m = (test_rec.example_id == r.example_id) & (test_rec.shots == r.shots) & (test_rec.prompt_id == r.prompt_id)
        assert int(m.sum()) == 1 and torch.allclose(test_rec.logits[m][0], want, atol=1e-5)
        assert int(test_rec.labels[m]) == r.label
    summ = summarize(test_rec)
    assert [s["shots"] for s in summ] == [0, 1, 2] and all(0 <= s["ece_mean"] <= 1 for s in summ)
    table = evaluate_regimes(test_rec, calib_rec, methods=("temperature", "scaling_binning"))
    assert len(table) == 3 * 7


def test_errors_are_clear(lm, lm_dir, tmp_path):
    model, tok = lm
    with pytest.raises(ValueError, match="unknown token"):
        label_log_probs(model, tok, PROMPTS, Verbalizer(("good", "splendid")))
    with pytest.raises(ValueError, match="tokenize to the same ids"):
        label_log_probs(model, tok, PROMPTS, Verbalizer(("good", "good ")))
    with pytest.raises(ValueError, match="more than the model's 160 positions"):
        label_log_probs(model, tok, ["Review: " + "film " * 200 + "\nSentiment:"], Verbalizer(("good", "bad")))
    with pytest.raises(ValueError, match="padding_side"):
        label_log_probs(model, tok, PROMPTS, Verbalizer(("good", "bad")), padding_side="middle")
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_causal_lm(tmp_path / "nope")
    with pytest.raises(ValueError, match="at least 2 label words"):
        Verbalizer(("good",))
    # datasets: file, line and field in the message
    f = tmp_path / "d.csv"
    f.write_text("text,label\nfun film,positive\nboring,neutral\n")
    with pytest.raises(ValueError, match=r"d\.csv:3: field 'label' has unknown label 'neutral'"):
        load_text_classification(f, labels=("positive", "negative"))
    f.write_text("text,label\nfun film,positive\n,negative\n")
    with pytest.raises(ValueError, match=r"d\.csv:3: field 'text' must be a non-empty string"):
        load_text_classification(f)
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "a", "label": 0}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: missing field 'label'"):
        load_text_classification(j, labels=("x", "y"))
    j.write_text('{"text": "a", "label": 0}\n{oops\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: invalid JSON"):
        load_text_classification(j, labels=("x", "y"))
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        (tmp_path / "d.txt").write_text("x")
        load_text_classification(tmp_path / "d.txt")
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        load_text_classification(tmp_path / "missing.csv")
    # integer labels are accepted as indices, inferred names are sorted
    j.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    assert load_text_classification(j, labels=("x", "y")).labels == (1, 0)
    assert load_text_classification(j).label_names == ("0", "1")


def test_import_does_not_load_transformers():
    code = "import sys, ratelab, ratelab.icl; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True, timeout=120)
