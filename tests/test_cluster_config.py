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


def test_instance_profiles_are_ready_to_uncomment_and_no_secret_is_written():
    """Credentials come from each node's role (an instance profile), never from this file: the commented
    IamInstanceProfile lines, uncommented, make a valid config with a profile on every node type; and
    nothing in the file looks like a key or token."""
    import re

    text = CLUSTER_YAML.read_text()
    config = yaml.safe_load(re.sub(r"# (IamInstanceProfile: )", r"\1", text))
    validate_config(prepare_config(config))
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    secrets = [r"AKIA[0-9A-Z]{16}", r"(?i)aws_secret_access_key\s*[:=]", r"(?i)aws_session_token\s*[:=]",
               r"\bhf_[A-Za-z0-9]{30,}", r"-----BEGIN [A-Z ]*PRIVATE KEY", r"(?i)HF_TOKEN\s*[:=]\s*\S"]
    for pattern in secrets:
        assert not re.search(pattern, text), pattern
