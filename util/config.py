"""Configs: YAML defaults, an example config on top, key=value overrides, validation.

Defaults and their documentation live in configs/<kind>_config.yaml; this module is the
one place that checks values. Every problem is reported as a ConfigError with a one-line
message that names the key and how to fix it.
"""

import argparse
import difflib
import re
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


from util.errors import ConfigError  # noqa: F401  (raised here; importable from here as before)

# ---- value rules --------------------------------------------------------------------------
# type: bool | int | float | str | text (a string or list of strings) | ints (a list of integers) |
#       strs (a list of names from choices) | any
# Keys absent here take the type of their default; None defaults need an entry.
PROB = dict(type="float", min=0.0, max=1.0)
COVER = dict(type="float", min=0.01, max=1.0)
POSITIVE = dict(type="float", min=0.0, exclusive_min=True)
NONNEG = dict(type="float", min=0.0)

# every kind: where and how a run goes
RUN_RULES = {
    "device": dict(type="str", pattern=r"auto|cpu|cuda(:\d+)?|mps"),
    "seed": dict(type="int", min=-1),
    "mixed_precision": dict(type="str", choices=["auto", "bf16", "off"]),
    "lr": POSITIVE,
}

# video editing and atlas training: the video's size and frames
VIDEO_INPUT_RULES = {
    "resx": dict(type="int", min=8),
    "resy": dict(type="int", min=8),
    "maximum_number_of_frames": dict(type="int", min=1),
    "fps": dict(type="int", min=1),
}

# image and video editing: texts, CLIP losses, generator, optimisation, the run folder
EDIT_RULES = {
    "resume": dict(type="str", nullable=True),
    "results_folder": dict(type="str"),
    "write_metrics": dict(type="bool"),
    "wandb_entity": dict(type="str", nullable=True),
    "n_epochs": dict(type="int", min=1),
    "log_images_freq": dict(type="int", min=1),
    "comp_text": dict(type="text", nullable=True),
    "src_text": dict(type="text", nullable=True),
    "screen_text": dict(type="text", nullable=True),
    "bootstrap_text": dict(type="text", nullable=True),
    "bootstrap_negative_text": dict(type="text", nullable=True),
    "bootstrap_negative_map_threshold": PROB,
    "crops_min_cover": COVER,
    "bootstrapping_min_cover": COVER,
    "flip_p": PROB,
    "jitter_p": PROB,
    "clip_affine_transform_fill": PROB,
    "n_aug": dict(type="int", min=1),
    "text_criterion": dict(type="str", choices=["spherical", "cosine"]),
    "structure_loss": dict(type="str", choices=["mse", "fro"]),
    "bootstrap_scheduler": dict(type="str", choices=["linear", "exponential", "none"]),
    "relevancy_num_layers": dict(type="int", min=-1),
    "optimizer": dict(type="str", choices=["madgrad", "adam", "radam", "rmsprop", "sgd"]),
    "scheduler_policy": dict(type="str", choices=["exponential", "none"]),
    "momentum": dict(type="float", min=0.0, max=1.0, exclusive_max=True),
    "weight_decay": NONNEG,
    "gamma": dict(type="float", min=0.0, max=1.0, exclusive_min=True),
    "min_lr": NONNEG,
    "num_scales": dict(type="int", min=1, max=12),
    "skip_n33d": dict(type="int", min=1),
    "skip_n33u": dict(type="int", min=1),
    "skip_n11": dict(type="int", min=0),
    "lambda_composition": NONNEG,
    "lambda_screen": NONNEG,
    "lambda_structure": NONNEG,
    "lambda_sparsity": NONNEG,
    "lambda_alpha_l1": NONNEG,
    "lambda_alpha_l0": NONNEG,
    "lambda_bootstrap": NONNEG,
    "lambda_bootstrap_min": NONNEG,
}

# image editing only
IMAGE_RULES = {
    "image_path": dict(type="str", nullable=True),
    "render": dict(type="str", nullable=True),
    "d_divisible_crops": dict(type="int", min=1),
    "max_megapixels": dict(type="float", min=0.0, exclusive_min=True),
    "scale_min": POSITIVE,
    "scale_max": POSITIVE,
}

# video editing only
VIDEO_RULES = {
    "edit_layer_formats": dict(type="strs", choices=["webm", "prores", "png"]),
    "video_path": dict(type="str", nullable=True),
    "checkpoint_path": dict(type="str", nullable=True),
    "atlases_folder": dict(type="str"),
    "render_foreground": dict(type="str", nullable=True),
    "render_background": dict(type="str", nullable=True),
    "grid_atlas_resolution": dict(type="int", min=8),
    "mask_alpha_threshold": dict(type="float", min=0.0, max=1.0, exclusive_max=True),
    "masks_border_expansion": dict(type="int", min=0),
    "center_frame_distance": dict(type="int", min=0),
}

# atlas training only
NLA_RULES = {
    "iters_num": dict(type="int", min=0),
    "number_of_layers_atlas": dict(type="int", min=2),
    "number_of_layers_alpha": dict(type="int", min=2),
    "number_of_layers_mapping1": dict(type="int", min=2),
    "number_of_layers_mapping2": dict(type="int", min=2),
    "samples_batch": dict(type="int", min=16),
    "atlas_backend": dict(type="str", choices=["grid", "mlp"]),
    "grid_levels": dict(type="int", min=1, max=16),
    "grid_features": dict(type="int", min=1),
    "grid_max_resolution": dict(type="int", min=16, max=16384),
    "grid_mlp_width": dict(type="int", min=1),
    "grid_lr": dict(type="float", min=0.0, exclusive_min=True),
    "grid_mapping_cell": dict(type="int", min=1),
    "grid_mapping_levels": dict(type="int", min=1, max=8),
    "grid_mapping_lr": dict(type="float", min=0.0, exclusive_min=True),
    "grid_mlp_lr": dict(type="float", min=0.0, exclusive_min=True),
    "lr_decay": dict(type="float", min=0.0, max=1.0, exclusive_min=True, nullable=True),
    "pretrain_motion": dict(type="str", choices=["flow", "translation", "off"]),
    "flow_gaps": dict(type="ints", min=1, contains=1),
    "grid_alpha_layers": dict(type="int", min=2),
    "grid_alpha_width": dict(type="int", min=1),
    "grid_alpha_frequencies": dict(type="int", min=0, max=16, nullable=True),
    "grid_mapping_cell_foreground": dict(type="int", min=1, nullable=True),
    "grid_mapping_coarse_to_fine": dict(type="float", min=0.0, max=1.0),
    "grid_mapping_coarse_to_fine_layers": dict(type="str", choices=["both", "foreground", "background"]),
    "derivative_amount": dict(type="int", min=1),
    "pretrain_iter_number": dict(type="int", min=0),
    "uv_mapping_scale": dict(type="float", min=0.05, max=1.0),
    "evaluate_every": dict(type="int", min=1),
    "sample_object_share": dict(type="float", min=0.0, max=1.0, nullable=True),
    "sample_error_share": dict(type="float", min=0.0, max=1.0, nullable=True),
}

# One schema per kind: the keys that mean the same share one rule.
SCHEMAS = {
    "image": {**RUN_RULES, **EDIT_RULES, **IMAGE_RULES},
    "video": {**RUN_RULES, **VIDEO_INPUT_RULES, **EDIT_RULES, **VIDEO_RULES},
    "nla": {**RUN_RULES, **VIDEO_INPUT_RULES, **NLA_RULES},
}

TYPE_NAMES = {"bool": "true/false", "int": "an integer", "float": "a number", "str": "a string",
              "text": "a string or a list of strings", "ints": "a list of integers",
              "strs": "a list of names", "any": "a value"}


def _rule_for(key, default, schema: dict):
    rule = dict(schema.get(key, {}))
    if "type" not in rule:
        if isinstance(default, bool):
            rule["type"] = "bool"
        elif isinstance(default, int):
            rule["type"] = "int"
        elif isinstance(default, float):
            rule["type"] = "float"
        elif isinstance(default, str):
            rule["type"] = "str"
        else:
            rule["type"] = "any"
            rule["nullable"] = True
    return rule


def _check_value(key, value, rule):
    """Return the value, converted where harmless (int -> float); raise ConfigError otherwise."""
    kind = rule["type"]
    if value is None:
        if rule.get("nullable"):
            return None
        raise ConfigError(f"config key '{key}' must be {TYPE_NAMES[kind]}, not null")
    wrong = ConfigError(f"config key '{key}' must be {TYPE_NAMES[kind]}, got {value!r} "
                        f"({type(value).__name__})")
    if kind == "bool":
        if not isinstance(value, bool):
            raise wrong
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise wrong
    elif kind == "float":
        value = _number_or_text(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        value = float(value)
    elif kind == "str":
        if isinstance(value, bool) and "off" in rule.get("choices", ()):
            value = rule["choices"][0] if value else "off"  # YAML reads a bare `off` as false; true: the first choice
        if not isinstance(value, str):
            raise wrong
    elif kind == "text":
        if isinstance(value, str):
            pass
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            value = list(value)
        else:
            raise wrong
    elif kind == "ints":
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]  # key=4 on the command line
        if not isinstance(value, (list, tuple)) or not value or \
                not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise wrong
        value = sorted(set(value))
        if "contains" in rule and rule["contains"] not in value:
            raise ConfigError(f"config key '{key}' must include {rule['contains']}; got {value}")
        low = rule.get("min")
        if low is not None and value[0] < low:
            raise ConfigError(f"config key '{key}' must hold integers >= {low}; got {value}")
        return value
    elif kind == "strs":
        if isinstance(value, str):
            value = [value]  # key=webm on the command line
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise wrong
        unknown = [v for v in value if v not in rule.get("choices", value)]
        if unknown:
            raise ConfigError(f"config key '{key}' takes any of {', '.join(rule['choices'])}; got {unknown[0]!r}")
        return list(dict.fromkeys(value))
    if "choices" in rule and value not in rule["choices"]:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(rule['choices'])}; got {value!r}")
    if "pattern" in rule and not re.fullmatch(rule["pattern"], value):
        raise ConfigError(f"config key '{key}' has an invalid value {value!r} "
                          f"(expected {rule['pattern'].replace('|', ', ')})")
    if "min" in rule:
        low = rule["min"]
        if value < low or (rule.get("exclusive_min") and value == low):
            op = ">" if rule.get("exclusive_min") else ">="
            raise ConfigError(f"config key '{key}' must be {op} {low}; got {value}")
    if "max" in rule:
        high = rule["max"]
        if value > high or (rule.get("exclusive_max") and value == high):
            op = "<" if rule.get("exclusive_max") else "<="
            raise ConfigError(f"config key '{key}' must be {op} {high}; got {value}")
    return value


# ---- reading ------------------------------------------------------------------------------

def read_yaml(path, what: str = "config file", fix: str = "") -> dict:
    """A YAML file of key: value pairs (empty: {}); a one-line ConfigError names `what` is
    wrong, plus `fix` when the file is missing or holds no mapping."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder, not a file{fix}")
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist{fix}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold key: value pairs, not a {type(data).__name__}{fix}")
    return data


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _number_or_text(value):
    """PyYAML reads 1e-3 as a string (YAML 1.1); read such strings as the numbers they are."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    return value


def parse_overrides(args) -> dict:
    out = {}
    for arg in args:
        key, sep, text = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"cannot read argument '{arg}': write overrides as key=value (e.g. n_epochs=300)")
        try:
            out[key.strip()] = _number_or_text(yaml.safe_load(text)) if text.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = text
    return out


def merge(defaults: dict, update: dict, source: str) -> dict:
    """Defaults updated with known keys only; an unknown key names the closest valid one."""
    merged = dict(defaults)
    for key, value in update.items():
        if key not in defaults:
            close = difflib.get_close_matches(str(key), list(defaults), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else "; see the README's config reference"
            raise ConfigError(f"unknown config key '{key}' in {source}{hint}")
        merged[key] = value
    return merged


def validate(cfg: dict, defaults: dict, kind: str) -> dict:
    """Every value checked against its kind's schema (keys without a rule take their default's type)."""
    schema = SCHEMAS[kind]
    return {key: _check_value(key, value, _rule_for(key, defaults.get(key), schema)) for key, value in cfg.items()}


def as_list(text) -> list:
    """A text field (None, a string, or a list of strings) as a list of strings."""
    if text is None:
        return []
    return [text] if isinstance(text, str) else list(text)


def example_path(name: str, kind: str) -> Path:
    """Where the example config `name` (with or without .yaml) of `kind` would be."""
    return CONFIG_DIR / f"{kind}_example_configs" / (name if name.endswith((".yaml", ".yml")) else name + ".yaml")


def resolve_example(name: str, kind: str) -> Path:
    """An example config: a path, or a name (with or without .yaml) in configs/<kind>_example_configs."""
    path = Path(name)
    if path.is_file():
        return path
    folder = CONFIG_DIR / f"{kind}_example_configs"
    candidate = example_path(name, kind)
    if candidate.is_file():
        return candidate
    known = sorted(p.name for p in folder.glob("*.yaml"))
    close = difflib.get_close_matches(path.name, known, n=1, cutoff=0.4)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(f"example config '{name}' not found; {hint}examples: {', '.join(known)}")


def load_config(kind: str, config=None, example=None, overrides=(), source: str = "the command line") -> dict:
    """Defaults (configs/<kind>_config.yaml) <- `config` <- example <- overrides (key=value strings
    or a dict); `source` names where the overrides came from in an error message."""
    defaults = read_yaml(CONFIG_DIR / f"{kind}_config.yaml")
    cfg = dict(defaults)
    if config is not None:
        cfg = merge(cfg, read_yaml(config), str(config))
    if example is not None:
        path = resolve_example(example, kind)
        cfg = merge(cfg, read_yaml(path), str(path))
        cfg["_example"] = path.stem
    if overrides:
        if not isinstance(overrides, dict):
            overrides = parse_overrides(overrides)
        cfg = merge(cfg, overrides, source)
    name = cfg.pop("_example", None) or (Path(config).stem if config else kind)
    cfg = validate(cfg, defaults, kind)
    cfg["_name"] = name
    return cfg


def typed_overrides(argv) -> dict:
    """The key=value overrides typed on a command line (the other arguments left out)."""
    return parse_overrides([a for a in argv if "=" in a and not a.startswith("-")])


def config_parser(kind: str, description: str) -> argparse.ArgumentParser:
    """`--config`, `--example_config` and key=value overrides (a command line may add its own options)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None,
                        help=f"base config replacing configs/{kind}_config.yaml's values")
    parser.add_argument("--example_config", default=None,
                        help=f"example config name in configs/{kind}_example_configs/, or a path")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override any config key")
    return parser


def command_line(kind: str, description: str, argv=None):
    """Parse `--config`, `--example_config` and key=value overrides; return the config dict."""
    args = config_parser(kind, description).parse_intermixed_args(argv)  # key=value before, between or after
    return load_config(kind, args.config, args.example_config, args.overrides)


# ---- one command from a clip to an edit (train_video.py --video) ------------------------------
# The atlas's keys go on train_video.py's command line as nla.<key>=value; the keys that say
# which frames are edited, at what size, serve both stages and are written without the prefix.
ATLAS_PREFIX = "nla."
CLIP_KEYS = ("resx", "resy", "maximum_number_of_frames")


def split_atlas_overrides(overrides: dict) -> tuple[dict, dict]:
    """A video edit's overrides -> (the edit's keys, the atlas's keys without their `nla.`
    prefix). An unknown nla. key names the closest atlas key; an atlas key written without the
    prefix, or a clip key written with it, gets a one-line ConfigError saying how to write it."""
    atlas_defaults = read_yaml(CONFIG_DIR / "nla_config.yaml")
    video_defaults = read_yaml(CONFIG_DIR / "video_config.yaml")
    edit, atlas = {}, {}
    for key, value in overrides.items():
        if not str(key).startswith(ATLAS_PREFIX):
            if key not in video_defaults and key in atlas_defaults:
                raise ConfigError(f"'{key}' is an atlas setting: write {ATLAS_PREFIX}{key}={_shown(value)} "
                                  "(used when train_video.py --video trains the clip's atlas)")
            edit[key] = value
            continue
        name = key[len(ATLAS_PREFIX):]
        if name in CLIP_KEYS or name == "device":
            raise ConfigError(f"{name} serves both the atlas and the edit: write {name}={_shown(value)} "
                              f"without '{ATLAS_PREFIX}'")
        if name not in atlas_defaults:
            close = difflib.get_close_matches(name, list(atlas_defaults), n=1, cutoff=0.5)
            hint = (f"; did you mean '{ATLAS_PREFIX}{close[0]}'?" if close
                    else "; see configs/nla_config.yaml for the atlas keys")
            raise ConfigError(f"unknown config key '{key}' in the command line{hint}")
        atlas[name] = value
    return edit, atlas


def _shown(value) -> str:
    return "..." if value is None else str(value)


def public(cfg: dict) -> dict:
    """The config without internal entries (keys starting with '_'), for saving."""
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def check_texts(cfg: dict, required=("comp_text",)):
    """Text fields: required ones non-empty, no blank entries. comp_text and src_text pair by
    position; lists of different lengths are allowed (the directional loss uses the first
    min(len) pairs, as the official code does)."""
    for key in ("comp_text", "src_text", "screen_text", "bootstrap_text", "bootstrap_negative_text"):
        if key not in cfg:
            continue
        texts = as_list(cfg[key])
        if key in required and not texts:
            raise ConfigError(f"{key} is empty; give the edit's text, e.g. {key}='golden horse'")
        if any(not t.strip() for t in texts):
            raise ConfigError(f"{key} contains an empty prompt; remove it or write some text")


def check_image_config(cfg: dict) -> None:
    """Checks across keys for train_image.py (single values are checked by validate)."""
    if cfg["render"] is None:
        check_texts(cfg)
        if cfg["image_path"] is None and cfg["resume"] is None:
            raise ConfigError("image_path is not set; give the photo to edit, e.g. image_path=data/images/horse.jpg")
    if cfg["scale_min"] > cfg["scale_max"]:
        raise ConfigError(f"scale_min ({cfg['scale_min']}) must not exceed scale_max ({cfg['scale_max']})")
    if cfg["use_negative_bootstrap"] and not as_list(cfg["bootstrap_negative_text"]):
        raise ConfigError("use_negative_bootstrap is true but bootstrap_negative_text is empty; set it or turn it off")


def check_video_config(cfg: dict) -> None:
    """Checks across keys for train_video.py."""
    if cfg["render_foreground"] or cfg["render_background"] or cfg["resume"]:
        return
    check_texts(cfg)
    if cfg["finetune_foreground"] == cfg["finetune_background"]:
        raise ConfigError("set exactly one of finetune_foreground / finetune_background (one atlas per run; "
                          "render_foreground= and render_background= combine two runs)")
    if cfg["use_negative_bootstrap"] and not as_list(cfg["bootstrap_negative_text"]):
        raise ConfigError("use_negative_bootstrap is true but bootstrap_negative_text is empty; set it or turn it off")


def check_mask_labels(labels):
    """The config key mask_labels: None (every non-zero label is the object) or a list of palette
    label indices 1..255 (a bare integer is read as a list of one). ConfigError otherwise."""
    if labels is None:
        return None
    if isinstance(labels, int) and not isinstance(labels, bool):
        labels = [labels]
    if not isinstance(labels, (list, tuple)) or not labels or \
            not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 255 for v in labels):
        raise ConfigError(f"config key 'mask_labels' must be null or a list of palette label indices 1..255 "
                          f"(e.g. mask_labels=[1] or [2,3]), got {labels!r}")
    return sorted(set(labels))


def check_nla_config(cfg: dict) -> None:
    """Checks for train_nla.py beyond single values: the mask labels to keep, the sampling shares."""
    check_mask_labels(cfg["mask_labels"])
    shares = (cfg.get("sample_object_share") or 0.0) + (cfg.get("sample_error_share") or 0.0)
    if shares > 1:
        raise ConfigError(f"sample_object_share + sample_error_share is {shares:g}, more than all of a step's pixels; "
                          "make them add up to at most 1 (e.g. sample_object_share=0.3 sample_error_share=0.3)")


CHECKS = {"image": check_image_config, "video": check_video_config, "nla": check_nla_config}
