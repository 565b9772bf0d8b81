"""CIDEr-D: the exact scorer against pycocoevalcap, the tensor scorer against the exact one."""
from __future__ import annotations

import json
import lzma
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider import Cider

from butd.errors import DataError
from butd.metrics import CiderD, DocumentFrequency, TensorCiderD

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEMO = DATA / "coco_caption_demo"
VAL_CAPTIONS = DATA / "coco_annotations" / "captions_val2014.json.xz"
EOS, PAD = 2, 0


def simple_tokenize(caption: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", caption.lower()).split())


@pytest.fixture(scope="module")
def val_captions() -> dict[int, list[str]]:
    """Real COCO val2014 captions, lowercased and split on non-alphanumerics (no Java needed)."""
    if not VAL_CAPTIONS.exists():
        pytest.skip(f"real COCO captions not found at {VAL_CAPTIONS}")
    with lzma.open(VAL_CAPTIONS, "rt") as f:
        annotations = json.load(f)["annotations"]
    captions: dict[int, list[str]] = {}
    for ann in annotations:
        captions.setdefault(ann["image_id"], []).append(simple_tokenize(ann["caption"]))
    return captions


def sample(captions: dict[int, list[str]], k: int, seed: int) -> tuple[dict, dict]:
    """k random images: candidate = their first caption, references = the others (up to 5)."""
    ids = random.Random(seed).sample(sorted(captions), k)
    return {i: captions[i][1:6] for i in ids}, {i: [captions[i][0]] for i in ids}


@pytest.fixture(scope="module")
def demo_tokenized() -> tuple[dict, dict]:
    """The official COCO fakecap example after pycocoevalcap's PTB tokenization (Java)."""
    if not DEMO.exists():
        pytest.skip(f"COCO caption demo not found at {DEMO}")
    if shutil.which("java") is None:
        pytest.skip("java is needed for pycocoevalcap's PTB tokenizer")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    refs = json.loads((DEMO / "captions_val2014_fakecap_refs.json").read_text())["annotations"]
    results = json.loads((DEMO / "captions_val2014_fakecap_results.json").read_text())
    gts: dict[int, list[dict]] = {r["image_id"]: [] for r in results}
    for ann in refs:
        gts[ann["image_id"]].append({"caption": ann["caption"]})
    res = {r["image_id"]: [{"caption": r["caption"]}] for r in results}
    tokenizer = PTBTokenizer()
    return tokenizer.tokenize(gts), tokenizer.tokenize(res)


def test_exact_cider_reproduces_the_official_coco_example(demo_tokenized):
    gts, res = demo_tokenized
    score, per_image = CiderD().compute_score(gts, res)
    assert score == pytest.approx(0.5997905185184199, abs=1e-9)
    _, reference = Cider().compute_score(gts, res)
    np.testing.assert_allclose(per_image, reference, rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_cider_equals_pycocoevalcap_on_real_captions(val_captions, seed):
    gts, res = sample(val_captions, 150, seed)
    first = next(iter(res))
    res[first] = [""]                      # an empty candidate scores 0, like pycocoevalcap
    score, per_image = CiderD().compute_score(gts, res)
    expected_score, expected = Cider().compute_score(gts, res)
    assert score == pytest.approx(expected_score, abs=1e-9)
    np.testing.assert_allclose(per_image, expected, rtol=0, atol=1e-9)  # same image order (gts keys)
    assert per_image[0] == 0.0


def test_corpus_document_frequencies_come_from_the_corpus(val_captions):
    """With corpus df, a subset scores as it does inside a pycocoevalcap run over the whole corpus."""
    gts, res = sample(val_captions, 120, seed=2)
    _, whole = Cider().compute_score(gts, res)
    subset = list(gts)[::3]
    sub_gts, sub_res = {i: gts[i] for i in subset}, {i: res[i] for i in subset}
    for corpus in (gts, DocumentFrequency.from_references(gts)):
        _, per_image = CiderD(corpus=corpus).compute_score(sub_gts, sub_res)
        np.testing.assert_allclose(per_image, whole[::3], rtol=0, atol=1e-9)
    # ... and differ from scoring the subset with its own document frequencies.
    _, own = CiderD().compute_score(sub_gts, sub_res)
    assert np.abs(own - whole[::3]).max() > 1e-3


def test_exact_cider_refuses_malformed_input():
    with pytest.raises(DataError, match="same image ids"):
        CiderD().compute_score({1: ["a cat"]}, {2: ["a cat"]})
    with pytest.raises(DataError, match="exactly one caption"):
        CiderD().compute_score({1: ["a cat"]}, {1: ["a cat", "a dog"]})
    with pytest.raises(DataError, match="non-empty list"):
        CiderD().compute_score({1: []}, {1: ["a cat"]})


# --- TensorCiderD ------------------------------------------------------------------------------


class Encoder:
    """Word -> id vocabulary built on the fly (ids from 4: 0..3 are pad/bos/eos/unk)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, caption: str) -> list[int]:
        return [self.ids.setdefault(w, len(self.ids) + 4) for w in caption.split()]


def encode_batch(encode: Encoder, image_ids: list[int], candidates: list[str], max_len: int):
    """Decoder-style tokens: words, then EOS if the caption fits in max_len, then PAD; and the word
    strings the scorer sees, with "<eos>" added when the caption ended."""
    tokens = torch.full((len(candidates), max_len), PAD, dtype=torch.int64)
    cut, ended = [], []
    for b, caption in enumerate(candidates):
        ids = encode(caption)[:max_len]
        tokens[b, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        if len(ids) < max_len:
            tokens[b, len(ids)] = EOS
            tokens[b, len(ids) + 1 :] = torch.randint(4, 50, (max_len - len(ids) - 1,))  # after EOS: ignored
        cut.append(" ".join(caption.split()[:max_len]))
        ended.append(len(ids) < max_len)
    return torch.tensor(image_ids), tokens, cut, ended


@pytest.fixture(scope="module")
def reward_case(val_captions):
    """300 images as the reference corpus; a batch of 200 candidates (some images twice, some
    candidates cut at max length, one empty, one single word)."""
    gts, res = sample(val_captions, 300, seed=3)
    ids = list(gts)
    rng = random.Random(4)
    batch_ids = [rng.choice(ids) for _ in range(200)]
    candidates = [res[i][0] if rng.random() < 0.7 else rng.choice(gts[rng.choice(ids)]) for i in batch_ids]
    candidates[0], candidates[1] = "", "a"
    encode = Encoder()
    references = {i: [encode(r) for r in gts[i]] for i in ids}
    return gts, references, encode, batch_ids, candidates


def exact_per_candidate(gts, batch_ids, strings, eos: list[bool] | None = None) -> np.ndarray:
    """Exact corpus-df CIDEr-D of each candidate; "<eos>" appended where ``eos`` says so."""
    if eos is not None:
        gts = {i: [r + " <eos>" for r in refs] for i, refs in gts.items()}
        strings = [(s + " <eos>").strip() if e else s for s, e in zip(strings, eos)]
    scorer = CiderD(corpus=gts)
    return np.array([scorer.compute_score({i: gts[i]}, {i: [s]})[0] for i, s in zip(batch_ids, strings)])


@pytest.mark.parametrize("count_eos", [False, True])
def test_tensor_cider_equals_exact_cider(reward_case, count_eos):
    gts, references, encode, batch_ids, candidates = reward_case
    image_ids, tokens, cut, ended = encode_batch(encode, batch_ids, candidates, max_len=12)
    assert not all(ended) and any(ended)
    scorer = TensorCiderD(references=references, count_eos=count_eos, dtype=torch.float64)
    scores = scorer(image_ids, tokens)
    expected = exact_per_candidate(gts, batch_ids, cut, ended if count_eos else None)
    assert scores.dtype == torch.float64 and scores.shape == (len(batch_ids),)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=0, atol=1e-6)
    assert scores[0] == 0.0  # empty caption ("<eos>" alone has idf 0: every image's references end)


def test_count_eos_rewards_finishing_the_sentence(reward_case):
    """With count_eos, a caption that ends like a reference scores higher when it emitted <eos>
    than the same words cut at max length; without count_eos both score the same."""
    gts, references, encode, batch_ids, candidates = reward_case
    scorer = TensorCiderD(references=references, count_eos=True)
    copies = [gts[i][0] for i in batch_ids[:20]]
    image_ids, tokens, _, _ = encode_batch(encode, batch_ids[:20], copies, max_len=60)
    words = torch.where(tokens == EOS, PAD, tokens)           # same words, never ended
    ended, cut = scorer(image_ids, tokens), scorer(image_ids, words)
    assert (ended > cut).all()
    plain = TensorCiderD(references=references, count_eos=False)
    torch.testing.assert_close(plain(image_ids, tokens), plain(image_ids, words))


def test_tensor_cider_from_caption_data_uses_label_rows(reward_case):
    gts, references, encode, batch_ids, candidates = reward_case

    class FakeCaptionData:  # the two CaptionData methods the scorer reads
        def split_ids(self, split):
            assert split == "train"
            return np.array(sorted(references), dtype=np.int64)

        def labels(self, image_id):
            rows = np.zeros((len(references[image_id]), 16), dtype=np.int64)
            for r, ref in enumerate(references[image_id]):
                rows[r, : min(len(ref), 16)] = ref[:16]
            return rows

    truncated = {i: [r[:16] for r in refs] for i, refs in references.items()}
    image_ids, tokens, _, _ = encode_batch(encode, batch_ids, candidates, max_len=16)
    from_data = TensorCiderD.from_caption_data(FakeCaptionData(), "train", count_eos=True)
    direct = TensorCiderD(references=truncated, count_eos=True)
    assert from_data.num_images == len(references)
    torch.testing.assert_close(from_data(image_ids, tokens), direct(image_ids, tokens))


def test_tensor_cider_refuses_bad_input(reward_case):
    _, references, _, _, _ = reward_case
    scorer = TensorCiderD(references=references)
    tokens = torch.tensor([[5, 6, EOS]])
    with pytest.raises(DataError, match="no references for image ids \\[-7\\]"):
        scorer(torch.tensor([-7]), tokens)
    with pytest.raises(DataError, match="token ids outside"):
        scorer(torch.tensor([next(iter(references))]), torch.tensor([[5, 2**15, EOS]]))
    with pytest.raises(DataError, match="image 7: a reference holds"):
        TensorCiderD(references={7: [[5, EOS, 6]]})
    with pytest.raises(DataError, match="image 8: no reference captions"):
        TensorCiderD(references={8: []})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tensor_cider_on_gpu_equals_cpu(reward_case):
    _, references, encode, batch_ids, candidates = reward_case
    image_ids, tokens, _, _ = encode_batch(encode, batch_ids, candidates, max_len=16)
    cpu = TensorCiderD(references=references, dtype=torch.float64)(image_ids, tokens)
    gpu = TensorCiderD(references=references, device="cuda", dtype=torch.float64)(image_ids.cuda(), tokens.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-9)
