"""The ``caption`` task (per-sample loss vector, training through the Trainer) and zero-shot scoring by caption
likelihood."""

from __future__ import annotations

import json

import pytest
import torch

import ratelab
from ratelab.data import build_dataset
from ratelab.data.captions import TokenizedCaptions
from ratelab.data.text_tokenizer import CaptionTokenizer
from ratelab.eval.zeroshot import caption_scores, zero_shot_accuracy, zero_shot_predict
from ratelab.models.dpcap import caption_loss
from ratelab.train import CaptionTask, TrainConfig, Trainer, build_task

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    train = build_dataset("shapes_captions", "train", size=48, img_size=8)
    val = build_dataset("shapes_captions", "val", size=16, img_size=8)
    tok = CaptionTokenizer.train(train.captions() + val.captions(), 200)
    return train, val, tok


def _model(tok):
    torch.manual_seed(0)
    return ratelab.create_model("test_dpcap", vocab_size=tok.vocab_size, max_text_len=20, pad_id=tok.pad_id,
                                bos_id=tok.bos_id, eos_id=tok.eos_id)


def test_per_sample_loss_is_a_vector_of_independent_terms_and_training_step_its_mean(data):
    train, _, tok = data
    task = build_task("caption", train_dataset=train, tokenizer=tok, max_len=16)
    assert isinstance(task, CaptionTask) and task.config.max_len == 16
    batch = torch.utils.data.default_collate([TokenizedCaptions(train, tok, 16)[i] for i in range(6)])
    m = _model(tok).train()
    per = task.per_sample_losses(m, batch)
    assert per.shape == (6,)
    torch.testing.assert_close(per, caption_loss(m(*batch), batch[1], tok.pad_id))
    alone = task.per_sample_losses(m, [batch[0][2:3], batch[1][2:3]])
    torch.testing.assert_close(alone, per[2:3], atol=1e-6, rtol=1e-6)
    loss, metrics = task.training_step(m, batch, None)
    torch.testing.assert_close(loss, per.mean())
    vec, _ = task.training_step(m, batch, None, per_sample=True)
    assert task.per_sample_loss is True
    torch.testing.assert_close(vec, per)
    assert metrics["tokens_per_caption"] > 2


def test_trainer_fits_a_captioner_and_writes_tokenizer_and_captions(data, tmp_path):
    train, val, _ = data
    cfg = TrainConfig(model="test_dpcap", dataset="shapes_captions", epochs=2, batch_size=16, lr=3e-3,
                      optimizer="adamw", out_dir=str(tmp_path), progress=False, ckpt_every=0, eval_every=1,
                      model_kwargs={"max_text_len": 20}, task={"name": "caption", "max_len": 16, "n_generate": 4})
    task = CaptionTask(cfg.task, train_dataset=train, val_dataset=val)
    res = Trainer(cfg, task).fit()
    assert res["val_loss"] < 4.0 and 0.0 <= res["val_exact_match"] <= 1.0  # ln(V) ~ 4.4 before training
    tok = CaptionTokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.tokenizer.get_vocab() == task.tokenizer.tokenizer.get_vocab()
    lines = (tmp_path / "captions" / f"step{res['steps']}.txt").read_text().splitlines()
    assert len(lines) == 4 and all("\t->\t" in x for x in lines)
    saved = json.loads((tmp_path / "model_config.json").read_text())
    assert json.dumps(saved).count(str(tok.vocab_size)) >= 1


def test_caption_task_refuses_a_dataset_without_captions(tmp_path):
    from ratelab.core.errors import ConfigError

    cfg = TrainConfig(model="test_dpcap", dataset="shapes", epochs=1, out_dir=str(tmp_path), progress=False,
                      task="caption")
    with pytest.raises(ConfigError, match="no captions"):
        CaptionTask(cfg.task).build_datasets(cfg)


def test_zero_shot_scores_equal_the_captioners_own_losses(data):
    _, val, tok = data  # un-augmented: the same image on every read
    m = _model(tok).eval()
    imgs = torch.stack([val[i][0] for i in range(3)])
    labels = ["circle", "square", "star"]
    scores = caption_scores(m, tok, imgs, labels)  # "this is a photo of a {}", EOS scored, mean
    with torch.no_grad():
        for k, lab in enumerate(labels):
            ids = tok.encode([f"this is a photo of a {lab}"] * 3)
            torch.testing.assert_close(scores[:, k], -m.loss(imgs, ids), atol=1e-5, rtol=1e-5)
    # several prefixes per class: log-sum-exp of summed log-likelihoods, EOS not scored
    prompts = {"red": ["a small red", "a large red"], "blue": ["a small blue", "a large blue"]}
    agg = caption_scores(m, tok, imgs, prompts, eos=False, reduction="sum", chunk=5)
    with torch.no_grad():
        for k, ps in enumerate(prompts.values()):
            lls = []
            for p in ps:
                ids = tok.encode([p] * 3)[:, :-1]  # no EOS
                logp = m(imgs, ids).log_softmax(-1)[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
                lls.append(logp.sum(1))
            torch.testing.assert_close(agg[:, k], torch.stack(lls, 1).logsumexp(1), atol=1e-5, rtol=1e-5)
    pred = zero_shot_predict(m, tok, imgs, labels)
    assert torch.equal(pred, scores.argmax(1))
    sub = torch.utils.data.Subset(val, [0, 1, 2])
    assert zero_shot_accuracy(m, tok, sub, pred, labels, batch_size=2) == 1.0
    with pytest.raises(ValueError, match="one prompt per class"):
        caption_scores(m, tok, imgs, prompts)


# ---- the vocabulary under DP: released without noise, so it must come from public data -----------------------------


class _FolderLike(torch.utils.data.Dataset):
    """Captions with no public word list (a caption_folder / caption_wds stand-in): 24 random 8x8 images."""

    def __init__(self, n: int = 24) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 8, 8, generator=g)
        self.caps = [f"a photo of item {i % 5} near the door" for i in range(n)]

    def __len__(self) -> int:
        return len(self.caps)

    def __getitem__(self, i: int):
        return self.images[i], self.caps[i]

    def captions(self) -> list[str]:
        return list(self.caps)


def _dp_caption_cfg(out, task_opts, dataset="shapes_captions", **privacy):
    return TrainConfig(model="test_dpcap", dataset=dataset, img_size=8, batch_size=4, max_steps=1, lr=1e-3,
                       progress=False, out_dir=str(out), device="cpu", eval_every=0, ckpt_every=0,
                       model_kwargs={"max_text_len": 20},
                       task={"name": "caption", "max_len": 12, "n_generate": 0, **task_opts},
                       plugins={"privacy": {"noise_multiplier": 1.0, **privacy}})


def test_dp_refuses_a_vocabulary_fit_on_the_private_captions(tmp_path):
    from ratelab.core.errors import ConfigError, DatasetError

    cfg = _dp_caption_cfg(tmp_path / "a", {})
    with pytest.raises(ConfigError, match=r"task\.tokenizer_path: under DP.*the training captions.*"
                                          r"task\.tokenizer_corpus.*tokenizer_from_private_data=true"):
        Trainer(cfg, CaptionTask(cfg.task, train_dataset=_FolderLike()))
    assert not (tmp_path / "a" / "tokenizer.json").exists()  # refused before the vocabulary is written
    # A tokenizer object fit on the captions is refused the same way; without DP nothing is refused.
    tok = CaptionTokenizer.train(_FolderLike().captions(), 100)
    with pytest.raises(ConfigError, match="may not come from the captions given to CaptionTokenizer.train"):
        Trainer(cfg, CaptionTask(cfg.task, train_dataset=_FolderLike(), tokenizer=tok))
    plain = cfg.replace(plugins={}, out_dir=str(tmp_path / "b"))
    assert not Trainer(plain, CaptionTask(plain.task, train_dataset=_FolderLike())).task.tokenizer.public
    # That run's saved tokenizer.json keeps its provenance: passed back as task.tokenizer_path it is still refused.
    again = _dp_caption_cfg(tmp_path / "c", {"tokenizer_path": str(tmp_path / "b" / "tokenizer.json")})
    with pytest.raises(ConfigError, match=r"may not come from the training captions \(saved as .*b/tokenizer.json"):
        Trainer(again, CaptionTask(again.task, train_dataset=_FolderLike()))
    (tmp_path / "b" / "tokenizer.provenance.json").write_text('{"public": "yes", "source": "?"}')
    with pytest.raises(DatasetError, match=r"tokenizer.provenance.json: 'public' must be true or false"):
        CaptionTokenizer.from_file(tmp_path / "b")


def test_dp_opt_out_trains_but_reports_no_guarantee_and_why(tmp_path):
    # No dp_seed: the vocabulary is the only reason the run has no guarantee.
    cfg = _dp_caption_cfg(tmp_path, {"tokenizer_from_private_data": True})
    res = Trainer(cfg, CaptionTask(cfg.task, train_dataset=_FolderLike())).fit()
    assert res["dp_guarantee"] == 0.0 and res["dp_epsilon_rdp"] > 0
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert report["formal_guarantee"] is False and len(report["no_guarantee_reasons"]) == 1
    assert "vocabulary was built from the training captions" in report["guarantee"]
    assert report["guarantee"].startswith("NO PRIVACY GUARANTEE")


def test_public_vocabularies_keep_the_guarantee(tmp_path):
    # A public corpus file, and shapes_captions' own word list (fixed by the generator's code, not by the draws).
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a photo of item 0 near the door\nitem 1 2 3 4\n\n")
    cfg = _dp_caption_cfg(tmp_path / "corpus", {"tokenizer_corpus": str(corpus)})
    trainer = Trainer(cfg, CaptionTask(cfg.task, train_dataset=_FolderLike()))
    assert trainer.task.tokenizer.public and "corpus.txt" in trainer.task.tokenizer.source
    assert trainer.fit()["dp_guarantee"] == 1.0
    cfg = _dp_caption_cfg(tmp_path / "shapes", {}, dataset="shapes_captions")
    few = build_dataset("shapes_captions", "train", size=8, img_size=8)
    other = build_dataset("shapes_captions", "train", size=40, img_size=8, seed=3, max_objects=3)
    trainer = Trainer(cfg, CaptionTask(cfg.task, train_dataset=few))
    res = trainer.fit()
    assert res["dp_guarantee"] == 1.0 and json.loads((tmp_path / "shapes" / "privacy.json").read_text())[
        "formal_guarantee"] is True
    vocab = trainer.task.tokenizer.tokenizer.get_vocab()
    assert CaptionTokenizer.from_file(tmp_path / "shapes").public  # the saved provenance says so
    # The same vocabulary whatever scenes were drawn, and it covers every caption the generator can write
    # (8 drawn captions alone hold only a few of its words).
    again = CaptionTask(cfg.task)
    again.build_tokenizer(other)
    assert again.tokenizer.tokenizer.get_vocab() == vocab
    drawn = CaptionTokenizer.train(few.captions(), 1000).tokenizer.get_vocab()
    assert set(drawn) < set(vocab)
    for c in other.captions():
        ids = again.tokenizer.encode_ids(c)
        assert again.tokenizer.unk_id not in ids and len(ids) == len(c.replace(",", " ,").split()) + 2
    with pytest.raises(Exception, match="tokenizer corpus file not found"):
        CaptionTokenizer.from_corpus(tmp_path / "missing.txt")
