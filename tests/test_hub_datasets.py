"""Hub dataset ids read as parquet at a pinned commit, on a hub served from 127.0.0.1 (tests/fake_hub.py)
through HF_ENDPOINT: a repo's own parquet files, or its refs/convert/parquet conversion, plan and read
exactly as the same rows in a local parquet file; the plan pins the commits; a pinned commit gone from
the hub is refused at read and on resume; a repo with no parquet falls back to datasets.load_dataset
and the plan says so; a worker fetches only its own row groups (the server's Range log)."""

import io
import random
from types import SimpleNamespace

import numpy as np
import pytest
from fake_hub import FakeHub
from helpers import read_by_shard, run_cli, run_tiny

from raygrad import constants as names
from raygrad.dataset import hub_parquet
from raygrad.dataset.formats import describe_source
from raygrad.dataset.shards import load_texts, plan_shards, read_rows
from raygrad.engine import resume
from raygrad.errors import RaygradError
from raygrad.model.pins import describe_pins
from raygrad.plan import Plan
from raygrad.store.zarr_store import ResultStore

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")
huggingface_hub = pytest.importorskip("huggingface_hub")

LONG = [f"Text number {i}: a sentence long enough to pass the length filter of fifty characters." for i in range(60)]
MAX_LENGTH = 24
TOKEN = "hf_not_a_real_token_0123456789"


class CharTokenizer:
    """One token per 4 characters, plus BOS: the planner needs the tokenizer alone."""

    def __call__(self, texts):
        return {"input_ids": [[0] * (1 + len(text) // 4) for text in texts]}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The fake hub, reached as a node started with HF_ENDPOINT set (and HF_HUB_OFFLINE unset) reaches it:
    huggingface_hub and datasets read both when imported, earlier in this process, so their module
    constants are set as that import would have set them. Caches in tmp_path; HF_TOKEN from the environment."""
    from datasets import config as datasets_config
    from huggingface_hub import HfFileSystem
    from huggingface_hub import constants as hub_constants

    fake = FakeHub(tmp_path / "hub").start()
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(hub_constants, "ENDPOINT", fake.endpoint)
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        fake.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub-cache"))
    monkeypatch.setattr(datasets_config, "HF_ENDPOINT", fake.endpoint)
    monkeypatch.setattr(datasets_config, "HUB_DATASETS_URL",
                        fake.endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}")
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets_config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")
    HfFileSystem.clear_instance_cache()
    yield fake
    HfFileSystem.clear_instance_cache()
    fake.stop()


def parquet_bytes(values, row_group_size=3) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": values, "n": list(range(len(values)))}), buffer, row_group_size=row_group_size)
    return buffer.getvalue()


def jsonl_bytes(values) -> bytes:
    import json

    return "".join(json.dumps({"text": value}) + "\n" for value in values).encode()


def csv_bytes(values) -> bytes:
    import csv

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["text"])
    writer.writerows([[value if value is not None else ""] for value in values])
    return buffer.getvalue().encode()


def mixed_values(offset=0):
    """Usable texts among nulls and short ones, over several row groups."""
    long = LONG[offset:]
    return [long[0], None, "short", long[1], long[2], None, long[3], long[4], "x", long[5], long[6], long[7],
            long[8], "tiny", long[9]]


def plan(source, **options):
    return plan_shards(source, None, CharTokenizer(), MAX_LENGTH, **options)




def local_parquet(tmp_path, values, name="local.parquet"):
    path = tmp_path / name
    path.write_bytes(parquet_bytes(values, row_group_size=4))  # other row groups, the same rows
    return path


def own_repo(hub, first, second):
    """org/own: two parquet files of its own (data/train-*), a README without configs."""
    return hub.commit("org/own", {"README.md": b"# a dataset\n",
                                  "data/train-00000-of-00002.parquet": parquet_bytes(first),
                                  "data/train-00001-of-00002.parquet": parquet_bytes(second, row_group_size=5)})


def converted_repo(hub, first, second):
    """org/lines: jsonl files only on main; the hub's conversion on refs/convert/parquet."""
    main = hub.commit("org/lines", {"README.md": b"# lines\n", "train.jsonl": jsonl_bytes(first + second)})
    converted = hub.commit("org/lines", {"default/train/0000.parquet": parquet_bytes(first),
                                         "default/train/0001.parquet": parquet_bytes(second, row_group_size=2)},
                           ref="refs/convert/parquet")
    return main, converted


@pytest.mark.parametrize("shard_texts", [2, 5, None])
def test_a_repo_with_its_own_parquet_plans_and_reads_as_the_local_file(hub, tmp_path, shard_texts):
    first, second = mixed_values(), mixed_values(20)
    commit = own_repo(hub, first, second)
    source = describe_source("org/own")
    assert source["kind"] == "parquet"
    assert [obj["url"] for obj in source["objects"]] == [
        f"hf://datasets/org/own@{commit}/data/train-00000-of-00002.parquet",
        f"hf://datasets/org/own@{commit}/data/train-00001-of-00002.parquet"]
    assert [obj["rows"] for obj in source["objects"]] == [15, 15]
    assert all(obj["identity"]["blob_id"] and obj["identity"]["size"] for obj in source["objects"])
    assert source["hub"] == {"kind": "hub", "repo": "org/own", "commit": commit, "parquet": "own",
                             "parquet_commit": commit, "files": 2, "fallback": None}
    here = describe_source(str(local_parquet(tmp_path, first + second)))
    layout = plan(source, shard_texts=shard_texts)
    assert layout == plan(here, shard_texts=shard_texts)  # rows, texts, token estimates, fingerprints
    assert read_by_shard(source, layout) == read_by_shard(here, layout)
    assert load_texts("org/own", None) == load_texts(str(here["path"]), None)


def test_a_repo_of_jsonl_is_read_from_its_parquet_conversion(hub, tmp_path):
    first, second = mixed_values(), mixed_values(30)
    main, converted = converted_repo(hub, first, second)
    source = describe_source("org/lines")
    assert source["kind"] == "parquet"
    assert [obj["url"] for obj in source["objects"]] == [
        f"hf://datasets/org/lines@{converted}/default/train/0000.parquet",
        f"hf://datasets/org/lines@{converted}/default/train/0001.parquet"]
    assert source["hub"]["commit"] == main and source["hub"]["parquet"] == "refs/convert/parquet"
    assert source["hub"]["parquet_commit"] == converted != main
    here = describe_source(str(local_parquet(tmp_path, first + second)))
    layout = plan(source, shard_texts=3)
    assert layout == plan(here, shard_texts=3)
    assert read_by_shard(source, layout) == read_by_shard(here, layout)
    # what datasets.load_dataset reads from main's jsonl: the same rows
    assert load_texts("org/lines", None) == [text for text in first + second if text and len(text) > 50]
    assert not any("train.jsonl" in path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path)


def test_an_older_conversion_layout_is_read_too(hub, tmp_path):
    """Conversions made before {config}/{split}/ folders: {config}/{name}-{split}[-i-of-n].parquet."""
    values = mixed_values()
    hub.commit("org/old", {"train.csv": b"text\nx\n"})
    hub.commit("org/old", {"default/old-train-00000-of-00002.parquet": parquet_bytes(values[:7]),
                           "default/old-train-00001-of-00002.parquet": parquet_bytes(values[7:]),
                           "default/old-test.parquet": parquet_bytes(LONG[:3])}, ref="refs/convert/parquet")
    source = describe_source("org/old")
    assert [obj["url"].rsplit("/", 1)[1] for obj in source["objects"]] == ["old-train-00000-of-00002.parquet",
                                                                           "old-train-00001-of-00002.parquet"]
    here = describe_source(str(local_parquet(tmp_path, values)))
    layout = plan(source, shard_texts=2)
    assert layout == plan(here, shard_texts=2) and read_by_shard(source, layout) == read_by_shard(here, layout)


def test_a_config_and_split_from_the_readme_and_one_line_for_an_unknown_one(hub, tmp_path):
    card = b"""---
configs:
- config_name: en
  data_files:
  - split: train
    path: en/train-*.parquet
  - split: test
    path: en/test.parquet
- config_name: fr
  data_files:
  - split: train
    path: fr/*.parquet
---
# two configs
"""
    commit = hub.commit("org/multi", {"README.md": card, "en/train-0.parquet": parquet_bytes(LONG[:5]),
                                      "en/test.parquet": parquet_bytes(LONG[5:9]),
                                      "fr/b.parquet": parquet_bytes(LONG[20:23]),
                                      "fr/a.parquet": parquet_bytes(LONG[9:12])})
    source = describe_source("org/multi", config="fr", split="train")
    assert [obj["url"].rsplit("@", 1)[1] for obj in source["objects"]] == [f"{commit}/fr/a.parquet",
                                                                        f"{commit}/fr/b.parquet"]
    assert load_texts("org/multi", None, config="en", split="test") == LONG[5:9]
    with pytest.raises(RaygradError, match=r"^--dataset-split validation: org/multi \(config en\) has the splits "
                                           r"test, train$"):
        describe_source("org/multi", config="en", split="validation")
    with pytest.raises(RaygradError, match="^--dataset org/multi: .*de") as unknown:
        describe_source("org/multi", config="de")
    assert "\n" not in str(unknown.value)
    with pytest.raises(RaygradError, match="^--dataset org/none: not a local file and could not be read from the hub"):
        describe_source("org/none")


@pytest.mark.parametrize("repo", ["org/own", "org/lines"])
def test_a_run_on_a_hub_dataset_equals_the_run_on_the_local_file(hub, tiny_llama, texts_file, tmp_path, repo):
    texts = load_texts(str(texts_file), None, min_chars=0)
    half = len(texts) // 2
    own_repo(hub, texts[:half], texts[half:]) if repo == "org/own" else converted_repo(hub, texts[:half], texts[half:])
    local = local_parquet(tmp_path, texts)

    options = dict(shard_size=2, top_examples=2, num_samples="all")
    _, here = run_tiny(tiny_llama, local, tmp_path / "local", **options)
    run_dir, there = run_tiny(tiny_llama, repo, tmp_path / "hub-run", **options)
    assert set(here.sums) == set(there.sums) and set(here.examples) == set(there.examples)
    for name in here.sums:  # the same texts in the same shards: the same sums, bit for bit
        np.testing.assert_array_equal(here.sums[name], there.sums[name], err_msg=name)
    for name in here.examples:  # top-K scores, rows and positions
        np.testing.assert_array_equal(here.examples[name], there.examples[name], err_msg=name)
    np.testing.assert_array_equal(here.tokens, there.tokens)
    assert here.loss_tokens == there.loss_tokens and here.loss_sum == there.loss_sum

    saved = Plan.from_dict(ResultStore.open(run_dir / names.STORE_NAME).attrs[names.ATTR_PLAN])
    pin = saved.dataset_revision
    assert pin["commit"] == hub.refs[repo]["main"]
    assert pin["parquet_commit"] == hub.refs[repo]["main" if repo == "org/own" else "refs/convert/parquet"]
    assert all(f"@{pin['parquet_commit']}/" in obj["url"] for obj in saved.source["objects"])
    line = next(line for line in describe_pins(saved) if line.startswith("pinned   dataset"))
    assert f"commit {pin['commit']}, read as parquet: 2 file(s) of" in line
    for path in run_dir.rglob("*"):  # the token never reaches the plan, the config or a log
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path


def test_two_ray_workers_read_a_hub_dataset_as_one_process_does(hub, tiny_llama, texts_file, tmp_path):
    """Workers in their own processes reach the hub through HF_ENDPOINT as their environment gives it
    (read by huggingface_hub at import), with their own HF_TOKEN; the plan and the run carry neither token."""
    texts = load_texts(str(texts_file), None, min_chars=0)
    converted_repo(hub, texts[:3], texts[3:])
    options = dict(shard_size=2, top_examples=2, num_samples="all")
    _, here = run_tiny(tiny_llama, "org/lines", tmp_path / "one", **options)
    hub.requests.clear()
    run_dir, there = run_tiny(tiny_llama, "org/lines", tmp_path / "ray", workers=2, **options)
    for name in here.sums:
        np.testing.assert_allclose(here.sums[name], there.sums[name], rtol=1e-12, atol=1e-15, err_msg=name)
    for name in here.examples:
        np.testing.assert_array_equal(here.examples[name], there.examples[name], err_msg=name)
    np.testing.assert_array_equal(here.tokens, there.tokens)
    assert hub.ranges("default/train/0001.parquet"), "read from the hub, by ranges"
    assert hub.authorizations == {f"Bearer {TOKEN}"}
    for path in run_dir.rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path


def test_a_pinned_commit_gone_from_the_hub_is_refused_at_read_and_on_resume(hub, tiny_llama, texts_file, tmp_path,
                                                                           monkeypatch):
    """The hub rewrites refs/convert/parquet (and squashes its history): the run stops at its next read
    with one line, and a resume is refused before anything is read, naming the commit."""
    texts = load_texts(str(texts_file), None, min_chars=0)
    _, converted = converted_repo(hub, texts[:3], texts[3:])
    from raygrad import engine

    whole_plan = engine._whole_plan

    def rewritten_after_planning(*args, **kwargs):
        planned = whole_plan(*args, **kwargs)
        hub.commit("org/lines", {"default/train/0000.parquet": parquet_bytes(texts[1:])}, ref="refs/convert/parquet")
        hub.drop_commit("org/lines", converted)
        return planned

    monkeypatch.setattr(engine, "_whole_plan", rewritten_after_planning)
    with pytest.raises(RaygradError) as at_read:
        run_tiny(tiny_llama, "org/lines", tmp_path / "runs", shard_size=2, num_samples="all")
    message = str(at_read.value)
    assert "\n" not in message and f"org/lines@{converted}/default/train/0000.parquet" in message
    assert "cannot be read for the shard of rows" in message and "RevisionNotFoundError" in message

    run_dir = next((tmp_path / "runs").iterdir())
    with pytest.raises(RaygradError) as on_resume:
        resume(run_dir, echo=lambda _: None, progress=False)
    message = str(on_resume.value)
    assert message == (f"--dataset org/lines: commit {converted} of refs/convert/parquet (pinned when the run was "
                       f"planned) is no longer on the hub (refs/convert/parquet names "
                       f"{hub.refs['org/lines']['refs/convert/parquet']} now); resuming would mix two datasets: "
                       "start a new run")


def test_main_moved_after_planning_still_reads_the_pinned_commit(hub, tmp_path):
    first, second = mixed_values(), mixed_values(20)
    own_repo(hub, first, second)
    source = describe_source("org/own")
    layout = plan(source, shard_texts=2)
    before = read_by_shard(source, layout)
    own_repo(hub, second, first)  # main names another commit now, with other rows
    assert hub_parquet.problem(source["hub"], "resuming") is None
    assert read_by_shard(source, layout) == before  # the commit planned on, not main's


def test_an_hf_url_is_read_as_a_remote_url_and_a_changed_file_is_refused(hub, tmp_path):
    first = mixed_values()
    own_repo(hub, first, mixed_values(20))
    url = "hf://datasets/org/own@main/data/train-00000-of-00002.parquet"
    source = describe_source(url)
    assert source["kind"] == "parquet" and [obj["url"] for obj in source["objects"]] == [url]
    here = describe_source(str(local_parquet(tmp_path, first)))
    layout = plan(source, shard_texts=2)
    assert layout == plan(here, shard_texts=2) and read_by_shard(source, layout) == read_by_shard(here, layout)
    glob = describe_source("hf://datasets/org/own/data/*.parquet")
    assert [obj["rows"] for obj in glob["objects"]] == [15, 15]

    hub.commit("org/own", {"data/train-00000-of-00002.parquet": parquet_bytes(mixed_values(1))}, keep=True)
    with pytest.raises(RaygradError) as changed:
        read_rows(source, layout.shards[1])
    message = str(changed.value)
    assert "\n" not in message and url in message and "changed since the run was planned" in message
    assert "blob_id" in message and layout.shards[1].rows_text() in message


@pytest.mark.parametrize("name", ["train.jsonl", "train.csv"])
def test_an_hf_url_of_a_text_format_is_read_as_a_remote_url(hub, tmp_path, name):
    from raygrad.dataset import remote

    if not hasattr(remote, "open_span"):
        pytest.skip("text formats by URL (dataset/remote.py open_span) are not in this checkout yet")
    values = mixed_values()
    data = jsonl_bytes(values) if name.endswith(".jsonl") else csv_bytes(values)
    hub.commit("org/lines", {name: data})
    (tmp_path / name).write_bytes(data)
    source = describe_source(f"hf://datasets/org/lines/{name}")
    here = describe_source(str(tmp_path / name))
    layout = plan(source, shard_texts=2)
    assert layout == plan(here, shard_texts=2) and read_by_shard(source, layout) == read_by_shard(here, layout)


def test_a_repo_without_parquet_falls_back_to_load_dataset_and_the_plan_says_so(hub, tmp_path):
    values = mixed_values()
    commit = hub.commit("org/plain", {"README.md": b"# plain\n", "train.jsonl": jsonl_bytes(values)})
    source = describe_source("org/plain")
    assert source["kind"] == "datasets" and source["revision"] == commit
    why = "its jsonl files are not parquet and the hub has no refs/convert/parquet revision for it"
    assert source["hub"]["fallback"] == why and source["hub"]["commit"] == commit
    plan_line = describe_pins(SimpleNamespace(dataset_revision=source["hub"], source=source))[-1]
    assert plan_line == (f"pinned   dataset commit {commit}; not read as parquet: {why}; each worker loads it whole "
                         "with datasets.load_dataset")
    layout = plan(source, shard_texts=2)  # datasets.load_dataset, through the fake hub
    here = describe_source(str(local_parquet(tmp_path, values)))
    assert layout == plan(here, shard_texts=2) and read_by_shard(source, layout) == read_by_shard(here, layout)

    hub.commit("org/plain", {"default/partial-train/0000.parquet": parquet_bytes(values[:4])},
               ref="refs/convert/parquet")
    assert "holds only a partial conversion of default/train" in describe_source("org/plain")["hub"]["fallback"]


def test_offline_a_hub_id_is_not_resolved_and_the_plan_says_why(hub, monkeypatch):
    own_repo(hub, mixed_values(), mixed_values(20))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = hub_parquet.resolve("org/own", None, "train")
    assert found.objects is None and found.pin["fallback"] == ("the hub cannot be reached (HF_HUB_OFFLINE is set), "
                                                               "so it is not read as parquet")
    assert not hub.requests


def test_a_worker_fetches_only_its_own_row_groups(hub):
    words = random.Random(0)
    texts = [" ".join(f"{words.getrandbits(40):x}" for _ in range(40)) for _ in range(32 * 64)]
    data = parquet_bytes(texts, row_group_size=64)
    hub.commit("org/big", {"data/train-00000-of-00001.parquet": data})
    source = describe_source("org/big")
    layout = plan(source, shard_texts=64)
    assert len(layout.shards) == 32
    hub.requests.clear()
    _, rows, fingerprint = read_rows(source, layout.shards[17])
    assert rows == list(range(17 * 64, 18 * 64)) and fingerprint == layout.shards[17].fingerprint
    ranges = hub.ranges("train-00000-of-00001.parquet")
    assert ranges and all(ranges), "every read of the file is ranged"
    sizes = [int(stop) - int(start) + 1 for start, stop in (rng[len("bytes="):].split("-") for rng in ranges)]
    print(f"one shard of 32: {sum(sizes)} bytes in {len(sizes)} ranged reads of a {len(data)}-byte file")
    assert sum(sizes) < len(data) / 8 and max(sizes) < len(data) / 8


def test_dry_run_prints_the_parquet_files_and_the_fallback(hub, tiny_llama, tmp_path, capsys, monkeypatch):
    own_repo(hub, LONG[:6], LONG[6:12])
    hub.commit("org/plain", {"train.jsonl": jsonl_bytes(LONG[:8])})
    args = ["run", "--model", str(tiny_llama), "--num-samples", "4", "--max-length", "16", "--workers", "0",
            "--output-dir", str(tmp_path / "out"), "--no-progress", "--dry-run"]
    code, out, err = run_cli([*args, "--dataset", "org/own"], capsys, monkeypatch)
    assert code == 0, err
    commit = hub.refs["org/own"]["main"]
    assert f"pinned   dataset commit {commit}, read as parquet: 2 file(s) of its own parquet files" in out
    code, out, err = run_cli([*args, "--dataset", "org/plain"], capsys, monkeypatch)
    assert code == 0, err
    assert "not read as parquet: its jsonl files are not parquet" in out
    assert TOKEN not in out + err

