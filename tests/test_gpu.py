"""CUDA-only checks (marker ``gpu``): AMP + channels_last training steps, GPU batching in the Predictor,
and DDP over NCCL with two Ray Train workers. They skip without a GPU; benchmarks/gpu_check.sh runs them.
"""
from pathlib import Path

import pytest
import torch

from tests.test_predict import CLASSES, color_image, make_trained_checkpoint

REPO = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
pytestmark = [pytest.mark.gpu, needs_cuda]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_channels_last_train_step(amp):
    """train_one_epoch on CUDA under autocast (fp16 with a GradScaler), channels_last: finite loss, weights move."""
    import timm

    from raytimm.engine import build_optimizer, build_scheduler, resolve_amp_dtype, train_one_epoch

    device = torch.device("cuda")
    dtype = resolve_amp_dtype(amp, device)
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=3).to(device, memory_format=torch.channels_last)
    optimizer = build_optimizer(model, opt="adamw", lr=1e-3, weight_decay=0.0, momentum=0.9)
    scheduler = build_scheduler(optimizer, sched="cosine", epochs=1, warmup_epochs=0, warmup_lr=1e-5, min_lr=1e-5,
                                on_updates=True, updates_per_epoch=4, mode="max")
    loader = [(torch.randn(8, 3, 64, 64), torch.randint(0, 3, (8,))) for _ in range(4)]
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    stats, updates = train_one_epoch(model, loader, optimizer, torch.nn.CrossEntropyLoss(), device,
                                     scheduler=scheduler, num_updates=0, scaler=scaler, amp_dtype=dtype,
                                     channels_last=True)
    assert updates == 4 and stats["count"] == 32
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))


def test_predictor_gpu_batching_matches_cpu(tmp_path):
    """Predictor on CUDA (fp16, channels_last) batches several images: same top-1 as one at a time and as the CPU."""
    from raytimm.predict import Predictor

    checkpoint = make_trained_checkpoint(tmp_path / "run")
    images = [color_image(name, seed=s) for name in CLASSES for s in (1, 2)]
    gpu = Predictor.from_checkpoint(checkpoint, device="cuda", batch_size=4)
    cpu = Predictor.from_checkpoint(checkpoint, device="cpu")
    assert gpu.device.type == "cuda" and gpu.runner.dtype == torch.float16
    batched = [r["predicted_class"] for r in gpu.predict(images)]
    single = [gpu.predict([im])[0]["predicted_class"] for im in images]
    assert batched == single == [r["predicted_class"] for r in cpu.predict(images)]
    assert batched == [name for name in CLASSES for _ in (1, 2)]


@needs_two
@pytest.mark.ray
def test_ddp_nccl_two_gpu_workers(tmp_path, monkeypatch):
    """Ray Train with two GPU workers (DDP over NCCL) trains two epochs and publishes a best checkpoint."""
    import ray

    from raytimm import ray_train
    from raytimm.checkpoint import load_meta
    from raytimm.config import load_config
    from raytimm.data.demo import make_demo_dataset

    data = make_demo_dataset(str(tmp_path / "data"), classes=3, per_class=16, size=48, val_fraction=0.25)
    cfg = load_config(str(REPO / "configs" / "quickstart.yaml"), [
        f"data.path={data}", "model.img_size=48", "train.epochs=2", "train.batch_size=8", "train.warmup_epochs=0",
        "scaling.num_workers=2", "scaling.use_gpu=true", "scaling.cpus_per_worker=1", "train.amp='bf16'",
        f"storage.path={tmp_path / 'runs'}", "run.name=ddp", "mlflow.enabled=false"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a Ray of its own, this test only
    ray_train.init_ray()
    try:
        result = ray_train.train(cfg)
    finally:
        ray.shutdown()
    meta = load_meta(result.best_checkpoint)
    assert len(meta["history"]) == 2 and all(h["throughput"] > 0 for h in meta["history"])
