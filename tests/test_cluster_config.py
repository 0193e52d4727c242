"""cluster.yaml is a valid Ray autoscaler config (checked offline by Ray's own schema)."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


def test_cluster_yaml_passes_ray_schema_validation():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(config))  # fills the provider defaults, then raises on a schema error
    assert config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"].startswith("g5")
    assert config["available_node_types"]["gpu_worker_4x"]["min_workers"] == 0
    assert "pip install -e ~/raygrad" in config["setup_commands"][0]
    import re

    assert re.search(r'"ray\[default\]==\d+\.\d+\.\d+"', config["setup_commands"][0])  # one Ray on every node
    assert "**/.venv" in config["rsync_exclude"] and "**/.git" in config["rsync_exclude"]
