"""Issue 24: no write follows a planted link. A symlink planted at a temporary name raygrad once used
(`.NAME.partial`, predictable) is never written through: temporary files and directories are created with
O_EXCL beside their target, under names no one can guess, and leftovers (a killed writer's, or a planted
link) are removed without being followed. The lock file's own case is in test_lock.py."""

import os
import stat

import pytest
from helpers import run_cli, run_tiny, tree_digest

from raygrad import constants as names
from raygrad.store import files

VICTIM_TEXT = "another user's file, which raygrad must never write\n"


@pytest.fixture(scope="module")
def example_run(tiny_llama, texts_file, tmp_path_factory):
    """A complete run that keeps examples (the report needs them)."""
    run_dir, _ = run_tiny(tiny_llama, texts_file, tmp_path_factory.mktemp("planted"), top_examples=2)
    return run_dir


def plant(link, tmp_path, name="victim.txt"):
    victim = tmp_path / name
    victim.write_text(VICTIM_TEXT)
    link.symlink_to(victim)
    return victim


def test_report_writes_no_file_through_a_link_at_its_old_temporary_name(example_run, tmp_path, capsys, monkeypatch):
    link = example_run / ".report.html.partial"
    victim = plant(link, tmp_path)
    try:
        code, out, err = run_cli(["report", str(example_run)], capsys, monkeypatch)
        assert code == 0, err
        assert victim.read_text() == VICTIM_TEXT
        page = example_run / "report.html"
        assert not page.is_symlink() and "<html" in page.read_text()
        assert not os.path.lexists(link)  # a leftover at a temporary name is removed, the link and not its target
    finally:
        if os.path.lexists(link):
            link.unlink()
        (example_run / "report.html").unlink(missing_ok=True)


def test_export_writes_no_file_through_links_at_its_old_temporary_names(example_run, tmp_path, capsys,
                                                                         monkeypatch):
    links = [example_run / f".{name}.partial" for name in (names.METADATA_JSON, names.CONSOLIDATED_NPZ)]
    links.append(example_run / names.STORE_NAME / f".{names.CHECKPOINT_STATE}.partial")
    victims = [plant(link, tmp_path, f"victim{i}.txt") for i, link in enumerate(links)]
    try:
        code, _, err = run_cli(["export", str(example_run)], capsys, monkeypatch)
        assert code == 0, err
    finally:
        for link in links:
            if os.path.lexists(link):
                link.unlink()
    assert [victim.read_text() for victim in victims] == [VICTIM_TEXT] * len(victims)
    assert not (example_run / names.METADATA_JSON).is_symlink()


def test_an_export_set_stages_in_no_directory_planted_at_its_old_name(example_run, tmp_path, capsys, monkeypatch):
    sets = example_run / names.EXPORT_SETS_DIR
    sets.mkdir(exist_ok=True)
    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    (victim_dir / "kept.txt").write_text(VICTIM_TEXT)
    link = sets / ".planted.partial"
    link.symlink_to(victim_dir, target_is_directory=True)
    before = tree_digest(victim_dir)
    code, out, err = run_cli(["export", str(example_run), "--power", "2", "--name", "planted"], capsys, monkeypatch)
    assert code == 0, err
    assert tree_digest(victim_dir) == before
    assert not os.path.lexists(link)
    assert (sets / "planted" / names.METADATA_JSON).is_file() and not (sets / "planted").is_symlink()


def test_replacing_never_opens_a_guessable_name_and_clears_leftovers(tmp_path):
    target = tmp_path / "state.json"
    legacy = tmp_path / ".state.json.partial"  # the fixed name of earlier versions
    killed = tmp_path / ".state.json.ab12cd34.partial"  # a killed writer's, in this version's pattern
    other = tmp_path / ".state.json.bak.ab12cd34.partial"  # another target's: left alone
    victim = plant(legacy, tmp_path)
    killed.write_text("half")
    other.write_text("half")
    seen = []
    real_mkstemp = files.tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        seen.append(name)
        return fd, name

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(files.tempfile, "mkstemp", mkstemp)
        with files.replacing(target) as handle:
            handle.write(b"{}")
    assert target.read_bytes() == b"{}" and victim.read_text() == VICTIM_TEXT
    assert len(seen) == 1 and os.path.dirname(seen[0]) == str(tmp_path)  # O_EXCL, beside the target
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, victim.name, other.name])


def test_replaced_files_and_directories_get_the_usual_permissions(tmp_path):
    """tempfile makes files 0600 and directories 0700; a result others read keeps open()'s 0666 & ~umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    with files.replacing(tmp_path / "metadata.json") as handle:
        handle.write(b"{}")
    with files.replacing_directory(tmp_path / "set") as staging:
        (staging / "x").write_text("x")
    assert stat.S_IMODE((tmp_path / "metadata.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "set").stat().st_mode) == 0o777 & ~umask


def test_a_failed_write_leaves_no_temporary(tmp_path):
    with pytest.raises(OSError):
        with files.replacing(tmp_path / "out.npz") as handle:
            handle.write(b"part")
            raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        with files.replacing_directory(tmp_path / "set") as staging:
            (staging / "x").write_text("x")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_the_bundled_models_conversion_writes_through_no_planted_directory(tmp_path, monkeypatch):
    """The GGUF conversion staged its copy at TARGET.partial; a link planted there was written through."""
    import transformers

    from raygrad.model import loading as models

    class Saves:
        def __init__(self, name):
            self.name, self.config = name, None
            self.hf_quantizer = None

        def save_pretrained(self, directory):
            (directory / f"{self.name}.json").write_text("{}")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Saves("tokenizer"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: Saves("model"))
    target = tmp_path / "models" / "bundled"
    target.parent.mkdir()
    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    (target.parent / "bundled.partial").symlink_to(victim_dir, target_is_directory=True)
    models._convert_gguf(tmp_path, "weights.gguf", target, {"file": "weights.gguf"})
    assert list(victim_dir.iterdir()) == []
    assert sorted(p.name for p in target.iterdir()) == ["model.json", models.CONVERTED_FROM, "tokenizer.json"]


def test_plots_and_the_checkpoint_staging_file_are_written_through_no_planted_link(example_run, tmp_path, capsys,
                                                                                   monkeypatch):
    """Plots are drawn under their final names and a checkpoint stages under a fixed one: a link planted
    at either is removed and a new file made there, the file it pointed to untouched."""
    import numpy as np

    from raygrad.store.zarr_store import ResultStore

    plot = example_run / names.PLOTS_DIR / "layer_0_mean_abs_histogram.png"
    plot.parent.mkdir(exist_ok=True)
    plot.unlink(missing_ok=True)
    staging = example_run / names.STORE_NAME / names.PENDING_CHECKPOINT.replace(".npz", ".tmp.npz")
    victims = [plant(plot, tmp_path, "victim_plot.txt"), plant(staging, tmp_path, "victim_staging.txt")]
    try:
        code, _, err = run_cli(["export", str(example_run), "--save-outputs"], capsys, monkeypatch)
        assert code == 0, err
        assert not plot.is_symlink() and plot.read_bytes().startswith(b"\x89PNG")
        store = ResultStore.open(example_run / names.STORE_NAME, writable=True)  # clears a leftover staging file
        totals, done = store.totals()
        plant(staging, tmp_path, "victim_again.txt")
        store.checkpoint(totals, done)  # the same numbers, staged through the planted name
        np.testing.assert_array_equal(ResultStore.open(store.path).shards_done(), done)
    finally:
        if os.path.lexists(staging):
            staging.unlink()
    assert [victim.read_text() for victim in victims] == [VICTIM_TEXT] * len(victims)
    assert (tmp_path / "victim_again.txt").read_text() == VICTIM_TEXT
