"""Retrieval recall@k: against a brute-force loop, on planted features, on a tiny model, and the CLI."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F

import clip_pacl
from clip_pacl.data import load_image, read_caption_rows
from clip_pacl.data.synthetic import generate_synthetic
from clip_pacl.errors import DataError
from clip_pacl.retrieval.evaluate import evaluate_retrieval, group_captions, recall_at_k
from clip_pacl.tokenizer import tokenize
from clip_pacl.transforms import image_transform
from clip_pacl_app.cli.main import main


def brute_force_recall(image_features, text_features, text_to_image, ks):
    """The definition, one query at a time: rank = how many candidates score strictly higher than the best true
    match; a hit at k when rank < k (so a tie with the k-th best counts as a hit, in both directions)."""
    scores = (image_features @ text_features.T).tolist()
    n_images, n_texts = len(scores), len(scores[0])
    out = {}
    for k in ks:
        hits = 0
        for i in range(n_images):
            true = max(scores[i][t] for t in range(n_texts) if text_to_image[t] == i)
            hits += sum(s > true for s in scores[i]) < k
        out[f"image_to_text_R@{k}"] = hits / n_images
    for k in ks:
        hits = 0
        for t in range(n_texts):
            true = scores[text_to_image[t]][t]
            hits += sum(scores[i][t] > true for i in range(n_images)) < k
        out[f"text_to_image_R@{k}"] = hits / n_texts
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_at_k_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n_images, dim = 9, 6
    # 1 to 4 captions per image, shuffled so captions of one image are not adjacent
    text_to_image = [i for i in range(n_images) for _ in range(1 + i % 4)]
    text_to_image = [text_to_image[j] for j in torch.randperm(len(text_to_image), generator=g).tolist()]
    images = F.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    # captions are noisy copies of their image, so recall is neither 0 nor 1
    texts = F.normalize(images[text_to_image] + 0.9 * torch.randn(len(text_to_image), dim, generator=g), dim=-1)
    ks = (1, 2, 5, 10, 50)  # 50 > both counts: capped
    result = recall_at_k(images, texts, text_to_image, ks)
    expected = brute_force_recall(images, texts, text_to_image, ks)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key
    assert result["mean_recall"] == pytest.approx(sum(expected.values()) / len(expected))
    assert result["image_to_text_R@50"] == 1.0 and result["text_to_image_R@50"] == 1.0


def test_recall_on_planted_features():
    # 3 images on the axes; 5 captions: image 0 has captions 0, 1; image 1 has 2, 3; image 2 has 4
    images = torch.eye(3)
    texts = F.normalize(torch.tensor([
        [0.3, 1.0, 0.0],  # image 0's; nearest image 1, then 0: a text->image miss at 1, hit at 2
        [1.0, 0.0, 0.2],  # image 0's; nearest image 0
        [0.0, 0.9, 0.5],  # image 1's; nearest image 1
        [0.0, 0.4, 1.0],  # image 1's; nearest image 2, then 1: miss at 1, hit at 2
        [0.0, 0.5, 1.0],  # image 2's; nearest image 2
    ]), dim=-1)
    text_to_image = [0, 0, 1, 1, 2]
    r = recall_at_k(images, texts, text_to_image, ks=(1, 2))
    # image -> text best two: image 0 -> (1, 0) hit; image 1 -> (0, 2) miss then hit; image 2 -> (3, 4) miss then hit
    assert r["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert r["image_to_text_R@2"] == 1.0
    assert r["text_to_image_R@1"] == pytest.approx(3 / 5)
    assert r["text_to_image_R@2"] == 1.0
    assert r["mean_recall"] == pytest.approx((1 / 3 + 1 + 3 / 5 + 1) / 4)
    with pytest.raises(ValueError, match="text-to-image"):
        recall_at_k(images, texts, [0, 1], ks=(1,))


def test_recall_counts_exact_ties_as_hits_whatever_the_order():
    # image 0 and image 1 have identical captions (exact ties: the same vector); image 2's caption is its own
    images = torch.eye(3)
    texts = F.normalize(torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    r = recall_at_k(images, texts, [0, 1, 2], ks=(1,))
    # image 0's best text ties between its own caption and image 1's: tied with the 1st best = a hit (both ways)
    assert r["image_to_text_R@1"] == 1.0 and r["text_to_image_R@1"] == 1.0


def test_recall_at_k_does_not_depend_on_the_other_ks_asked():
    # many identical captions: topk orders ties differently for different k; recall must not care
    g = torch.Generator().manual_seed(0)
    n_images, dim = 60, 8
    prototypes = F.normalize(torch.randn(4, dim, generator=g), dim=-1)
    kinds = torch.randint(0, 4, (n_images,), generator=g)
    images = F.normalize(prototypes[kinds] + 0.3 * torch.randn(n_images, dim, generator=g), dim=-1)
    text_to_image = [i for i in range(n_images) for _ in range(2)]
    texts = prototypes[kinds[text_to_image]]  # each caption names its image's kind: exact ties across images
    alone = {k: recall_at_k(images, texts, text_to_image, ks=(k,)) for k in (1, 5, 10)}
    together = recall_at_k(images, texts, text_to_image, ks=(1, 5, 10))
    expected = brute_force_recall(images, texts, text_to_image, (1, 5, 10))
    for k in (1, 5, 10):
        for key in (f"image_to_text_R@{k}", f"text_to_image_R@{k}"):
            assert together[key] == alone[k][key] == pytest.approx(expected[key]), key


def test_group_captions_merges_equal_paths(tmp_path):
    rows = read_caption_rows_from(tmp_path, [("a.png", "x"), ("sub/../a.png", "y"), ("b.png", "z")])
    images, captions, text_to_image = group_captions(rows)
    assert len(images) == 2 and captions == ["x", "y", "z"] and text_to_image == [0, 0, 1]


def read_caption_rows_from(tmp_path, rows):
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("image", "caption"))
        writer.writerows(rows)
    return read_caption_rows(tmp_path / "captions.csv")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(out, n=10, seed=1, image_size=64, captions_per_image=2)
    return out


def test_tiny_model_multi_caption_retrieval(synthetic, tmp_path):
    torch.manual_seed(0)
    model = clip_pacl.load("tiny").eval()
    rows = read_caption_rows(synthetic / "captions.csv")
    assert len(rows) > len({r.image for r in rows})  # several captions per image
    model.train()  # as during periodic validation in training
    result = evaluate_retrieval(model, rows, batch_size=3, progress=False)
    assert model.training  # the mode it came in with is restored
    model.eval()

    images, captions, text_to_image = group_captions(rows)
    transform = image_transform(model.image_size)
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([transform(load_image(p)) for p in images]), normalize=True)
        text_features = model.encode_text(tokenize(captions), normalize=True)
    expected = brute_force_recall(image_features, text_features, text_to_image, (1, 5, 10))
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key
    assert (result["num_images"], result["num_captions"], result["num_unreadable"]) == (len(images), len(rows), 0)

    # an unreadable image is left out with its captions
    (tmp_path / "images").mkdir()
    broken = tmp_path / "images" / "broken.png"
    broken.write_bytes(b"garbage")
    rows_with_broken = [*rows, type(rows[0])(broken, "a broken image"), type(rows[0])(broken, "another caption")]
    result = evaluate_retrieval(model, rows_with_broken, batch_size=4, progress=False)
    assert (result["num_images"], result["num_captions"], result["num_unreadable"]) == (len(images), len(rows), 1)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key


def test_no_readable_image_is_an_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    rows = read_caption_rows_from(tmp_path, [("x.png", "a caption")])
    with pytest.raises(DataError, match="none of the 1 images could be read"):
        evaluate_retrieval(clip_pacl.load("tiny"), rows, progress=False)


def test_cli_json_and_table(synthetic, tmp_path, capsys):
    clip_pacl.save(clip_pacl.load("tiny"), tmp_path / "model")  # a preset would draw new weights on every load
    args = ["eval", "retrieval", "--model", str(tmp_path / "model"), "--data", str(synthetic / "captions.csv"),
            "--batch-size", "4"]
    assert main([*args, "--workers", "2", "--json"]) == 0  # loader worker processes give the same result
    result = json.loads(capsys.readouterr().out)
    assert result["num_images"] == 10 and result["num_captions"] == len(read_caption_rows(synthetic / "captions.csv"))
    for key in ("image_to_text_R@1", "image_to_text_R@10", "text_to_image_R@5", "mean_recall"):
        assert 0.0 <= result[key] <= 1.0
    assert result["text_to_image_R@10"] == 1.0  # 10 images: the top 10 hold them all
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{100 * result['mean_recall']:6.2f}" in out
    assert "image->text" in out and "text->image" in out and "mean recall" in out


def test_cli_bad_column_is_one_line(synthetic, capsys):
    args = ["eval", "retrieval", "--model", "tiny", "--random-weights",
            "--data", str(synthetic / "captions.csv"), "--caption-key", "text"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no column 'text'" in err and "\n" not in err
