import torch
import torch.nn.functional as F

from datasets import Augment, BatchLoader, Split, crop_flip
from views import TrainingView


def make_split(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    return Split(x, torch.arange(n) % 10, "cifar10", True)


def test_each_epoch_covers_every_sample_once_and_replays_by_seed():
    split = make_split()
    loader = BatchLoader(split, batch_size=10, shuffle=True, seed=1, augment=Augment())
    first = [b for b in loader]
    assert sorted(torch.cat([b.idx for b in first]).tolist()) == list(range(64))
    assert len(first) == len(loader) == 7
    again = [b for b in loader]
    assert all(torch.equal(a.x, b.x) and torch.equal(a.idx, b.idx) for a, b in zip(first, again))
    loader.set_epoch(1)
    assert not torch.equal(torch.cat([b.idx for b in loader]), torch.cat([b.idx for b in first]))


def test_crop_flip_is_a_shifted_window_of_the_padded_image():
    x = torch.rand(32, 3, 8, 8)
    out = crop_flip(x, 2, torch.Generator().manual_seed(0))
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        candidates = windows + [w.flip(2) for w in windows]
        assert any(torch.equal(out[i], w) for w in candidates)
    assert not torch.equal(out, x)  # something moved


def test_normalisation_and_label_override():
    split = make_split()
    labels = split.y.clone()
    labels[5] = 7
    loader = BatchLoader(split, torch.tensor([5, 6]), batch_size=2, view=TrainingView(labels=labels),
                         mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    batch = next(iter(loader))
    assert batch.y.tolist() == [7, 6]
    expected = (split.x[[5, 6]].float() / 255 - 0.5) / 0.25
    assert torch.allclose(batch.x, expected)


def test_replacement_happens_before_augmentation_and_leaves_the_split_alone():
    split = make_split()
    original = split.x.clone()
    white = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    loader = BatchLoader(split, torch.tensor([3, 4, 9]), batch_size=3, normalize=False,
                         view=TrainingView(torch.tensor([3, 9]), white), augment=Augment(crop=0, flip=True))
    batch = next(iter(loader))
    by_idx = dict(zip(batch.idx.tolist(), batch.x))
    assert torch.equal(by_idx[3], torch.ones(3, 8, 8)) and torch.equal(by_idx[9], torch.ones(3, 8, 8))
    assert torch.equal(split.x, original)


def test_stamp_after_normalisation_only_on_masked_samples():
    split = make_split()
    mask = torch.zeros(64, dtype=torch.bool)
    mask[[1, 2]] = True

    def stamp(x):
        x[:, :, -2:, -2:] = 9.0
        return x

    loader = BatchLoader(split, torch.tensor([1, 2, 3]), batch_size=3, augment=Augment(),
                         view=TrainingView(stamp=stamp, stamp_mask=mask), seed=4)
    batch = next(iter(loader))
    corner = batch.x[:, :, -2:, -2:]
    assert (corner[:2] == 9.0).all()  # after augmentation: always exactly in the corner
    assert not (corner[2] == 9.0).all()


def test_batch_transform_sees_unaugmented_pixels():
    split = make_split()
    seen = {}

    def transform(x, idx):
        seen["range"] = (x.min().item(), x.max().item())
        return 1 - x

    loader = BatchLoader(split, torch.tensor([0]), batch_size=1, normalize=False, transform=transform)
    assert torch.allclose(next(iter(loader)).x, 1 - split.x[:1].float() / 255)
    assert 0 <= seen["range"][0] and seen["range"][1] <= 1
