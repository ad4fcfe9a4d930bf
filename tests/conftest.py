"""Shared fixtures: the environment, a tiny random BERT, a small model config and an S3 server.
The tiny world they share with the benchmarks is ``hrem_ray.testing``; pytest helpers are in
``tests/helpers.py``."""

from __future__ import annotations

from hrem_ray.ray_runtime import set_env_defaults

set_env_defaults()  # before anything can start Ray (docs/ray.md)

import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from hrem_ray.backbone import write_tiny_bert  # noqa: E402
from hrem_ray.config import ModelConfig  # noqa: E402
from hrem_ray.testing import free_port, start_moto, stop_group  # noqa: E402
from tests.helpers import CHROMEDRIVER, CHROMIUM  # noqa: E402

torch.set_num_threads(1)


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


S3_BUCKET = "hrem-test"


@pytest.fixture(scope="session", autouse=True)
def _tracking_home(tmp_path_factory):
    """The embedded store of runs kept in S3 (``$HREM_RAY_HOME``) in a temporary folder, not
    the user's ``~/.hrem-ray``; subprocesses and Ray's workers inherit it."""
    from hrem_ray.tracking import HOME_ENV

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(HOME_ENV, str(tmp_path_factory.mktemp("hrem-home")))
        yield


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server with bucket ``S3_BUCKET``, reached through the standard AWS
    environment (restored afterwards); yields its endpoint URL."""
    import boto3

    port = free_port()
    proc = start_moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            for key in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
                mp.delenv(key, raising=False)
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=S3_BUCKET)
            yield endpoint
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    """Synthetic f30k splits of 40/10/10 images (6 regions x 24 dims) for training tests."""
    from hrem_ray.synth import write_synthetic

    root = tmp_path_factory.mktemp("synth")
    write_synthetic(
        root, train_images=40, dev_images=10, test_images=10, regions=6, dim=24, progress=None
    )
    return root


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium driven by Selenium (skipped without Debian's ``chromium`` and
    ``chromium-driver``; modules that need it mark themselves ``needs_chromium`` too)."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"needs Debian's Chromium ({CHROMIUM} and {CHROMEDRIVER})")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1000,900", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _no_ray_left_connected():
    """A module that leaves this process connected to Ray (an in-process command that
    started it) would make the next module's ``ray.init`` fail: disconnect after each."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
