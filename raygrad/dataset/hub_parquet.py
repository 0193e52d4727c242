"""A hub dataset id read as parquet: resolved once, on the driver, at the commit its revision names now,
to the parquet files of its config and split, so that every node reads only its shards' row groups
(hf://datasets/ORG/NAME@COMMIT/PATH, through huggingface_hub's HfFileSystem and dataset/remote.py)
instead of a whole copy per node.

Which files: the ones `datasets` itself would load for that config and split at that commit
(datasets.load_dataset_builder resolves the repo's README configs and data-file patterns; no data is
downloaded), when they are parquet; else the hub's own conversion, the `refs/convert/parquet` revision
at its commit now ({config}/{split}/*.parquet). Only where neither exists (or the conversion is
partial) does each worker fall back to datasets.load_dataset, and the pin says why.

The pin (the plan's dataset_revision) is {"kind": "hub", "repo", "commit", "parquet": "own" |
"refs/convert/parquet" | None, "parquet_commit", "files", "fallback": why or None}. Credentials are
each node's own (HF_TOKEN, `hf auth login`): nothing here passes or records them. HF_ENDPOINT and
HF_HUB_OFFLINE are read when called (huggingface_hub fixes its own at import).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from ..errors import RaygradError, first_line
from ..model.hub import hub_endpoint, hub_offline, why_offline
from ..model.pins import hub_commit
from . import remote

CONVERT_REF = "refs/convert/parquet"  # the hub's parquet conversion of every dataset it can convert
OWN = "own"
_LEGACY_CONVERTED = "{name}-{split}(-\\d{{5}}-of-\\d{{5}})?\\.parquet"  # {config}/{name}-{split}[-i-of-n].parquet


@dataclass(frozen=True)
class HubParquet:
    pin: dict  # what the plan records (module docstring)
    objects: list[dict] | None  # {"url", "identity"} of each parquet file in row order; None: fall back


def describe(source: dict) -> dict:
    """A hub id's source (formats.describe_source): its parquet files at the pinned commit, each with its
    identity and rows (from its footer, so a worker opens only the files its rows are in), read as a
    URL's are; or, where the hub has none, the `datasets` copy per node at that commit. "hub" is the
    plan's pin."""
    found = resolve(source["path"], source["config"], source["split"])
    if found.objects is None:
        return {**source, "revision": found.pin["commit"], "hub": found.pin}
    for obj in found.objects:
        obj["rows"] = _footer_rows(obj)
    return {**source, "kind": "parquet", "objects": found.objects, "hub": found.pin}


def _footer_rows(obj: dict) -> int:
    import pyarrow.parquet as pq

    with remote.open_object(obj, "planning") as handle:
        try:
            return pq.ParquetFile(handle).metadata.num_rows
        except Exception as err:  # not parquet, truncated: one line
            raise RaygradError(f"--dataset {obj['url']}: cannot be read as parquet ({first_line(err)})") from None


def resolve(repo: str, config: str | None, split: str) -> HubParquet:
    """The parquet files of `repo`'s `config` and `split` at the commit "main" names now, or why there are none."""
    if hub_offline():  # each node's datasets cache is all there is
        return _fallback(repo, hub_commit(repo, "dataset"),
                         f"the hub cannot be reached ({why_offline()}), so it is not read as parquet")
    api = _api()
    commit = _ask(repo, lambda: api.dataset_info(repo, revision="main").sha)
    name, files = _own_files(repo, config, split, commit)
    if files and all(PurePosixPath(url).suffix == ".parquet" for url in files):
        return _found(repo, commit, OWN, commit, files)
    converted, why = _converted_files(api, repo, name, split)
    if converted is None:
        kinds = "/".join(sorted({PurePosixPath(url).suffix.lstrip(".") or "?" for url in files})) or "no"
        return _fallback(repo, commit, f"its {kinds} files are not parquet and {why}")
    parquet_commit, urls = converted
    return _found(repo, commit, CONVERT_REF, parquet_commit, urls)


def _api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_endpoint())  # the token: this node's own (HF_TOKEN, the token file)


def _ask(repo: str, call):
    """A hub call's answer; a repo or revision it does not know, a gated repo or no network is one line."""
    try:
        return call()
    except Exception as err:  # huggingface_hub's RepositoryNotFoundError, GatedRepoError, HTTP errors
        raise RaygradError(f"--dataset {repo}: not a local file and could not be read from the hub at "
                           f"{hub_endpoint()} ({type(err).__name__}: {first_line(err)}); for the offline demo "
                           "use --dataset stdlib-docs") from None


def _own_files(repo: str, config: str | None, split: str, commit: str) -> tuple[str, list[str]]:
    """(the config's name, the split's data files as hf:// URLs at `commit`), as `datasets` resolves them."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(repo, config, revision=commit)
    except Exception as err:  # an unknown config (datasets lists them), a repo it cannot read
        raise RaygradError(f"--dataset {repo}: {first_line(err)}") from None
    data_files = builder.config.data_files or {}
    splits = {str(name): list(files) for name, files in data_files.items()}
    if split not in splits:
        raise RaygradError(f"--dataset-split {split}: {repo} (config {builder.config.name}) has the splits "
                           f"{', '.join(sorted(splits)) or 'none'}")
    return builder.config.name, splits[split]


def _converted_files(api, repo: str, config: str, split: str) -> tuple[tuple[str, list[str]] | None, str]:
    """((commit of refs/convert/parquet, its URLs for config/split), '') or (None, why not)."""
    refs = _ask(repo, lambda: api.list_repo_refs(repo, repo_type="dataset"))
    commit = next((ref.target_commit for ref in refs.converts if ref.ref == CONVERT_REF), None)
    if commit is None:
        return None, f"the hub has no {CONVERT_REF} revision for it"
    listed = _ask(repo, lambda: [entry.path for entry in api.list_repo_tree(
        repo, path_in_repo=config, revision=commit, repo_type="dataset", recursive=True)])
    in_folder = sorted(path for path in listed if path.startswith(f"{config}/{split}/") and path.endswith(".parquet"))
    legacy = re.compile(re.escape(f"{config}/") + _LEGACY_CONVERTED.format(name=re.escape(repo.split("/")[-1]),
                                                                          split=re.escape(split)))
    files = in_folder or sorted(path for path in listed if legacy.fullmatch(path))
    if files:
        return (commit, [f"hf://datasets/{repo}@{commit}/{path}" for path in files]), ""
    if any(path.startswith(f"{config}/partial-{split}/") for path in listed):
        return None, (f"{CONVERT_REF} (commit {commit}) holds only a partial conversion of {config}/{split} "
                      "(its first rows)")
    return None, f"{CONVERT_REF} (commit {commit}) has no {config}/{split}"


def _found(repo: str, commit: str, parquet: str, parquet_commit: str, urls: list[str]) -> HubParquet:
    objects = [{"url": url, "identity": identity} for url, identity in zip(urls, _identities(urls))]
    return HubParquet({"kind": "hub", "repo": repo, "commit": commit, "parquet": parquet,
                       "parquet_commit": parquet_commit, "files": len(urls), "fallback": None}, objects)


def _fallback(repo: str, commit: str | None, why: str) -> HubParquet:
    return HubParquet({"kind": "hub", "repo": repo, "commit": commit, "parquet": None, "parquet_commit": None,
                       "files": 0, "fallback": why}, None)


def _identities(urls: list[str]) -> list[dict]:
    """Each file's identity (size, git blob id) as open_object will check it: one listing per folder."""
    listed: dict[str, dict] = {}
    for folder in dict.fromkeys(url.rsplit("/", 1)[0] for url in urls):
        fs, path = remote.filesystem(folder)
        fs.invalidate_cache(path)
        try:
            listed.update({fs.unstrip_protocol(info["name"]): remote.identity(info)
                           for info in fs.ls(path, detail=True)})
        except Exception as err:
            raise RaygradError(f"--dataset {folder}: cannot be listed ({type(err).__name__}: "
                               f"{first_line(err)})") from None
    missing = [url for url in urls if url not in listed]
    if missing:
        raise RaygradError(f"--dataset {missing[0]}: listed by the hub but not found in its folder")
    return [listed[url] for url in urls]


def check_unchanged(plan, going_on: str = "going on") -> None:
    """Refuse, with one line, a plan whose pinned parquet commit is gone from the hub (problem)."""
    why = problem(getattr(plan, "dataset_revision", None) or {}, going_on)
    if why:
        raise RaygradError(why)


def problem(pin: dict, going_on: str) -> str | None:
    """One line when the parquet commit a plan pinned is no longer on the hub (a rewritten
    refs/convert/parquet, a squashed history): reading it is impossible, another would mix two datasets."""
    if pin.get("kind") != "hub" or not pin.get("parquet_commit") or hub_offline():
        return None
    from huggingface_hub.errors import RevisionNotFoundError

    api, repo, ref = _api(), pin["repo"], "main" if pin["parquet"] == OWN else CONVERT_REF
    try:
        api.dataset_info(repo, revision=pin["parquet_commit"])
        return None
    except RevisionNotFoundError:
        pass
    except Exception:  # no answer now: each read says its own line
        return None
    try:
        now = api.dataset_info(repo, revision=ref).sha
    except Exception:
        now = None
    return (f"--dataset {repo}: commit {pin['parquet_commit']} of {ref} (pinned when the run was planned) is no "
            f"longer on the hub{f' ({ref} names {now} now)' if now else ''}; {going_on} would mix two datasets: "
            "start a new run")
