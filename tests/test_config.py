import pytest

from util.config import ConfigError, check_image_config, load_config, parse_overrides


def test_defaults_example_and_overrides_stack():
    cfg = load_config("image", example="golden_horse.yaml", overrides=["n_epochs=300", "device=cpu", "seed=7"])
    assert cfg["comp_text"] == "golden horse" and cfg["bootstrap_epoch"] == 1000
    assert cfg["n_epochs"] == 300 and cfg["device"] == "cpu" and cfg["seed"] == 7
    assert cfg["lambda_sparsity"] == 6.0 and cfg["n_aug"] == 16 and cfg["_name"] == "golden_horse"
    assert load_config("image", example="golden_horse")["_name"] == "golden_horse"


def test_official_keys_and_values_are_accepted(tmp_path):
    official = tmp_path / "official.yaml"
    official.write_text('image_path: "./data/images/horse.jpg"\nscreen_text: "golden horse"\n'
                        'comp_text: "golden horse"\nsrc_text: "horse"\nbootstrap_text: "horse"\n'
                        'bootstrap_epoch: 1000\nd_divisible_crops: 1\nuse_wandb: False\n'
                        'wandb_entity: someone\nbootstrapping_min_cover: 1\n')
    cfg = load_config("image", example=str(official))
    assert cfg["bootstrapping_min_cover"] == 1.0 and cfg["d_divisible_crops"] == 1


def test_base_config_then_example(tmp_path):
    base = tmp_path / "my_base.yaml"
    base.write_text("lr: 0.001\nn_aug: 4\n")
    cfg = load_config("image", config=str(base), example="chelsea_leopard", overrides=["n_aug=8"])
    assert cfg["lr"] == 0.001 and cfg["n_aug"] == 8 and cfg["image_path"] == "skimage:chelsea"


def test_unknown_key_names_the_closest():
    with pytest.raises(ConfigError, match="unknown config key 'n_epoch'.*did you mean 'n_epochs'"):
        load_config("image", overrides=["n_epoch=3"])


@pytest.mark.parametrize("arg, message", [
    ("n_epochs=abc", "must be an integer"),
    ("lr=-1", "must be >"),
    ("flip_p=1.5", "must be <= 1"),
    ("text_criterion=l2", "must be one of spherical, cosine"),
    ("device=gpu", "invalid value"),
    ("use_wandb=maybe", "must be true/false"),
    ("comp_text=3", "a string or a list of strings"),
    ("n_epochs", "key=value"),
])
def test_wrong_values_are_one_line_errors(arg, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config("image", overrides=[arg])
    assert "\n" not in str(e.value)


def test_cross_key_checks():
    cfg = load_config("image", overrides=["image_path=x.jpg"])
    with pytest.raises(ConfigError, match="comp_text is empty"):
        check_image_config(cfg)
    cfg = load_config("image", overrides=["image_path=x.jpg", "comp_text=''"])
    with pytest.raises(ConfigError, match="empty prompt"):
        check_image_config(cfg)
    # lists of different lengths are the official lucia_winter example's texts: accepted
    cfg = load_config("image", overrides=["image_path=x.jpg", "comp_text=[a, b, c]", "src_text=[x, y]"])
    check_image_config(cfg)
    cfg = load_config("image", overrides=["image_path=x.jpg", "comp_text=a", "scale_min=2", "scale_max=1"])
    with pytest.raises(ConfigError, match="scale_min"):
        check_image_config(cfg)


def test_missing_example_suggests():
    with pytest.raises(ConfigError, match="did you mean 'golden_horse.yaml'"):
        load_config("image", example="golden_hors.yaml")


def test_override_values_are_yaml():
    assert parse_overrides(["a=[x, y]", "b=1e-3", "c=true", "d=hello world"]) == \
        {"a": ["x", "y"], "b": 1e-3, "c": True, "d": "hello world"}


def test_integer_lists():
    assert load_config("nla", overrides=["flow_gaps=[4, 1, 2, 2]"])["flow_gaps"] == [1, 2, 4]
    assert load_config("nla", overrides=["flow_gaps=1"])["flow_gaps"] == [1]
    for arg, message in (("flow_gaps=[2, 4]", "must include 1"), ("flow_gaps=[1, 0]", "integers >= 1"),
                         ("flow_gaps=[1, 2.5]", "a list of integers"), ("flow_gaps=[]", "a list of integers")):
        with pytest.raises(ConfigError, match=message):
            load_config("nla", overrides=[arg])


def test_each_kind_has_its_schema_and_cross_key_checks():
    from util.config import CHECKS, SCHEMAS, check_nla_config
    assert set(SCHEMAS) == set(CHECKS) == {"image", "video", "nla"}
    assert SCHEMAS["image"]["n_epochs"] is SCHEMAS["video"]["n_epochs"]  # shared keys share one rule
    assert "n_epochs" not in SCHEMAS["nla"] and "iters_num" not in SCHEMAS["image"]
    for kind in SCHEMAS:  # every default file passes its own schema
        load_config(kind)
    cfg = load_config("nla", overrides=["mask_labels=[0]"])
    with pytest.raises(ConfigError, match="mask_labels"):
        check_nla_config(cfg)
    cfg = load_config("video", overrides=["comp_text=snow", "finetune_foreground=true"])
    with pytest.raises(ConfigError, match="exactly one"):
        CHECKS["video"](cfg)
