import random
from collections import Counter

import pytest

from data import LengthGroupedSampler


def make(n=103, text_every=4, seed=0):
    rng = random.Random(seed)
    lengths = [rng.randint(10, 3000) for _ in range(n)]
    is_image = [i % text_every != 0 for i in range(n)]
    return lengths, is_image


@pytest.mark.parametrize("world", [1, 2, 8])
def test_every_sample_once_per_epoch_equal_batches(world):
    lengths, is_image = make()
    bs = 3
    per_rank = [list(LengthGroupedSampler(lengths, is_image, bs, world, r, seed=5)) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # same number of batches on every rank
    assert all(len(b) == len(LengthGroupedSampler(lengths, is_image, bs, world, 0)) for b in per_rank)
    batches = [b for rank in per_rank for b in rank]
    assert all(len(b) == bs for b in batches)
    seen = Counter(i for b in batches for i in b)
    assert set(seen.values()) == {1}  # at most once: nothing repeated to fill a batch ...
    n_img, n_txt = sum(is_image), len(is_image) - sum(is_image)
    left_out = LengthGroupedSampler(lengths, is_image, bs, world, 0).left_out
    assert left_out == {"image": n_img % (bs * world), "text-only": n_txt % (bs * world)}
    assert len(seen) == len(lengths) - sum(left_out.values())  # ... and only the remainders left out
    assert all(len({is_image[i] for i in b}) == 1 for b in batches)  # modalities never mixed


def test_length_grouping_and_determinism():
    lengths, is_image = make(n=400, text_every=1000)
    s = LengthGroupedSampler(lengths, is_image, batch_size=4, seed=1, group_batches=8)
    batches = list(s)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    rng = random.Random(0)
    perm = list(range(400))
    rng.shuffle(perm)
    random_spread = sum(max(lengths[i] for i in perm[k:k + 4]) - min(lengths[i] for i in perm[k:k + 4])
                        for k in range(0, 400, 4)) / 100
    assert spread < random_spread / 4  # sorted mega-batches give tight batches
    again = LengthGroupedSampler(lengths, is_image, batch_size=4, seed=1, group_batches=8)
    assert list(again) == batches  # deterministic in (seed, epoch)
    assert list(again) == batches  # a finished pass starts over
    again.set_epoch(1)
    assert list(again) != batches  # a new order every epoch


@pytest.mark.parametrize("world", [1, 2])
def test_resume_from_position_continues_the_same_order(world):
    lengths, is_image = make()
    for rank in range(world):
        full = LengthGroupedSampler(lengths, is_image, 2, world, rank, seed=9)
        full.set_epoch(3)
        order = list(full)
        state = full.state_dict(position=7)  # the trainer consumed 7 batches of epoch 3
        resumed = LengthGroupedSampler(lengths, is_image, 2, world, rank, seed=9)
        resumed.load_state_dict(state)
        assert len(resumed) == len(order) - 7
        assert list(resumed) == order[7:]


def test_resume_refuses_a_different_setup():
    lengths, is_image = make()
    state = LengthGroupedSampler(lengths, is_image, 2, 2, 0).state_dict(position=1)
    with pytest.raises(ValueError, match="saved world_size=2 but this run has 4"):
        LengthGroupedSampler(lengths, is_image, 2, 4, 0).load_state_dict(state)
    other = [n + 1 if k == 5 else n for k, n in enumerate(lengths)]  # as many samples, one estimate differs
    with pytest.raises(ValueError, match="saved samples_sha1=.* the samples' length estimates or modalities"):
        LengthGroupedSampler(other, is_image, 2, 2, 0).load_state_dict(state)
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        LengthGroupedSampler(lengths, is_image, 2, 2, 2)


def test_a_lone_text_sample_is_left_out_not_repeated():
    s = LengthGroupedSampler([10] * 9, [True] * 8 + [False], batch_size=4)
    assert s.left_out == {"image": 0, "text-only": 1} and len(s) == 2
    assert sorted(i for b in s for i in b) == list(range(8))
