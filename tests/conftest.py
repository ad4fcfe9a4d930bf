"""Shared fixtures and helpers: the environment, a tiny random BERT and the tiny world built
from it, a small model config, CLI and process checks."""

from __future__ import annotations

from pathlib import Path

from hrem_ray.env import set_env_defaults

set_env_defaults()  # before anything can start Ray (see ../shared/docs/ray-notes.md)

import psutil  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hrem_ray.backbone import write_tiny_bert  # noqa: E402
from hrem_ray.cli import main  # noqa: E402
from hrem_ray.config import ModelConfig  # noqa: E402

torch.set_num_threads(1)


# The tiny world of the CLI, gallery and serving tests: f30k-format data of 20/5/10 images of
# 6 regions x 24 dims, and a model at toy width.
TINY_MODEL = [
    f"--set=model.{k}={v}"
    for k, v in dict(img_dim=24, embed_size=32, num_heads=4, ff_dim=32, mlp_hidden=16).items()
]
SYNTH = ["--train-images", "20", "--dev-images", "5", "--test-images", "10"]
SYNTH += ["--regions", "6", "--dim", "24"]


def tiny_data_and_checkpoint(root: Path, tiny_bert: str) -> tuple[Path, Path]:
    """Synthetic data and a fresh tiny checkpoint under ``root``, made with the CLI."""
    data, ckpt = root / "data", root / "ckpt"
    main(["synth", "--out", str(data), *SYNTH])
    main(["init-checkpoint", "--out", str(ckpt), "--bert-path", tiny_bert, *TINY_MODEL])
    return data, ckpt


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, hidden-32 random BERT with the real bert-base-uncased vocabulary."""
    return str(write_tiny_bert(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture
def small_cfg(tiny_bert) -> ModelConfig:
    """Spec architecture at toy width; dropout off so outputs are deterministic."""
    return ModelConfig(
        bert_path=tiny_bert,
        img_dim=24,
        embed_size=32,
        mlp_hidden=16,
        ff_dim=32,
        num_heads=4,
        dropout=0.0,
        warmup=0,
    )


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes of ``procs`` still running (zombies count as gone)."""
    running = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                running.append(p)
        except psutil.NoSuchProcess:
            pass
    return running


def run_err(capsys, *argv: str) -> str:
    """Run an ``hrem-ray`` command that must fail as a user error (exit 2, no traceback);
    returns its one error line."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"hrem-ray {argv[0]}: error: "), lines[0]
    return lines[0]
