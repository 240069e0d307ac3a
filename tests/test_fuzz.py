"""Bounded fuzzing (Hypothesis) of the two parsers that read untrusted input: the config
loader and the image header checks. Each must answer with its typed one-line error, never
with any other exception. CI runs 200 inputs each (a few seconds);
DEDUPD_FUZZ_EXAMPLES=20000 runs longer on demand. Crashes found become the regular cases
at the end of this file."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import cv2
import pytest
from conftest import photo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedupd.config import ConfigError, load_config
from dedupd.hashing import ImageError, Recipe, hash_bytes

EXAMPLES = int(os.environ.get("DEDUPD_FUZZ_EXAMPLES", "200"))
# CI: the same inputs every run (a red CI is a regression, not a new find); on demand:
# new random inputs each run.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize="DEDUPD_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def load(tmp_path: Path, raw: bytes) -> None:
    """load_config on raw bytes: a Config, or a ConfigError of one line naming the file."""
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(raw)
    try:
        load_config(path)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(f"{path}: "), str(exc)


# ---------------------------------------------------------------- the config loader

KEYS = ["index", "quarantine_dir", "rejected_dir", "hash", "algo", "size", "decode",
        "max_pixels", "workers", "queue_size", "settle_seconds", "unfinished_seconds",
        "stall_seconds",
        "reconcile_interval", "ignore", "follow_symlinks", "circuit_breaker", "window",
        "threshold", "min_decisions", "log", "mode", "level", "summary_interval", "watches",
        "path", "policy", "recursive", "group", "policies", "default", "max_distance",
        "action", "keep", "include", "exclude", "extensions", "min_width", "min_height",
        "metrics", "listen", "textfile"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["/srv/d", "/srv/d/sub", "rel", "", "~", "sqlite:///x",
                                     "postgresql://h/db", "mysql://x", "quarantine", "log",
                                     "first", "dhash", "127.0.0.1:9468", "[::1]:0"]),
                    st.text(max_size=20))
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner,
                    max_size=6)), max_leaves=30)


@FUZZ
@given(doc=st.dictionaries(st.sampled_from(KEYS), documents, max_size=8))
def test_fuzz_config_documents(tmp_path: Path, doc: dict) -> None:
    import yaml

    load(tmp_path, yaml.safe_dump(doc, allow_unicode=True).encode())


@FUZZ
@given(raw=st.one_of(
    st.binary(max_size=400),
    st.text(alphabet=st.sampled_from(list("{}[]:,-&*!|>'\"%@`#? \n\tab1.~\\")),
            max_size=200).map(str.encode),
))
def test_fuzz_config_bytes(tmp_path: Path, raw: bytes) -> None:
    load(tmp_path, raw)


# ---------------------------------------------------------------- the image header checks


def _seeds() -> dict[str, bytes]:
    img = photo(3, 40, 30)
    out = {ext: cv2.imencode(ext, img)[1].tobytes() for ext in (".png", ".bmp", ".tiff")}
    out[".jpg"] = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()
    out[".webp"] = cv2.imencode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, 80])[1].tobytes()
    return out


SEEDS = _seeds()


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 6))):
        how = draw(st.sampled_from(["flip", "cut", "insert", "header", "u32"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if how == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif how == "cut":
            del data[at:]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif how == "header" and len(data) > 4:  # the bytes the header checks read
            data[draw(st.integers(0, min(40, len(data) - 1)))] = draw(st.integers(0, 255))
        elif how == "u32" and len(data) >= at + 4:  # sizes and offsets: extreme values
            struct.pack_into("<I", data, at, draw(st.sampled_from(
                [0, 1, 0x7FFFFFFF, 0xFFFFFFFF, len(data), len(data) + 1])))
    return bytes(data)


MAGICS = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\x00\x00\x00\x00WEBP", b"BM",
          b"II*\x00", b"MM\x00*"]


def check_image(data: bytes, recipe: Recipe | None = None) -> None:
    recipe = recipe or Recipe()
    try:
        result = hash_bytes(data, recipe, max_pixels=4_000_000)
    except ImageError as exc:
        assert exc.kind in ImageError.KINDS and "\n" not in exc.reason
    else:
        assert 0 <= result.hash < 2 ** recipe.bits


@FUZZ
@given(data=mutated_images(), seed_recipe=st.booleans())
def test_fuzz_image_mutations(data: bytes, seed_recipe: bool) -> None:
    check_image(data, Recipe(algo="dhash-seed") if seed_recipe else Recipe())


@FUZZ
@given(data=st.builds(lambda magic, rest: magic + rest, st.sampled_from(MAGICS),
                      st.binary(max_size=300)))
def test_fuzz_image_headers(data: bytes) -> None:
    check_image(data)


# ---------------------------------------------------------------- crashes found, kept


@pytest.mark.parametrize("raw", [
    b"\x80",  # UnicodeDecodeError out of the loader (the reload that killed the daemon)
    b"[" * 5000,  # RecursionError inside PyYAML's composer
])
def test_config_crashes_found_by_fuzzing(tmp_path: Path, raw: bytes) -> None:
    load(tmp_path, raw)


@pytest.mark.parametrize("doc", [
    {"index": "\x00"},  # ValueError: embedded null byte, out of os.path.realpath
    {"quarantine_dir": "q\x00"},
    {"watches": [{"path": "/srv/\x00"}]},
])
def test_config_documents_found_by_fuzzing(tmp_path: Path, doc: dict) -> None:
    import yaml

    load(tmp_path, yaml.safe_dump(doc).encode())
