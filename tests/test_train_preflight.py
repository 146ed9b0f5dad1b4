"""The driver-side checks `raytimm train` runs before any Ray worker starts (no Ray needed)."""
from pathlib import Path

import pytest

from raytimm.config import load_config
from raytimm.errors import RaytimmError


def _cfg(data, tmp_path, *overrides):
    return load_config(None, [f"data.path={data}", f"data.cache_dir={tmp_path / 'cache'}",
                              f"storage.path={tmp_path / 'runs'}", *overrides])


def test_preflight_converts_dice_once_into_the_cache_the_workers_use(tmp_path):
    from raytimm.data.demo import make_demo_dice
    from raytimm.data.loaders import prepare_dataset_root
    from raytimm.ray_train import preflight

    dice = make_demo_dice(str(tmp_path / "dice"), classes=3, per_class=6, size=16, seed=0)
    cfg = _cfg(dice, tmp_path, "data.format=dice")
    preflight(cfg)
    converted = sorted(p for p in (tmp_path / "cache" / "dice").glob("dice-*") if p.is_dir())
    assert len(converted) == 1 and (converted[0] / "train").is_dir()
    # What a worker resolves is that same conversion, not a second one.
    assert Path(prepare_dataset_root(cfg)) == converted[0]
    assert len([p for p in (tmp_path / "cache" / "dice").glob("dice-*") if p.is_dir()]) == 1


def test_preflight_names_the_bad_key(tmp_path):
    from raytimm.data.demo import make_demo_dataset
    from raytimm.ray_train import preflight

    data = make_demo_dataset(str(tmp_path / "data"), classes=3, per_class=4, size=16, seed=0)
    with pytest.raises(RaytimmError, match=r"model.num_classes=5 but .* has 3 classes"):
        preflight(_cfg(data, tmp_path, "model.num_classes=5"))
    with pytest.raises(RaytimmError, match=r"data.path '.*missing' does not exist"):
        preflight(_cfg(tmp_path / "missing", tmp_path))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(RaytimmError, match=r"data.path '.*a-file' is not a folder"):
        preflight(_cfg(tmp_path / "a-file", tmp_path))
