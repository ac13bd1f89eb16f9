"""Config loading: configs/base.py, then the job config, then command-line overrides.

    cfg = get_config("configs/ms1mv2_vit_s.py", opts=["lr=0.01", "batch_size=64"])

Fields a job config or an override names must exist in base.py, so a typo is an error rather than a silently
ignored setting. Overrides are typed from the base value. A config file is Python and is executed: use only configs
you wrote or trust (docs/safety.md). Every problem is a ConfigError naming the file or the override.
"""
import ast
import importlib.util
import os

from easydict import EasyDict as edict

from backbones import is_vit
from utils.amp import AMP_MODES
from utils.cli import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(REPO_ROOT, "configs", "base.py")
LR_SCALING = ("none", "linear", "sqrt")  # how lr follows the total batch (finetune.scaled_lr)


class ConfigError(UserError):
    """A config file, field or override is wrong; the message names it."""


def load_config_module(path):
    """Execute a config file and return its `config` EasyDict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    if not path.endswith(".py"):
        raise ConfigError(f"{path}: a config must be a Python file (.py), see configs/base.py")
    name = "transface_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # the config's own error (a syntax error, a wrong file given as --config, ...)
        raise ConfigError(f"{path}: not a valid config file: {type(error).__name__}: "
                          f"{' '.join(str(error).split())[:200]}") from error
    if not isinstance(getattr(module, "config", None), dict):
        raise ConfigError(f"{path} must define a dict named `config` (see configs/base.py)")
    return module.config


def resolve_config_path(path):
    """Accept 'configs/x.py', 'configs/x' and 'configs.x' (the released train.py used the dotted form)."""
    if os.path.isfile(path):
        return path
    for candidate in (path + ".py", path.replace(".", os.sep) + ".py"):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"config file not found: {path} (also tried {path}.py)")


def parse_override(key, text, default):
    """Turn the string of a `key=value` override into the type of the base value."""
    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"override {key}={text}: expected a boolean (true/false)")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            pass
        try:
            value = float(text)  # allow 1e5-style integers
        except ValueError:
            value = None
        if value is None or value != int(value):
            raise ConfigError(f"override {key}={text}: expected an integer")
        return int(value)
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"override {key}={text}: expected a number") from None
    if isinstance(default, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if default is None:
            return text  # a None default (e.g. output, amp) takes a plain string
        raise ConfigError(f"override {key}={text}: expected a Python literal like {default!r}") from None
    if isinstance(default, dict) and isinstance(value, dict):
        return value
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if default is not None:
        raise ConfigError(f"override {key}={text}: expected a {type(default).__name__}")
    return value


# arcface_torch configs carry the W&B API key as config.wandb_key: a secret never belongs in a config file
KEY_FIELDS = ("wandb_key", "wandb_api_key")


def refuse_key_fields(names, where):
    for name in names:
        if name in KEY_FIELDS:
            raise ConfigError(f"{where}: config field '{name}' is not accepted: an API key does not belong in a "
                              "config; set the environment variable WANDB_API_KEY (or run `wandb login`)")


def apply_overrides(cfg, base, opts):
    for item in opts or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        refuse_key_fields([key], f"override '{key}=...'")
        if key not in base:
            raise ConfigError(f"unknown config field '{key}' in override '{item}'; "
                              f"valid fields: {', '.join(sorted(base))}")
        cfg[key] = parse_override(key, text, base[key])


def resolve_derived(cfg, config_path):
    vit = is_vit(cfg.network)
    if cfg.amp is None:
        cfg.amp = "fp16" if cfg.fp16 else "none"
    if cfg.amp not in AMP_MODES:
        raise ConfigError(f"config field amp must be one of {AMP_MODES}, got {cfg.amp!r}")
    if cfg.dpap is None:
        cfg.dpap = vit
    if cfg.ehsm is None:
        cfg.ehsm = vit
    if (cfg.dpap or cfg.ehsm) and not vit:
        raise ConfigError(f"dpap/ehsm need a ViT backbone (they use its patch outputs); network is {cfg.network}")
    if cfg.loss not in ("combined", "adaface"):
        raise ConfigError(f"config field loss must be 'combined' or 'adaface', got {cfg.loss!r}")
    if cfg.using_wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("using_wandb=True needs the wandb package, which is not installed: pip install wandb")
    if cfg.optimizer not in ("sgd", "adamw"):
        raise ConfigError(f"config field optimizer must be 'sgd' or 'adamw', got {cfg.optimizer!r}")
    for key in ("save_every_steps", "save_every_minutes"):
        if cfg[key] < 0:
            raise ConfigError(f"config field {key} must be >= 0 (0: off), got {cfg[key]!r}")
    if cfg.keep_checkpoints < 1:
        raise ConfigError(f"config field keep_checkpoints must be >= 1, got {cfg.keep_checkpoints!r}")
    if cfg.lr_scaling not in LR_SCALING:
        raise ConfigError(f"config field lr_scaling must be one of {LR_SCALING}, got {cfg.lr_scaling!r}")
    if cfg.backbone_lr_scale < 0 or not 0 < cfg.layer_decay <= 1:
        raise ConfigError(f"need backbone_lr_scale >= 0 and 0 < layer_decay <= 1, got {cfg.backbone_lr_scale} and "
                          f"{cfg.layer_decay}")
    if cfg.layer_decay != 1 and not vit:
        raise ConfigError(f"layer_decay counts transformer blocks: it needs a ViT backbone; network is {cfg.network}")
    if cfg.output is None:
        cfg.output = os.path.join("work_dirs", os.path.splitext(os.path.basename(config_path))[0])


def get_config(config_file, opts=None):
    """Return the EasyDict for `config_file` with base defaults, the job's values and `opts` applied."""
    base = load_config_module(BASE_CONFIG)
    path = resolve_config_path(config_file)
    job = load_config_module(path)
    refuse_key_fields(job, path)
    unknown = sorted(set(job) - set(base))
    if unknown:
        raise ConfigError(f"{path}: unknown config field(s) {unknown}; every field must exist in configs/base.py")
    cfg = edict(dict(base))
    cfg.update(job)
    apply_overrides(cfg, base, opts)
    resolve_derived(cfg, path)
    cfg.config_file = path
    return cfg
