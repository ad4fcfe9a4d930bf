"""Every knob of a run, in one place.

Defaults are the published HREM recipe (docs/deviations.md lists where we differ); the
small CPU configs under ``configs/`` override a few of them. A config is three
plain dataclasses so it can travel as a dict (Ray, JSON, YAML, checkpoints) and
be rebuilt with unknown keys rejected.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hrem_ray.options import CLI_FLAGS, cli_flag


class ConfigError(ValueError):
    """A config key or value that cannot be used."""


@dataclass
class ModelConfig:
    """Architecture and loss of HREM (docs/method.md §2-5)."""

    bert_path: str = ""  # folder with config.json + vocab.txt (+ weights when pretrained)
    img_dim: int = 2048
    embed_size: int = 1024
    mlp_hidden: int = 512  # hidden width of the image tower's residual MLP
    num_heads: int = 16  # heads of every Transformer layer (fragment and instance level)
    ff_dim: int = 1024
    dropout: float = 0.1
    maxk: int = 2  # max-k pooling
    residual_weight: float = 0.8  # v = w * maxk + (1 - w) * transformer mean
    # instance-level relation module
    num_layers_enc: int = 1  # relation depth
    mask_weight: float = 1.0  # lambda: scale of the relevance attention bias
    threshold: float = 0.5  # k_B = int(B * threshold) connections per node
    frag_topk: int = 10  # top-k fragment maxima fed to the cross-modal MLPs
    frag_min_words: int = 10  # words used per caption: max(len, frag_min_words)
    frag_chunk: int = 0  # captions scored at once (docs/global-batch.md); 0: from a budget
    kl_weight: float = 10.0
    warmup: int = 8000  # iterations before the relation module is switched on
    cross_loss: bool = True  # the relation terms include L(v, t^) and L(v^, t)
    img_norm: bool = True  # L2-normalise the image embedding (authors' no_imgnorm inverted)
    txt_norm: bool = True  # L2-normalise the caption embedding (no_txtnorm inverted)
    # losses: "trip" (distance-weighted triplet) or "vse" (VSE++ hinge); base is L(v, t),
    # relation the relation-enhanced terms. The key ``model.loss`` sets both.
    base_loss: str = "trip"
    relation_loss: str = "trip"
    margin: float = 0.2
    cutoff: float | None = None  # negative sampler's distance cut-off; null: 1.9 coco, else 1.7
    dw_dim: int = 512  # d of the distance-weighted sampler
    max_violation: bool = True  # VSE++: hardest negative, once vse_mean_warmup_epochs are done
    vse_mean_warmup_epochs: int = 1  # VSE++ sums over all negatives for this many epochs
    mask_repeat: bool = True  # VSE++: other captions of the same image are not negatives

    @property
    def loss(self) -> str:
        """The older single loss key: both losses, when they agree."""
        if self.base_loss != self.relation_loss:
            raise ConfigError(
                f"model.loss is ambiguous: base_loss={self.base_loss!r}, "
                f"relation_loss={self.relation_loss!r}"
            )
        return self.base_loss

    @loss.setter
    def loss(self, kind: str) -> None:
        self.base_loss = self.relation_loss = kind

    def resolve_cutoff(self, dataset: str = "f30k") -> float:
        """``cutoff``, or when null the authors' value for ``dataset`` (1.9 coco, else 1.7);
        a model config on its own counts as the default dataset."""
        if self.cutoff is not None:
            return self.cutoff
        return 1.9 if dataset == "coco" else 1.7

    def validate(self) -> None:
        for key in ("base_loss", "relation_loss"):
            _check(getattr(self, key) in ("trip", "vse"), f"model.{key}", "must be 'trip' or 'vse'")
        _check(self.cutoff is None or self.cutoff > 0, "model.cutoff", "must be > 0 or null")
        _check(self.vse_mean_warmup_epochs >= 0, "model.vse_mean_warmup_epochs", "must be >= 0")
        _check(
            self.embed_size % self.num_heads == 0,
            "model.embed_size",
            "must be divisible by num_heads",
        )
        _check(0.0 < self.threshold <= 1.0, "model.threshold", "must be in (0, 1]")
        _check(self.num_layers_enc >= 1, "model.num_layers_enc", "must be >= 1")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _check(0.0 <= self.residual_weight <= 1.0, "model.residual_weight", "must be in [0, 1]")
        _check(self.maxk >= 1 and self.frag_topk >= 1, "model.maxk", "maxk/frag_topk must be >= 1")
        _check(self.margin >= 0.0, "model.margin", "must be >= 0")
        _check(self.warmup >= 0, "model.warmup", "must be >= 0")
        _check(self.frag_chunk >= 0, "model.frag_chunk", "must be >= 0 (0: automatic)")
        _check(self.kl_weight >= 0.0, "model.kl_weight", "must be >= 0")


@dataclass
class DataConfig:
    """Where the precomp features live and how captions become tokens (docs/data.md)."""

    data_path: str = "data"
    dataset: str = "f30k"  # folder <data_path>/<dataset>_precomp
    train_split: str = "train"
    val_split: str = "dev"
    max_tokens: int = 128  # cap on [CLS] + word pieces + [SEP]; the reference has none
    region_keep: float = 0.8  # training-time region dropout keeps each region with this p
    word_aug: float = 0.2  # training-time probability that a word is masked/replaced/deleted
    # Bytes of shards in object storage a node keeps on disk ("auto": the cache disk's free
    # space less 2 GB); below the split, the epoch is shuffled in windows (docs/data.md).
    cache_limit: str = "auto"

    def validate(self) -> None:
        _check(self.max_tokens >= 3, "data.max_tokens", "must be >= 3")
        _check(0.0 < self.region_keep <= 1.0, "data.region_keep", "must be in (0, 1]")
        _check(0.0 <= self.word_aug <= 1.0, "data.word_aug", "must be in [0, 1]")
        try:
            limit = parse_size(self.cache_limit)
        except ValueError as e:
            raise ConfigError(f"data.cache_limit: {e}") from None
        _check(limit is None or limit > 0, "data.cache_limit", "must be > 0 or auto")


@dataclass
class TrainConfig:
    """Optimisation recipe (docs/method.md §6)."""

    epochs: int = 30
    batch_size: int = 128  # global batch: split across workers in distributed runs
    lr: float = 5e-4
    bert_lr_factor: float = 0.1  # 0 freezes the backbone (no gradients through BERT)
    relation_lr_factor: float = 1.0
    weight_decay: float = 1e-4
    lr_decay_epochs: list[int] = field(default_factory=lambda: [15, 25])
    lr_decay: float = 0.1
    grad_clip: float = 2.0
    seed: int = 0
    eval_batch_size: int = 128
    # Steps between live metric points and progress lines; 0: about 20 an epoch.
    log_every: int = 0
    bf16: bool = False  # bf16 autocast of forward and loss on GPU (the reference uses fp32)
    # Flush subnormal floats to zero on CPU: without it CPU steps of this model ran 2x slower
    # after the first epoch (bench/train_throughput.py); the effect on the loss is below 1e-38.
    flush_denormal: bool = True
    # GPU speed keys (docs/training.md); the ones that change numbers beyond float rounding
    # (tf32) or trade time for memory (compile, grad_checkpoint) are off by default.
    pin_memory: bool = True  # pinned host buffers and non-blocking host-to-device copies
    fused_adamw: bool = False  # torch's fused AdamW kernel (CPU and CUDA): last-bit changes
    compile: bool = False  # torch.compile of both towers (exact to float tolerance)
    grad_checkpoint: bool = False  # activation checkpointing of BERT and the fusion layers
    tf32: bool = False  # TF32 matmuls and convolutions on CUDA: ~1e-3 relative error

    def validate(self) -> None:
        _check(self.epochs >= 1, "train.epochs", "must be >= 1")
        _check(self.batch_size >= 2, "train.batch_size", "must be >= 2")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.bert_lr_factor >= 0, "train.bert_lr_factor", "must be >= 0 (0 freezes BERT)")
        _check(self.grad_clip > 0, "train.grad_clip", "must be > 0")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.lr_decay > 0, "train.lr_decay", "must be > 0")
        _check(
            all(isinstance(m, int) and not isinstance(m, bool) for m in self.lr_decay_epochs),
            "train.lr_decay_epochs",
            "must be a list of integers",
        )
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
        _check(self.log_every >= 0, "train.log_every", "must be >= 0 (0: about 20 an epoch)")


@dataclass
class HREMConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> HREMConfig:
        """Check every section; resolve a null ``model.cutoff`` from the dataset, once."""
        self.model.cutoff = self.model.resolve_cutoff(self.data.dataset)
        self.model.validate()
        self.data.validate()
        self.train.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HREMConfig:
        """Build from a nested dict; unknown sections or keys are errors, missing ones default."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a mapping, got {type(d).__name__}")
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(d) - set(sections)
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
        cfg = cls()
        for name, value in d.items():
            if not isinstance(value, dict):
                raise ConfigError(f"config section '{name}' must be a mapping")
            for key, v in value.items():
                cfg.set(f"{name}.{key}", v)
        return cfg.validate()

    def set(self, dotted: str, value: Any) -> None:
        """Set ``section.key`` to ``value`` (a string is parsed as YAML), checking the type."""
        if dotted in _ALIASES:
            for target in _ALIASES[dotted]:
                self.set(target, value)
            return
        if dotted in _RETIRED:  # in the configs of older checkpoints; no longer has an effect
            return
        section_name, _, key = dotted.partition(".")
        section = getattr(self, section_name, None)
        if not dataclasses.is_dataclass(section) or not key:
            raise ConfigError(f"unknown config key '{dotted}' (use section.key, e.g. model.margin)")
        fields = {f.name: f for f in dataclasses.fields(section)}
        if key not in fields:
            raise ConfigError(f"unknown config key '{dotted}'")
        if isinstance(value, str) and fields[key].type != "str":
            value = yaml.safe_load(value)
        current = getattr(section, key)
        if fields[key].type.endswith("| None"):
            if value is None:
                setattr(section, key, None)
                return
            current = _PROTOTYPES[fields[key].type]
        setattr(section, key, _coerce(dotted, current, value))

    def to_flags(self) -> list[str]:
        """The ``hrem-ray`` flags that rebuild this config from the defaults: a dedicated
        flag (``CLI_FLAGS``) where there is one, else ``--set section.key=value``. The demo
        prints its commands with these, so the line shown is the config that ran."""
        argv: list[str] = []
        default = HREMConfig().to_dict()
        default["model"]["cutoff"] = ModelConfig().resolve_cutoff(self.data.dataset)
        for section, values in self.to_dict().items():
            for key, value in values.items():
                dotted = f"{section}.{key}"
                if value == default[section][key]:
                    continue
                text = value if isinstance(value, str) else json.dumps(value)
                flagged = dotted in CLI_FLAGS
                argv += [cli_flag(dotted), text] if flagged else ["--set", f"{dotted}={text}"]
        return argv

    def override(self, pairs: list[str]) -> HREMConfig:
        """Apply ``key=value`` strings (the CLI's ``--set``)."""
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep:
                raise ConfigError(f"--set expects key=value, got '{pair}'")
            self.set(key.strip(), value.strip())
        return self.validate()


def read_yaml(path: str | Path, error: type[ValueError], what: str) -> Any:
    """A YAML file's content ({} when empty); a missing or malformed file is ``error``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({e})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> HREMConfig:
    """Defaults, then a YAML file, then ``key=value`` overrides."""
    cfg = HREMConfig()
    if path is not None:
        raw = read_yaml(path, ConfigError, "config file")
        try:
            cfg = HREMConfig.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    return cfg.override(overrides or [])


# Old names that set newer keys (checkpoints and YAML written before the split).
_ALIASES = {"model.loss": ("model.base_loss", "model.relation_loss")}
_RETIRED = {"data.shuffle_buffer"}  # the shuffle buffer of the streamed shards (docs/data.md)
# Type templates of the nullable keys, for checking a non-null value.
_PROTOTYPES = {"float | None": 0.0}

_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int | None:
    """Bytes of a size such as ``"40GB"``, ``"512MiB"`` or ``"1000000"``; None for ``"auto"``."""
    if isinstance(text, int):
        return text
    if str(text).strip().lower() == "auto":
        return None
    m = _SIZE_RE.match(str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 40GB, 512MiB, auto)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def _coerce(key: str, default: Any, value: Any) -> Any:
    """Check ``value`` against the type of the field's default (ints widen to floats)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)  # YAML 1.1 reads "5e-4" (no dot) as a string
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"config key '{key}' expects {type(default).__name__}, got {value!r}")
    return value


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {msg}")
