"""views.TrainingView: what a training stream shows instead of the plain split, and how two
manipulations compose."""
import pytest
import torch

from constants import UserError
from datasets import BatchLoader, Split
from views import TrainingView


def split(n=12):
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 3, 4, 4), generator=g, dtype=torch.uint8),
                 torch.arange(n) % 3, "tiny", True, ["a", "b", "c"])


def test_a_view_replaces_relabels_and_stamps_in_the_loader():
    s = split()
    idx = torch.tensor([1, 4])
    view = TrainingView(idx, torch.zeros(2, 3, 4, 4, dtype=torch.uint8), labels=torch.full((12,), 2),
                        stamp=lambda x: x + 100, stamp_mask=torch.arange(12) == 4,
                        stamp_after_normalize=False)
    loader = BatchLoader(s, None, batch_size=12, normalize=False, view=view)
    batch = next(iter(loader))
    assert torch.equal(batch.y, torch.full((12,), 2))
    assert (batch.x[1] == 0).all() and (batch.x[4] == 100).all()  # replaced, then stamped
    assert torch.allclose(batch.x[0], s.x[0].float() / 255)
    assert torch.equal(s.x, split().x)  # the split itself is untouched


def test_views_compose_later_wins_and_plans_on_the_earlier():
    s = split()
    poison = TrainingView(torch.arange(12), (s.x.int() + 1).clamp(max=255).to(torch.uint8))
    seen = poison.apply_to(s)
    assert torch.equal(seen.x, poison.replace_images) and torch.equal(seen.y, s.y)
    labels = seen.y.clone()
    labels[[2, 5]] = 0
    backdoor = TrainingView(torch.tensor([2, 5]), torch.full((2, 3, 4, 4), 7, dtype=torch.uint8), labels)
    both = poison.then(backdoor)
    x = both.images(s.x)
    assert (x[2] == 7).all() and (x[5] == 7).all() and torch.equal(x[0], poison.replace_images[0])
    assert torch.equal(both.labels, labels) and len(both.replace_idx) == 12
    assert poison.then(None) is poison and poison.then(TrainingView()) is poison
    stamp = TrainingView(stamp=lambda x: x)
    with pytest.raises(UserError, match="both stamp"):
        stamp.then(stamp)


def test_bad_views_are_refused():
    with pytest.raises(UserError):
        TrainingView(torch.tensor([0]), None)
    with pytest.raises(UserError):
        TrainingView(torch.tensor([0]), torch.zeros(1, 3, 4, 4))  # float images
    with pytest.raises(UserError):
        TrainingView(labels=torch.zeros(3, dtype=torch.long)).targets(torch.zeros(5, dtype=torch.long))
