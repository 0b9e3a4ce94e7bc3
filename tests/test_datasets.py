import json
import pickle

import numpy as np
import pytest
import torch

import datasets
from constants import UserError


def test_image_folder_is_decoded_once_and_cached(tiny_env, monkeypatch):
    split = datasets.load_split("CIFAR-10", train=True)  # names are case-insensitive
    assert split.x.dtype == torch.uint8 and split.x.shape == (400, 3, 32, 32)
    assert split.y.tolist() == sorted(split.y.tolist())  # class folders in sorted order
    assert torch.bincount(split.y).tolist() == [40] * 10
    assert split.classes[0] == "airplane" and split.classes[9] == "truck"
    assert list((tiny_env / "cache_dir").glob("cifar10_train_*.pt"))

    def no_decoding(*a, **k):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(datasets, "_read_image_folder", no_decoding)
    again = datasets.load_split("cifar10", train=True)
    assert torch.equal(again.x, split.x) and torch.equal(again.y, split.y)


def test_torchvision_cifar_formats(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(c10 / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                         b"labels": [0, 1, 2, 9]}, f)
    split = datasets.load_split("cifar10", True, root=tmp_path)
    assert split.x.shape == (20, 3, 32, 32) and split.y.tolist()[:4] == [0, 1, 2, 9]
    raw = pickle.load(open(c10 / "data_batch_1", "rb"))[b"data"][1].reshape(3, 32, 32)
    assert np.array_equal(split.x[1].numpy(), raw)  # rows are CHW planes

    c100 = tmp_path / "cifar-100-python"
    c100.mkdir()
    for name, n in (("train", 6), ("test", 3)):
        with open(c100 / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": list(range(90, 90 + n)), b"coarse_labels": [0] * n}, f)
    test = datasets.load_split("CIFAR100", False, root=tmp_path)
    assert test.y.tolist() == [90, 91, 92] and test.x.shape == (3, 3, 32, 32)


def test_svhn_mat_format(tmp_path, monkeypatch):
    from scipy.io import savemat

    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    x = np.random.default_rng(1).integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    savemat(tmp_path / "train_32x32.mat", {"X": x, "y": np.array([[10], [1], [2], [3], [10]])})
    split = datasets.load_split("svhn", True, root=tmp_path)
    assert split.y.tolist() == [0, 1, 2, 3, 0]  # label 10 means digit 0
    assert np.array_equal(split.x[2].numpy(), x[..., 2].transpose(2, 0, 1))


def test_gtsrb_npz(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "gtsrb").mkdir()
    xtr = np.random.default_rng(2).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "gtsrb" / "gtsrb32.npz", x_train=xtr, y_train=np.arange(7) * 6,
             x_test=xtr[:2], y_test=np.array([42, 0]))
    train = datasets.load_split("GTSRB", True, root=tmp_path)
    assert train.x.shape == (7, 3, 32, 32) and train.y.max() == 36
    assert np.array_equal(train.x[3].numpy(), xtr[3].transpose(2, 0, 1))
    assert datasets.load_split("gtsrb", False, root=tmp_path).y.tolist() == [42, 0]


def test_missing_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(UserError, match="DATA_ROOT.*--download"):
        datasets.load_split("svhn", True, root=tmp_path)


def test_pickles_may_not_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py").mkdir()
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(UserError, match="refusing to unpickle"):
        datasets.load_split("cifar10", False, root=tmp_path, use_cache=False)


def test_stratified_validation_split():
    y = torch.arange(10).repeat_interleave(50)
    kept, held = datasets.stratified_split(y, 0.1, seed=3)
    assert torch.bincount(y[held]).tolist() == [5] * 10
    assert len(set(kept.tolist()) & set(held.tolist())) == 0 and len(kept) + len(held) == 500
    assert torch.equal(held, datasets.stratified_split(y, 0.1, seed=3)[1])
    assert not torch.equal(held, datasets.stratified_split(y, 0.1, seed=4)[1])


def test_subset_and_forget_sets_index_the_full_split(tmp_path):
    y = torch.arange(10).repeat(100)  # 1000 samples, classes interleaved
    sub = datasets.balanced_subset(y, 200, seed=0)
    assert torch.bincount(y[sub]).tolist() == [20] * 10
    cf = datasets.forget_indices(y, cf=3, candidates=sub)
    assert set(cf.tolist()) <= set(sub.tolist()) and (y[cf] == 3).all() and len(cf) == 20
    rnd = datasets.forget_indices(y, unlr=0.1, seed=5, candidates=sub)
    assert len(rnd) == 20 and set(rnd.tolist()) <= set(sub.tolist())
    assert not torch.equal(rnd, datasets.forget_indices(y, unlr=0.1, seed=6, candidates=sub))
    path = tmp_path / "f.json"
    datasets.write_index_json(path, rnd)
    assert torch.equal(datasets.forget_indices(y, itf=path), rnd)


@pytest.mark.parametrize("kwargs, message", [
    (dict(cf=10), "class 10 is out of range"),
    (dict(unlr=1.5), "fraction must be in"),
    (dict(cf=1, unlr=0.1), "at most one"),
    (dict(itf="/nonexistent.json"), "does not exist"),
])
def test_bad_forget_specifiers(kwargs, message):
    with pytest.raises(UserError, match=message):
        datasets.forget_indices(torch.arange(10), **kwargs)


def test_index_file_out_of_range(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([0, 5, 99]))
    with pytest.raises(UserError, match="outside"):
        datasets.read_index_json(tmp_path / "bad.json", 50)
