"""Multi-label data: the train/val split (iterative stratification), label counts, co-occurrence, report.

An image's labels are a set of label indices. Stratifying class by class is impossible when an image
carries several labels, so the split is Sechidis et al.'s iterative stratification ("On the
Stratification of Multi-Label Data", ECML PKDD 2011): the rarest label is placed first, each of its
images going to the side that still wants most of that label. It keeps every label's val share close
to the split ratio. Written out here (about 40 lines) rather than taken from `iterative-stratification`
on PyPI, which needs scikit-learn and imports its private helpers.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

LabelSet = Sequence[int]


def iterative_split(label_sets: Sequence[LabelSet], num_labels: int, train_fraction: float, seed: int,
                    *, warn: Callable[[str], object] = log.warning,
                    label_names: Sequence[str] | None = None) -> list[bool]:
    """Which images go to val (True) for a train fraction; deterministic for (label sets in order, seed).

    A label with a single image keeps it in train (with a warning); a label with several images but
    none in val gets one moved there when that leaves every label of the moved image some train image.
    """
    from raytimm.data.folder import check_split_ratio

    check_split_ratio(train_fraction)
    names = list(label_names) if label_names is not None else [str(i) for i in range(num_labels)]
    rng = random.Random(f"iterative-split:{seed}")
    n = len(label_sets)
    sets = [sorted(set(s)) for s in label_sets]
    ratios = (float(train_fraction), 1.0 - float(train_fraction))  # side 0 = train, 1 = val
    wanted = [r * n for r in ratios]
    label_counts = count_labels(sets, num_labels)
    wanted_label = [[r * c for c in label_counts] for r in ratios]
    order = list(range(n))
    rng.shuffle(order)  # the order of the input (file names) must not decide which side an image lands on
    remaining = [i for i in order]
    side = [0] * n
    while remaining:
        left = count_labels([sets[i] for i in remaining], num_labels)
        present = [c for c in left if c > 0]
        if not present:  # images without labels: fill whichever side wants most
            for i in remaining:
                s = _pick(wanted, [0, 1], rng)
                side[i], wanted[s] = s, wanted[s] - 1
            break
        rarest = rng.choice([j for j, c in enumerate(left) if c == min(present)])
        still = []
        for i in remaining:
            if rarest not in sets[i]:
                still.append(i)
                continue
            want = [wanted_label[0][rarest], wanted_label[1][rarest]]
            best = [s for s in (0, 1) if want[s] == max(want)]
            s = best[0] if len(best) == 1 else _pick(wanted, best, rng)
            side[i] = s
            wanted[s] -= 1
            for j in sets[i]:
                wanted_label[s][j] -= 1
        remaining = still
    in_val = [s == 1 for s in side]
    fix_small_labels(sets, in_val, num_labels, names, warn)
    return in_val


def _pick(wanted: list[float], candidates: list[int], rng: random.Random) -> int:
    """The candidate side wanting most images; ties broken by the seeded RNG."""
    top = max(wanted[s] for s in candidates)
    return rng.choice([s for s in candidates if wanted[s] == top])


def fix_small_labels(sets: Sequence[Sequence[int]], in_val: list[bool], num_labels: int, names: Sequence[str],
                     warn: Callable[[str], object]) -> None:
    """In place: single-image labels stay in train (warned); a label with >= 2 images and none in val gets
    one moved there when every label of that image keeps a train image."""
    images_of: list[list[int]] = [[] for _ in range(num_labels)]
    for i, s in enumerate(sets):
        for j in s:
            images_of[j].append(i)
    single = {j for j in range(num_labels) if len(images_of[j]) == 1}
    for j in sorted(single):
        i = images_of[j][0]
        in_val[i] = False
        warn(f"label {names[j]!r} has a single image; it stays in train, none in val")
    for j in sorted(range(num_labels), key=lambda j: (len(images_of[j]), j)):
        if len(images_of[j]) < 2 or any(in_val[i] for i in images_of[j]):
            continue

        def train_left(k: int, moved: int) -> int:
            return sum(1 for i in images_of[k] if not in_val[i] and i != moved)

        movable = [i for i in images_of[j] if not any(k in single for k in sets[i])
                   and all(train_left(k, i) >= 1 for k in sets[i])]
        if movable:
            i = min(movable, key=lambda i: (len(sets[i]), i))
            in_val[i] = True
        else:
            warn(f"label {names[j]!r} has no val image: each of its {len(images_of[j])} images is needed in train")


def count_labels(label_sets: Sequence[LabelSet], num_labels: int) -> list[int]:
    """Images per label."""
    counts = [0] * num_labels
    for s in label_sets:
        for j in set(s):
            counts[j] += 1
    return counts


def cooccurrence(label_sets: Sequence[LabelSet], num_labels: int) -> list[list[int]]:
    """Images carrying both labels i and j (the diagonal: images carrying label i)."""
    m = [[0] * num_labels for _ in range(num_labels)]
    for s in label_sets:
        s = sorted(set(s))
        for a in s:
            for b in s:
                m[a][b] += 1
    return m


def format_multilabel_report(class_names: Sequence[str], train: Sequence[LabelSet], val: Sequence[LabelSet],
                             max_matrix: int = 20) -> list[str]:
    """Report lines: images per label in train/val (and val share), labels per image, co-occurrence."""
    from raytimm.data.folder import display_width, pad

    n = len(class_names)
    tr, va = count_labels(train, n), count_labels(val, n)
    width = max([len("label"), *(display_width(c) for c in class_names)])
    lines = [f"  {'idx':>4}  {pad('label', width)}  {'train':>6}  {'val':>6}  {'val %':>6}"]
    for i, name in enumerate(class_names):
        total = tr[i] + va[i]
        share = f"{100.0 * va[i] / total:6.1f}" if total else f"{'-':>6}"
        note = "   (no val images)" if va[i] == 0 else ""
        lines.append(f"  {i:>4}  {pad(name, width)}  {tr[i]:>6}  {va[i]:>6}  {share}{note}")
    every = list(train) + list(val)
    if every:
        sizes = [len(set(s)) for s in every]
        lines.append(f"labels per image: mean {sum(sizes) / len(sizes):.2f}, max {max(sizes)}")
    if n > max_matrix:
        lines.append(f"co-occurrence: {n} labels, more than {max_matrix}: not shown")
        return lines
    m = cooccurrence(every, n)
    lines.append("co-occurrence (images with both labels; train + val; the diagonal: images with the label):")
    cell = max(5, *(len(str(v)) + 1 for row in m for v in row))
    lines.append(f"  {'':>4}  {pad('', width)}" + "".join(f"{i:>{cell}}" for i in range(n)))
    for i, name in enumerate(class_names):
        lines.append(f"  {i:>4}  {pad(name, width)}" + "".join(f"{v:>{cell}}" for v in m[i]))
    return lines
