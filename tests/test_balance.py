"""Class imbalance and multi-label losses: the class-balanced sampler across ranks, class weights,
pos_weight=auto, the losses build_losses returns, and Mixup/CutMix on multi-hot targets."""
import collections

import pytest
import torch
from torch.utils.data import DistributedSampler

from raytimm.data.loaders import ClassBalancedDistributedSampler, build_loaders
from raytimm.losses import POS_WEIGHT_RANGE, auto_pos_weight, build_losses, class_weights

# 10:3:1 imbalance over 140 samples
LABELS = [0] * 100 + [1] * 30 + [2] * 10


def _samplers(world, seed=7):
    return [ClassBalancedDistributedSampler(LABELS, LABELS, world, r, seed=seed) for r in range(world)]


def test_balanced_draws_are_balanced_disjoint_across_ranks_and_reproducible_per_epoch():
    world = 2
    samplers = _samplers(world)
    assert all(isinstance(s, DistributedSampler) for s in samplers)  # Ray's prepare_data_loader keeps it
    counts = collections.Counter()
    for epoch in range(20):
        for s in samplers:
            s.set_epoch(epoch)
        shares = [list(s) for s in samplers]
        assert [len(x) for x in shares] == [len(s) for s in samplers] == [70, 70]
        # The ranks' shares are the interleaved positions of ONE draw: together exactly that draw.
        draw = samplers[0].draw().tolist()
        assert samplers[1].draw().tolist() == draw
        assert sorted(p for r in range(world) for p in range(r, len(draw), world)) == list(range(len(draw)))
        assert [draw[p] for p in range(0, len(draw), 2)] == shares[0] and [draw[p] for p in range(1, len(draw), 2)] == shares[1]
        counts.update(LABELS[i] for x in shares for i in x)
        # Resume: a fresh sampler set to the same epoch draws the same.
        fresh = ClassBalancedDistributedSampler(LABELS, LABELS, world, 1, seed=7)
        fresh.set_epoch(epoch)
        assert list(fresh) == shares[1]
    total = sum(counts.values())
    for c in range(3):
        assert abs(counts[c] / total - 1 / 3) < 0.03, counts  # drawn equally often, although 10:3:1 in the data
    e0, e1 = _samplers(world), _samplers(world)
    e1[0].set_epoch(1)
    assert list(e0[0]) != list(e1[0])  # another epoch, another draw


def test_the_draw_does_not_depend_on_the_world_size():
    one = ClassBalancedDistributedSampler(LABELS, LABELS, 1, 0, seed=3)
    four = [ClassBalancedDistributedSampler(LABELS, LABELS, 4, r, seed=3) for r in range(4)]
    for s in [one, *four]:
        s.set_epoch(5)
    merged = [None] * 140
    for r, s in enumerate(four):
        merged[r::4] = list(s)
    assert merged == list(one)


def test_build_loaders_uses_the_balanced_sampler_only_when_asked():
    ds = torch.utils.data.TensorDataset(torch.zeros(len(LABELS), 1))
    ds.targets = LABELS
    _, _, plain = build_loaders(ds, ds, batch_size=4, eval_batch_size=4, num_workers=0, pin_memory=False, seed=0,
                                world_size=1, rank=0)
    _, _, balanced = build_loaders(ds, ds, batch_size=4, eval_batch_size=4, num_workers=0, pin_memory=False, seed=0,
                                   world_size=1, rank=0, balance="sampler")
    assert type(plain) is DistributedSampler and isinstance(balanced, ClassBalancedDistributedSampler)


def test_class_weights_are_inverse_frequency_with_mean_one():
    w = class_weights(LABELS, 3)
    inv = [1 / 100, 1 / 30, 1 / 10]
    assert w == pytest.approx([3 * x / sum(inv) for x in inv])
    assert sum(w) / 3 == pytest.approx(1.0)
    assert w[2] / w[0] == pytest.approx(10.0)


def test_auto_pos_weight_is_negatives_over_positives_clipped():
    sets = [[0]] * 3 + [[0, 1]] + [[2]] * 196  # label 0: 4 of 200; label 1: 1 of 200; label 2: 196 of 200
    w = auto_pos_weight(sets, 4)
    assert w[0] == pytest.approx(196 / 4)
    assert w[1] == POS_WEIGHT_RANGE[1]  # 199 clipped to 100
    assert w[2] == pytest.approx(4 / 196)
    assert w[3] == POS_WEIGHT_RANGE[1]  # never positive in train: the largest weight
    assert auto_pos_weight([[0]] * 10, 1) == [POS_WEIGHT_RANGE[0]]  # no negatives: clipped to the floor


def test_weighted_cross_entropy_and_bce_with_pos_weight_are_what_they_say():
    torch.manual_seed(0)
    logits = torch.randn(6, 3)
    y = torch.tensor([0, 0, 0, 1, 2, 2])
    w = class_weights(y.tolist(), 3)
    ce, mix = build_losses(num_classes=3, label_smoothing=0.0, mixup=0, cutmix=0, mixup_prob=1.0, class_weight=w)
    assert mix is None
    manual = -(torch.tensor(w)[y] * torch.log_softmax(logits, 1)[torch.arange(6), y]).sum() / torch.tensor(w)[y].sum()
    assert ce(logits, y).item() == pytest.approx(manual.item(), rel=1e-6)

    hot = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.float32)
    pw = [2.0, 0.5, 10.0]
    bce, _ = build_losses(num_classes=3, label_smoothing=0.0, mixup=0, cutmix=0, mixup_prob=1.0, multi_label=True,
                          pos_weight=pw)
    p = torch.sigmoid(logits)
    manual = -(torch.tensor(pw) * hot * torch.log(p) + (1 - hot) * torch.log(1 - p)).mean()
    assert bce(logits, hot).item() == pytest.approx(manual.item(), rel=1e-5)
    smoothed, _ = build_losses(num_classes=3, label_smoothing=0.2, mixup=0, cutmix=0, mixup_prob=1.0, multi_label=True)
    soft = hot * 0.8 + 0.1
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, soft)
    assert smoothed(logits, hot).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("mixup,cutmix", [(0.4, 0.0), (0.0, 1.0)])
def test_mixup_and_cutmix_mix_multi_hot_targets_in_the_images_proportions(mixup, cutmix):
    torch.manual_seed(1)
    loss, mix = build_losses(num_classes=4, label_smoothing=0.0, mixup=mixup, cutmix=cutmix, mixup_prob=1.0,
                             multi_label=True)
    n = 6
    images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, 16, 16).clone()  # image i == i
    targets = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]],
                           dtype=torch.float32)
    for _ in range(5):
        x, y = mix(images.clone(), targets.clone())
        assert y.shape == targets.shape
        # Image i is now a blend of images i and n-1-i: its mean tells the share of image i.
        share = ((x.mean(dim=(1, 2, 3)) - (n - 1 - torch.arange(n))) / (2 * torch.arange(n) - (n - 1))).float()
        expected = share[:, None] * targets + (1 - share[:, None]) * targets.flip(0)
        assert torch.allclose(y, expected, atol=1e-5)
        assert loss(torch.zeros(n, 4), y).item() == pytest.approx(
            torch.nn.functional.binary_cross_entropy_with_logits(torch.zeros(n, 4), y).item())
