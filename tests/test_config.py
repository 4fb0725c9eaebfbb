"""Typed config: overrides are validated, unknown keys rejected, YAML round-trips."""

import pytest
import yaml

from sslbench.config import build_config, config_from_dict, dump_yaml, to_dict
from sslbench.core.errors import UserError


def test_defaults_and_recipe_fill():
    cfg = build_config()
    assert cfg.method == "simclr" and cfg.data == "digits"
    assert cfg.optimizer is not None and cfg.lr is not None and cfg.weight_decay is not None


@pytest.mark.parametrize(
    "data,size",
    [("digits", 16), ("fashion-mnist", 28), ("cifar10", 32), ("cifar100", 32), ("stl10", 96), ("imagefolder:/x", 32), ("hf:user/set", 32)],
)
def test_image_size_defaults_to_the_data_and_a_flag_wins(data, size):
    assert build_config(flags={"data": data}).image_size == size
    assert build_config(flags={"data": data, "image_size": 24}).image_size == 24
    assert build_config(flags={"data": data}, sets=["image_size=40"]).image_size == 40


def test_set_routes_to_sections_and_coerces_types():
    cfg = build_config(sets=["temperature=0.2", "aug.jitter_strength=1.0", "backbone_kwargs.channels=16,32,64,128", "lr=0.5", "channels_last=false"])
    assert cfg.method_cfg.temperature == 0.2
    assert cfg.aug.jitter_strength == 1.0
    assert cfg.backbone_kwargs["channels"] == (16, 32, 64, 128)
    assert cfg.lr == 0.5 and cfg.channels_last is False


@pytest.mark.parametrize(
    "sets,match",
    [
        (["temprature=0.2"], "unknown config key 'temprature'.*temperature"),
        (["aug.blurp=1"], "unknown config key 'aug.blurp'"),
        (["batch_size=abc"], "batch_size expects int"),
        (["lr=-1"], "lr must be > 0"),
        (["temperature=0"], "temperature must be > 0"),
        (["aug.flip_p=1.5"], r"probability in \[0, 1\]"),
        (["nonsense"], "key=value"),
    ],
)
def test_bad_overrides_are_user_errors(sets, match):
    with pytest.raises(UserError, match=match):
        build_config(sets=sets)


def test_yaml_round_trip_is_exact():
    cfg = build_config(flags={"epochs": 3, "batch_size": 64}, sets=["backbone_kwargs.channels=16,32,64,128", "aug.crop_scale=0.2,1.0"])
    again = config_from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert to_dict(again) == to_dict(cfg)


def test_set_method_picks_that_methods_config():
    """`--set method=byol` built a SimCLRConfig for a BYOL run (an AttributeError traceback)."""
    cfg = build_config(sets=["method=byol", "pred_hidden_dim=64"])
    assert cfg.method == "byol" and type(cfg.method_cfg).__name__ == "BYOLConfig" and cfg.method_cfg.pred_hidden_dim == 64


def test_none_unsets_optional_string_fields_as_it_does_numbers():
    cfg = build_config(sets=["cache_dir=none", "optimizer=null", "grad_clip=none"])
    assert cfg.cache_dir is None and cfg.grad_clip is None
    assert cfg.optimizer == build_config().optimizer  # unset: the method's recipe fills it


@pytest.mark.parametrize(
    "values, match",
    [
        ({"batch_size": float("inf")}, "batch_size expects a finite int"),
        ({"lr": float("nan")}, "lr expects a finite float"),
        ({"aug": [1, 2]}, "aug in the config file must be a mapping"),
        ({"backbone_kwargs": "abc"}, "backbone_kwargs in the config file must be a mapping"),
        ({7: 1}, "unknown config key '7'"),
    ],
)
def test_malformed_config_values_are_user_errors(values, match):
    with pytest.raises(UserError, match=match):
        build_config(file_values=values)


def test_a_config_file_given_with_resume_changes_only_the_keys_it_names():
    """`--resume --config PART.yaml` replaced whole sections: every aug/method_cfg/backbone_kwargs
    value the file did not name went back to its default (flip_p 0.1 -> 0.5, temperature 0.2 -> 0.5)."""
    from sslbench.commands.cli import merge_config_values

    saved = to_dict(build_config(sets=["aug.flip_p=0.1", "temperature=0.2", "backbone_kwargs.channels=8,16,32,64"]))
    merged = merge_config_values(saved, {"aug": {"blur_p": 0.2}, "method_cfg": {"proj_dim": 64}, "lr": 0.3})
    cfg = build_config(file_values=merged)
    assert (cfg.aug.flip_p, cfg.aug.blur_p, cfg.method_cfg.temperature, cfg.method_cfg.proj_dim, cfg.lr) == (0.1, 0.2, 0.2, 64, 0.3)
    assert cfg.backbone_kwargs["channels"] == (8, 16, 32, 64)
