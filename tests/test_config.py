import os

import pytest

from utils.utils_config import ConfigError, get_config

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# Released values, from the release's configs/ (network, per-GPU batch, lr, epochs, warmup epochs).
RELEASED = {
    "ms1mv2_vit_s": ("vit_s_dp005_mask_0", 512, 1e-3, 35, 3, 85742, 5822653),
    "ms1mv2_vit_b": ("vit_b_dp005_mask_005", 512, 1e-3, 35, 3, 85742, 5822653),
    "ms1mv2_vit_l": ("vit_l_dp005_mask_005", 512, 1e-3, 35, 3, 85742, 5822653),
    "glint360k_vit_s": ("vit_s_dp005_mask_0", 128, 1e-4, 40, 4, 360232, 17091657),
    "glint360k_vit_b": ("vit_b_dp005_mask_005", 128, 1e-4, 40, 4, 360232, 17091657),
    "glint360k_vit_l": ("vit_l_dp005_mask_005", 128, 1e-4, 35, 3, 360232, 17091657),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_configs(name):
    cfg = get_config(os.path.join(CONFIG_DIR, name + ".py"))
    network, batch, lr, epochs, warmup, classes, images = RELEASED[name]
    assert (cfg.network, cfg.batch_size, cfg.lr, cfg.num_epoch, cfg.warmup_epoch) == (network, batch, lr, epochs, warmup)
    assert (cfg.num_classes, cfg.num_image) == (classes, images)
    assert tuple(cfg.margin_list) == (1.0, 0.5, 0.0)
    assert (cfg.optimizer, cfg.weight_decay, cfg.sample_rate, cfg.embedding_size) == ("adamw", 0.1, 1.0, 512)
    assert (cfg.amp, cfg.dpap, cfg.ehsm, cfg.seed) == ("fp16", True, True, 2048)
    assert cfg.output == os.path.join("work_dirs", name)


def test_base_defaults_and_forms_of_path():
    cfg = get_config(os.path.join(CONFIG_DIR, "tiny_cpu"))  # without .py
    assert cfg.output == os.path.join("work_dirs", "tiny_cpu")
    assert (cfg.seed, cfg.gradient_acc, cfg.frequent, cfg.momentum, cfg.sample_rate) == (2048, 1, 5, 0.9, 1.0)
    assert cfg.amp == "none" and cfg.dpap is True and cfg.ehsm is True


def test_overrides_are_typed_from_base():
    cfg = get_config(os.path.join(CONFIG_DIR, "tiny_cpu.py"),
                     opts=["lr=0.01", "batch_size=64", "fp16=false", "val_targets=['lfw']",
                           "margin_list=(1.0,0.0,0.4)", "output=/tmp/x", "num_image=1e4", "dpap=False"])
    assert cfg.lr == 0.01 and isinstance(cfg.lr, float)
    assert cfg.batch_size == 64 and isinstance(cfg.batch_size, int)
    assert cfg.fp16 is False and cfg.dpap is False
    assert cfg.val_targets == ["lfw"]
    assert tuple(cfg.margin_list) == (1.0, 0.0, 0.4)
    assert cfg.output == "/tmp/x"
    assert cfg.num_image == 10000


def test_cnn_defaults_switch_method_off():
    cfg = get_config(os.path.join(CONFIG_DIR, "tiny_cpu.py"), opts=["network=r50", "network_kwargs={}"])
    assert cfg.dpap is False and cfg.ehsm is False


@pytest.mark.parametrize("opts, error, text", [
    (["lrr=0.1"], ConfigError, "unknown config field 'lrr'"),
    (["batch_size=abc"], ValueError, "batch_size=abc"),
    (["fp16=maybe"], ValueError, "boolean"),
    (["lr"], ValueError, "key=value"),
    (["amp=fp8"], ValueError, "amp must be one of"),
    (["optimizer=lamb"], ValueError, "optimizer"),
])
def test_bad_overrides_are_clear_errors(opts, error, text):
    with pytest.raises(error, match=text):
        get_config(os.path.join(CONFIG_DIR, "tiny_cpu.py"), opts=opts)


def test_unknown_field_in_job_config(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("config = {'network': 'vit_s', 'leraning_rate': 1.0}\n")
    with pytest.raises(ConfigError, match="leraning_rate"):
        get_config(str(path))
    with pytest.raises(FileNotFoundError, match="nope"):
        get_config(str(tmp_path / "nope.py"))
