"""configs/cluster/aws_gpu.yaml is a cluster ``ray up`` accepts and that can work: it passes
the cluster schema shipped with the installed Ray and Ray's own validation, every node gets
the one auth token and S3 access, and it syncs what the recipe configs read (docs/cluster.md).
No AWS account exists here, so nothing is launched."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from hrem_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "configs" / "cluster" / "aws_gpu.yaml"
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
TOKEN = "/home/ubuntu/.ray/auth_token"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_passes_rays_schema_and_validation(cluster):
    """The raw file against ray-schema.json, then what ``ray up`` does: fill in the AWS
    defaults and validate (head type, min/max workers)."""
    jsonschema.validate(cluster, json.loads(SCHEMA.read_text()))
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_schema_refuses_a_node_type_without_resources(cluster):
    """The check above is not vacuous: the file's old defect (a worker type without
    ``resources``) is what the schema refuses."""
    broken = copy.deepcopy(cluster)
    del broken["available_node_types"]["gpu_worker"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        jsonschema.validate(broken, json.loads(SCHEMA.read_text()))


def test_one_token_made_on_the_head_and_used_by_every_node(cluster):
    """Token auth needs a token made before ``ray start`` and the same one on every node
    (docs/cluster.md): the head generates it, Ray syncs it to the workers, and
    both start commands name it."""
    assert any("ray get-auth-token --generate" in c for c in cluster["head_setup_commands"])
    assert TOKEN in cluster["cluster_synced_files"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cluster[key] if "ray start" in c]
        assert len(start) == 1, cluster[key]
        assert "RAY_AUTH_MODE=token" in start[0] and f"RAY_AUTH_TOKEN_PATH={TOKEN}" in start[0]
    head_start = next(c for c in cluster["head_start_ray_commands"] if "ray start" in c)
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start  # else no workers


def test_every_node_reaches_s3_and_training_stays_off_the_head(cluster):
    nodes = cluster["available_node_types"]
    for name, node in nodes.items():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    assert nodes[cluster["head_node_type"]]["resources"] == {"CPU": 0}
    assert nodes["gpu_worker"]["resources"]["GPU"] == 1


@pytest.mark.parametrize("recipe", ["hrem_f30k.yaml", "hrem_coco.yaml"])
def test_nodes_get_what_the_recipes_read(cluster, recipe):
    """Both recipes train on this cluster: their datasets and their backbone path are what
    the setup commands sync onto every node."""
    cfg = load_config(REPO / "configs" / recipe, [])
    setup = " ".join(cluster["setup_commands"])
    assert f'--include "{cfg.data.dataset}_precomp/*"' in setup
    assert f"s3://my-bucket/precomp {cfg.data.data_path} " in setup
    assert f"/bert-base-uncased {cfg.model.bert_path}" in setup
