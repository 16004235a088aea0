"""TrainConfig: every option of a training run as one frozen value (the CLI only builds this)."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from clip_pacl.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # auto: bf16 where the CPU or GPU has native bf16 (device.py)
# `clip-pacl train`'s PACL flags (argparse dests) and the PACLConfig fields they set in TrainConfig.pacl
PACL_FLAGS = {"pacl_unfreeze_blocks": "unfreeze_last_n_blocks", "pacl_pool_temperature": "pool_temperature",
              "pacl_patch_tokens": "patch_tokens"}


def pacl_flag(key: str) -> str:
    """The command-line flag that sets PACLConfig field `key` ("--pacl-pool-temperature"), or the `pacl` entry
    of a --config file for fields without a flag."""
    flag = next((f for f, k in PACL_FLAGS.items() if k == key), None)
    return f"--{flag.replace('_', '-')}" if flag else f'"pacl": {{"{key}": ...}}'


@dataclass(frozen=True)
class TrainConfig:
    """A training run. `batch_size` is per process and per micro-batch: each optimiser step contrasts
    `batch_size * accum * world_size` pairs. Exactly one of `steps` / `epochs` sets the length
    (neither: 1 epoch)."""

    data: str
    model: str
    out: str
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 5e-4
    wd: float = 0.01  # PyTorch's AdamW default (open_clip's script: 0.2), on weights only (train/optim.py)
    # The recipe defaults are what learned best in benchmarks/recipes.py's comparison against open_clip's training
    # script and a plain AdamW + OneCycleLR loop: PyTorch's AdamW moments, no clipping, no crops, a one-cycle
    # schedule with a long warmup (README "Training recipes" has the settings compared, the commands and results).
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup: int | None = None  # None: schedule.default_warmup(total steps): 30% of the run, at most 10,000
    schedule: str = "onecycle"  # or "cosine" (train/schedule.py)
    grad_clip: float | None = None  # None or 0: no clipping; open_clip's script does not clip either
    image_size: int | None = None  # None: the model's own
    augment: bool = False  # True: random resized crops (scale 0.9-1, open_clip's); False: the eval transform
    objective: str | None = None  # None: the model's own (`model.objectives[0]`: clip for a CLIP, pacl for a PACL)
    precision: str = "fp32"
    accum: int = 1
    grad_checkpointing: bool = False
    compile: bool = False
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_text: bool = False
    cache_features: bool = False  # PACL: encode the data with the frozen CLIP once (train/feature_cache.py)
    # PACL: the PACLConfig fields the user set (--pacl-* flags, or a "pacl" object in --config), as open_clip nests
    # vision_cfg / text_cfg; the defaults are PACLConfig's own. A new PACL is PACLConfig(**pacl); a PACL checkpoint
    # takes them in place of its saved values (the ones it cannot change, such as hidden_dim, are refused).
    pacl: dict[str, Any] = field(default_factory=dict)
    local_loss: bool = False
    resume: str | None = None  # "auto" or a checkpoint / run directory
    device: str | None = None
    seed: int = 0
    workers: int | None = None  # None: data.dataset.default_workers(), min(4, CPUs - 1), set in __post_init__
    data_format: str | None = None
    image_key: str = "image"
    caption_key: str = "caption"
    images_dir: str | None = None  # COCO / Flickr: the image folder, when it is not found beside the annotations
    val_data: str | None = None
    val_fraction: float = 0.0
    val_every: int | None = None  # None: validate at the end only (when there is validation data)
    save_every: int | None = None  # None: only the final checkpoint
    keep: int = 2
    max_bad_fraction: float = 0.01
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        """Reject inconsistent options before any work starts."""
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give --steps or --epochs, not both")
        for name in ("batch_size", "accum", "log_every", "keep", "steps", "epochs", "val_every", "save_every",
                     "image_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
        if self.lr <= 0 or self.wd < 0 or (self.warmup is not None and self.warmup < 0):
            raise ConfigError("--lr must be > 0, --wd >= 0 and --warmup >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1) or self.eps <= 0:
            raise ConfigError(f"--beta1 and --beta2 must be in [0, 1) and --eps > 0, not {self.beta1}, {self.beta2}, "
                              f"{self.eps}")
        from clip_pacl.train.schedule import SCHEDULES  # not at the top: the CLI reads the defaults without torch

        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, not '{self.schedule}'")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ConfigError(f"--grad-clip must be >= 0 (0: no clipping), not {self.grad_clip}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{self.precision}'")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), not {self.val_fraction}")
        if self.val_data is not None and self.val_fraction > 0:
            raise ConfigError("give --val-data or --val-fraction, not both")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"--max-bad-fraction must be in [0, 1], not {self.max_bad_fraction}")
        if self.lock_image_unlocked_groups and not self.lock_image:
            raise ConfigError("--lock-image-unlocked-groups needs --lock-image")
        if self.workers is None:  # resolved here, so the saved config and every loader use one number
            from clip_pacl.data.dataset import default_workers

            object.__setattr__(self, "workers", default_workers())
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, not {self.workers}")
        self._check_pacl()

    def _check_pacl(self) -> None:
        """The PACL options: valid PACLConfig values, and only with --objective pacl (once it is known: a config
        whose objective is the model's is checked again when the model has named it)."""
        from clip_pacl.config import PACLConfig

        unknown = sorted(set(self.pacl) - {f.name for f in fields(PACLConfig)})
        if unknown:
            raise ConfigError(f"unknown PACL option(s): {', '.join(unknown)}")
        PACLConfig(**self.pacl)  # its own checks (pool_temperature > 0, ...)
        if self.cache_features and self.pacl.get("unfreeze_last_n_blocks"):
            raise ConfigError("--cache-features needs a frozen image tower; drop it or --pacl-unfreeze-blocks")
        if self.cache_features and self.augment:
            raise ConfigError("--augment does not apply to --cache-features: each image is encoded once, without "
                              "augmentation; drop one of them")
        if self.objective is None:
            return
        if self.objective == "pacl" and (self.lock_image or self.lock_text):
            raise ConfigError("--lock-image / --lock-text do not apply to --objective pacl: PACL keeps its CLIP frozen "
                              "and trains only its embedders (--pacl-unfreeze-blocks N also trains image blocks)")
        if self.cache_features and self.objective != "pacl":
            raise ConfigError(f"--cache-features is for --objective pacl (features of a frozen CLIP), not "
                              f"{self.objective}")
        if self.pacl and self.objective != "pacl":
            given = ", ".join(pacl_flag(key) for key in sorted(self.pacl))
            raise ConfigError(f"{given} {'is' if len(self.pacl) == 1 else 'are'} for --objective pacl, not "
                              f"{self.objective}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`. The PACL flags' own names (`pacl_pool_temperature`, as --config files and older
        train_config.json files write them) go into `pacl`."""
        d = dict(d)
        pacl = d.pop("pacl", None) or {}
        if not isinstance(pacl, dict):
            raise ConfigError(f'"pacl" must be an object of PACL options ({{"pool_temperature": 0.05}}), not {pacl!r}')
        pacl = dict(pacl)
        for flag, key in PACL_FLAGS.items():
            if flag in d:
                pacl[key] = d.pop(flag)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**d, pacl=pacl)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Flag values from a JSON file (`{"lr": 1e-3, "batch-size": 32}`; dashes or underscores)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a JSON object of flag values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def train_defaults() -> dict[str, Any]:
    """TrainConfig's default of every field by name; the required fields (data, model, out) map to None, `pacl` to
    {} (no override: PACLConfig's defaults, `pacl_defaults()`)."""
    return {f.name: f.default_factory() if f.default_factory is not MISSING else None if f.default is MISSING
            else f.default for f in fields(TrainConfig)}


def pacl_defaults() -> dict[str, Any]:
    """What a new PACL gets for each PACL flag the user leaves out, by flag dest: PACLConfig's defaults."""
    from clip_pacl.config import PACLConfig

    defaults = PACLConfig()
    return {flag: getattr(defaults, key) for flag, key in PACL_FLAGS.items()}
