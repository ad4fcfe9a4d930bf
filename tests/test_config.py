"""Config defaults (the paper's recipe), YAML + --set loading, type checks and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from hrem_ray.config import ConfigError, HREMConfig, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_defaults_are_the_spec_recipe():
    cfg = HREMConfig().validate()
    t, m = cfg.train, cfg.model
    assert t.lr == 5e-4
    assert t.bert_lr_factor == 0.1
    assert t.relation_lr_factor == 1.0
    assert t.weight_decay == 1e-4
    assert t.epochs == 30
    assert t.lr_decay_epochs == [15, 25]
    assert t.lr_decay == 0.1
    assert t.grad_clip == 2.0
    assert t.batch_size == 128
    assert m.embed_size == 1024
    assert m.num_heads == 16
    assert m.mask_weight == 1.0
    assert m.threshold == 0.5
    assert m.warmup == 8000
    assert m.margin == 0.2
    assert m.cutoff == 1.7
    assert m.kl_weight == 10.0
    assert m.base_loss == m.relation_loss == "trip"
    assert m.max_violation and m.vse_mean_warmup_epochs == 1 and m.mask_repeat
    assert m.cross_loss and m.img_norm and m.txt_norm
    assert m.num_layers_enc == 1


def test_default_lists_are_not_shared():
    a, b = HREMConfig(), HREMConfig()
    a.train.lr_decay_epochs.append(99)
    assert b.train.lr_decay_epochs == [15, 25]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  margin: 1\n  loss: vse\n  max_violation: false\n"
        "train:\n  epochs: 4\n  lr_decay_epochs: [3]\n  lr: 5e-4\n"
    )
    cfg = load_config(
        path,
        [
            "train.epochs=7",
            "train.lr=1e-3",
            "model.cutoff=2",
            "model.max_violation=true",
            "train.lr_decay_epochs=[2, 5]",
            "data.dataset=coco",
            "model.bert_path=123",
        ],
    )
    # from the file: int widened to float, bool, str
    assert cfg.model.margin == 1.0 and isinstance(cfg.model.margin, float)
    assert cfg.model.base_loss == cfg.model.relation_loss == "vse"  # the old key sets both
    # overrides win over the file, with their types
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.model.cutoff == 2.0 and isinstance(cfg.model.cutoff, float)
    assert cfg.model.max_violation is True
    assert cfg.train.lr_decay_epochs == [2, 5]
    assert cfg.data.dataset == "coco"
    assert cfg.model.bert_path == "123"  # a str field keeps the raw string
    # untouched keys keep their defaults
    assert cfg.train.batch_size == 128 and cfg.model.threshold == 0.5


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML reads "5e-4" as a string (YAML 1.1 needs a dot); the config must still take it.
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 2e-4\n  weight_decay: 1E-5\n")
    cfg = load_config(path)
    assert cfg.train.lr == pytest.approx(2e-4) and cfg.train.weight_decay == pytest.approx(1e-5)


def test_shipped_configs_load():
    for name in ("hrem_f30k", "hrem_coco", "cpu_small"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert cfg.train.lr > 0
    assert load_config(CONFIGS / "hrem_coco.yaml").train.batch_size == 256


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("nosuch.lr=1", "nosuch.lr"),
        ("train.nosuch=1", "train.nosuch"),
        ("train=1", "train"),
        ("train.epochs=1.5", "train.epochs"),
        ("train.epochs=true", "train.epochs"),
        ("train.lr=fast", "train.lr"),
        ("train.lr=true", "train.lr"),
        ("model.max_violation=1", "model.max_violation"),
        ("train.lr_decay_epochs=15", "train.lr_decay_epochs"),
        ("train.lr_decay_epochs=[a, b]", "train.lr_decay_epochs"),
        ("model.loss=foo", "model.base_loss"),
        ("model.relation_loss=foo", "model.relation_loss"),
        ("model.cutoff=0", "model.cutoff"),
        ("model.vse_mean_warmup_epochs=-1", "model.vse_mean_warmup_epochs"),
        ("model.threshold=0", "model.threshold"),
        ("model.threshold=1.5", "model.threshold"),
        ("model.num_heads=5", "model.embed_size"),
        ("train.batch_size=1", "train.batch_size"),
        ("train.log_every=-1", "train.log_every"),
        ("data.region_keep=0", "data.region_keep"),
        ("train.weight_decay=-1e-4", "train.weight_decay"),
        ("model.warmup=-1", "model.warmup"),
    ],
)
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(overrides=[override])


def test_override_needs_key_value():
    with pytest.raises(ConfigError, match="key=value"):
        HREMConfig().override(["train.lr"])


def test_from_dict_rejects_unknowns_and_bad_values():
    with pytest.raises(ConfigError, match="extra"):
        HREMConfig.from_dict({"extra": {}})
    with pytest.raises(ConfigError, match="'model.nosuch'"):
        HREMConfig.from_dict({"model": {"nosuch": 1}})
    with pytest.raises(ConfigError, match="'train.epochs'"):
        HREMConfig.from_dict({"train": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match="'model.threshold'"):
        HREMConfig.from_dict({"model": {"threshold": 0.0}})
    with pytest.raises(ConfigError, match="'model'"):
        HREMConfig.from_dict({"model": 3})
    with pytest.raises(ConfigError):
        HREMConfig.from_dict([1, 2])


def test_yaml_file_errors_name_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  loss: foo\n")
    with pytest.raises(ConfigError, match="bad.yaml.*'model.base_loss'"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_to_dict_from_dict_round_trip():
    cfg = load_config(
        overrides=["model.margin=0.3", "train.lr_decay_epochs=[4]", "data.dataset=coco"]
    )
    d = cfg.to_dict()
    assert d["model"]["margin"] == 0.3 and d["train"]["lr_decay_epochs"] == [4]
    back = HREMConfig.from_dict(d)
    assert back == cfg
    assert back.to_dict() == d
    assert HREMConfig.from_dict({}) == HREMConfig().validate()


@pytest.mark.parametrize(
    ("overrides", "cutoff"),
    [
        ([], 1.7),
        (["data.dataset=coco"], 1.9),
        (["data.dataset=coco", "model.cutoff=1.5"], 1.5),
        (["model.cutoff=null"], 1.7),
    ],
)
def test_cutoff_follows_the_dataset_unless_set(overrides, cutoff):
    """The authors' sampler cuts at 1.9 on coco and 1.7 elsewhere; resolved once, so the
    value saved with a run stays what it trained with."""
    cfg = load_config(overrides=overrides)
    assert cfg.model.cutoff == cutoff
    cfg.data.dataset = "f30k"
    assert cfg.validate().model.cutoff == cutoff


def test_coco_yaml_and_coco_flag_agree():
    flag = load_config(overrides=["data.dataset=coco"])
    assert load_config(CONFIGS / "hrem_coco.yaml").model.cutoff == flag.model.cutoff == 1.9
    assert flag.to_flags() == ["--dataset", "coco"]


def test_loss_attribute_sets_both_losses():
    m = HREMConfig().model
    m.loss = "vse"
    assert (m.base_loss, m.relation_loss, m.loss) == ("vse", "vse", "vse")
    m.relation_loss = "trip"
    with pytest.raises(ConfigError, match="ambiguous"):
        _ = m.loss


def test_every_cli_flag_is_a_config_key_of_its_type():
    from hrem_ray.options import CLI_FLAGS

    defaults = HREMConfig().to_dict()
    for key, (kind, _) in CLI_FLAGS.items():
        section, name = key.split(".")
        assert type(defaults[section][name]) is kind, key
