"""distributed.py and exact evaluation across ranks, in a real 2-process gloo group (no Ray)."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from raytimm import distributed as du
from raytimm.data.loaders import UnpaddedDistributedSampler
from raytimm.engine import evaluate, evaluate_multilabel

from tests.helpers_net import free_port

NUM_CLASSES = 3
NUM_VAL = 7  # odd: a padding DistributedSampler would count 8 images on 2 ranks



def _val_set() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(NUM_VAL, 3, 32, 32, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    return TensorDataset(images, labels)


def _multilabel_val_set() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(NUM_VAL, 3, 32, 32, generator=g)
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1], [1, 1, 1]],
                           dtype=torch.float32)
    return TensorDataset(images, targets)


def _model() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=NUM_CLASSES).eval()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {"rank": du.get_rank(), "world": du.get_world_size(), "main": du.is_main_process()}
        ds, model = _val_set(), _model()
        # batch 3: rank 0 holds 4 images (2 batches), rank 1 holds 3 (1 batch) -> different batch counts.
        loader = DataLoader(ds, batch_size=3, sampler=UnpaddedDistributedSampler(ds, world, rank))
        result["exact"] = evaluate(model, loader, torch.device("cpu"), num_classes=NUM_CLASSES)
        ml = _multilabel_val_set()
        ml_loader = DataLoader(ml, batch_size=3, sampler=UnpaddedDistributedSampler(ml, world, rank))
        result["multilabel"] = evaluate_multilabel(model, ml_loader, torch.device("cpu"), class_names=list("abc"))
        result["calibrated"] = evaluate_multilabel(model, ml_loader, torch.device("cpu"), class_names=list("abc"),
                                                   calibrate=True)
        padded = DataLoader(ds, batch_size=3, sampler=DistributedSampler(ds, world, rank, shuffle=False))
        result["padded_count"] = evaluate(model, padded, torch.device("cpu"), num_classes=NUM_CLASSES)["num_samples"]

        summed = du.all_reduce_sum(torch.tensor([float(rank + 1)]))
        result["all_reduce"] = summed.item()
        result["gathered"] = du.all_gather_object({"r": rank})

        bn = torch.nn.BatchNorm1d(2)
        bn.running_mean.fill_(float(rank + 10))  # ranks disagree, as after a DDP step
        du.broadcast_buffers(bn)
        result["running_mean"] = bn.running_mean.tolist()
        du.barrier()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _fit_worker(rank: int, world: int, port: int, data_root: str, out_dir: str) -> None:
    """engine.fit on one of 2 gloo ranks with the default DDP wrapping (as under torchrun)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from raytimm.config import config_from_dict
        from raytimm.engine import fit

        cfg = config_from_dict({
            "data": {"path": data_root, "num_workers": 0, "rrc": False, "hflip": 0.0, "color_jitter": 0.0},
            "model": {"name": "test_resnet", "img_size": 32},
            # accumulation exercises DDP no_sync; EMA exercises the second set of buffers to sync.
            "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "threads": 1, "grad_accum_steps": 2, "ema": True,
                      "ema_decay": 0.9},
            "storage": {"path": os.path.join(out_dir, "runs")},
            "run": {"name": "ddp"},
            "mlflow": {"enabled": False},
        })
        # With EMA on, the validated and saved model is the EMA copy: keep a handle on it to compare ranks.
        import timm.utils

        emas = []

        class RecordedEma(timm.utils.ModelEmaV3):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                emas.append(self)

        timm.utils.ModelEmaV3 = RecordedEma  # this spawned process only
        result = fit(cfg, num_threads=1)
        (ema,) = emas
        state = {k: v.clone() for k, v in ema.module.state_dict().items()}
        torch.save({"state": state, "history": result.history, "cm": result.confusion_matrix,
                    "best_checkpoint": result.best_checkpoint}, os.path.join(out_dir, f"fit{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fit_on_two_ranks_keeps_ranks_identical_and_counts_val_once(tmp_path):
    from raytimm import checkpoint as ckpt
    from raytimm.data.demo import make_demo_dataset

    root = make_demo_dataset(tmp_path / "data", classes=3, per_class=12, size=32)  # 9 val images: odd
    mp.spawn(_fit_worker, args=(2, free_port(), root, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"fit{r}.pt", weights_only=True) for r in range(2))
    for k, v in r0["state"].items():  # parameters and BatchNorm buffers alike
        assert torch.equal(v, r1["state"][k]), k
    assert r0["history"] == r1["history"] and [h["epoch"] for h in r0["history"]] == [1, 2]
    assert sum(map(sum, r0["cm"])) == 9
    assert r1["best_checkpoint"] is None  # only rank 0 writes
    best = r0["best_checkpoint"]
    assert ckpt.load_meta(best)["metrics"]["val/top1"] == max(h["val/top1"] for h in r0["history"])


def test_outside_a_process_group():
    assert (du.get_rank(), du.get_world_size(), du.is_main_process()) == (0, 1, True)
    t = torch.tensor([2.0])
    assert du.all_reduce_sum(t) is t and t.item() == 2.0
    assert du.all_gather_object(5) == [5]
    du.barrier()
    du.broadcast_buffers(torch.nn.BatchNorm1d(2))
    assert du.get_device() == torch.device("cpu")


def test_seed_everything_differs_per_rank():
    du.seed_everything(42, 0)
    a = torch.rand(3)
    du.seed_everything(42, 1)
    b = torch.rand(3)
    du.seed_everything(42, 0)
    assert torch.equal(a, torch.rand(3)) and not torch.equal(a, b)


def test_helpers_in_a_gloo_group(two_rank_results):
    r0, r1 = two_rank_results
    assert (r0["rank"], r1["rank"], r0["world"], r0["main"], r1["main"]) == (0, 1, 2, True, False)
    assert r0["all_reduce"] == r1["all_reduce"] == 3.0
    assert r0["gathered"] == r1["gathered"] == [{"r": 0}, {"r": 1}]
    assert r0["running_mean"] == r1["running_mean"] == [10.0, 10.0]


def test_evaluate_is_exact_across_two_ranks(two_rank_results):
    single_loader = DataLoader(_val_set(), batch_size=3)
    single = evaluate(_model(), single_loader, torch.device("cpu"), num_classes=NUM_CLASSES)
    assert single["num_samples"] == NUM_VAL
    for r in two_rank_results:
        ex = r["exact"]
        assert ex["num_samples"] == NUM_VAL
        assert ex["top1"] == pytest.approx(single["top1"])
        assert ex["top5"] == pytest.approx(single["top5"])
        assert ex["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert ex["confusion_matrix"] == single["confusion_matrix"]
        assert sum(map(sum, ex["confusion_matrix"])) == NUM_VAL
        # The naive sampler pads to 8 images: the reason for UnpaddedDistributedSampler.
        assert r["padded_count"] == NUM_VAL + 1


@pytest.mark.parametrize("calibrate", [False, True])
def test_multilabel_evaluate_on_two_ranks_equals_one_process(two_rank_results, calibrate):
    # Gathered scores: every val image once (7 images, an odd count) and the same numbers on both ranks.
    single = evaluate_multilabel(_model(), DataLoader(_multilabel_val_set(), batch_size=3), torch.device("cpu"),
                                 class_names=list("abc"), calibrate=calibrate)
    key = "calibrated" if calibrate else "multilabel"
    r0, r1 = (r[key] for r in two_rank_results)
    assert r0 == r1  # identical on every rank, thresholds included
    assert r0["num_samples"] == single["num_samples"] == NUM_VAL
    for k in ("mAP", "f1_micro", "f1_macro"):
        assert r0[k] == pytest.approx(single[k], abs=1e-9), k
    assert r0["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert r0["thresholds"] == pytest.approx(single["thresholds"], abs=1e-6)
    assert [row["support"] for row in r0["per_class"]] == [4, 4, 4]


def test_unpadded_sampler_is_kept_by_ray_prepare_data_loader():
    # Ray's prepare_data_loader only replaces samplers that are not DistributedSampler instances.
    ds = _val_set()
    parts = [list(UnpaddedDistributedSampler(ds, 3, r)) for r in range(3)]
    assert isinstance(UnpaddedDistributedSampler(ds, 3, 0), DistributedSampler)
    assert sorted(i for p in parts for i in p) == list(range(NUM_VAL))
    assert [len(UnpaddedDistributedSampler(ds, 3, r)) for r in range(3)] == [len(p) for p in parts] == [3, 2, 2]
