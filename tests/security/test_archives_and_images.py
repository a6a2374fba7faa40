"""Dataset ingestion: layouts, the split, hostile archives and hostile images.

Every archive is built here with zipfile/tarfile. Attack tests snapshot everything around
`dest` first and check afterwards that nothing outside it was created or changed.
"""

import contextlib
import gzip
import io
import json
import pickle
import stat
import struct
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal

import numpy as np
import pytest
from PIL import Image

from service.datasets.ingest import (
    DatasetRejectedError,
    IngestLimits,
    IngestResult,
    ingest_archive,
)
from service.datasets.ingest.archive import (
    CHUNK,
    UNSAFE_PATH,
    ByteBudget,
    Member,
    MemberKind,
    MemberTooLargeError,
    UnreadableMemberError,
    archive_format,
    clear_dest,
    is_valid_class_name,
    list_members,
    normalise,
    open_member,
    prepare_dest,
    read_chunk,
    read_small,
    screen,
    stream_to,
    wrapper_folder,
)

ARCHIVE_FORMATS = ["zip", "tar", "tar.gz", "tar.bz2", "tar.xz"]
TarWriteMode = Literal["w", "w:gz", "w:bz2", "w:xz"]
TAR_MODES: dict[str, TarWriteMode] = {
    "tar": "w",
    "tar.gz": "w:gz",
    "tar.bz2": "w:bz2",
    "tar.xz": "w:xz",
}


def image_bytes(size: tuple[int, int] = (8, 8), fmt: str = "PNG", seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def two_classes(n: int = 3, prefix: str = "") -> dict[str, bytes]:
    files = {f"{prefix}cat/{i}.png": image_bytes(seed=i) for i in range(n)}
    files |= {f"{prefix}dog/{i}.jpg": image_bytes(fmt="JPEG", seed=100 + i) for i in range(n)}
    return files


def write_zip(path: Path, files: dict[str, bytes] | list[tuple[str, bytes]]) -> Path:
    items = files.items() if isinstance(files, dict) else files
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names we want
        for name, data in items:
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


def write_tar(
    path: Path, files: dict[str, bytes] | list[tuple[str, bytes]], fmt: str = "tar.gz"
) -> Path:
    items = files.items() if isinstance(files, dict) else files
    with tarfile.open(path, TAR_MODES[fmt]) as tf:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_archive(path: Path, files: dict[str, bytes] | list[tuple[str, bytes]], fmt: str) -> Path:
    return write_zip(path, files) if fmt == "zip" else write_tar(path, files, fmt)


def add_tar_entry(tf: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.devmajor, info.devminor = 1, 3
    tf.addfile(info)


def codes(result: IngestResult) -> dict[str, str]:
    return {s.path: s.code for s in result.skipped}


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def snapshot(root: Path, dest: Path) -> dict[str, bytes | None]:
    """Every path under root except dest's subtree, with file contents."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None
        for p in root.rglob("*")
        if p != dest and dest not in p.parents
    }


@pytest.fixture
def upload(tmp_path: Path) -> Path:
    # No extension: the format must be recognised from the content.
    return tmp_path / "upload.bin"


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    (tmp_path / "jail").mkdir()
    return tmp_path / "jail" / "dataset"


@pytest.fixture
def untouched_outside(tmp_path: Path, dest: Path) -> Iterator[None]:
    """Fails the test if anything outside dest changed; request it after writing the archive."""
    before = snapshot(tmp_path, dest)
    yield
    assert snapshot(tmp_path, dest) == before


# --- Layouts --------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", ["", "mydata/"])
@pytest.mark.parametrize("fmt", ARCHIVE_FORMATS)
def test_class_folders_in_every_archive_format(
    upload: Path, dest: Path, fmt: str, wrapper: str
) -> None:
    files = two_classes(prefix=wrapper)
    junk = {
        f"__MACOSX/{wrapper}cat/._0.png": b"\x00\x05\x16\x07",
        f"{wrapper}cat/.DS_Store": b"junk",
        f"{wrapper}README.txt": b"hello",
    }
    write_archive(upload, files | junk, fmt)

    result = ingest_archive(upload, dest)

    assert result.classes == ["cat", "dog"]
    expected = {name.removeprefix(wrapper) for name in files}
    assert {s.path for s in result.samples} == expected
    assert files_under(dest) == expected
    for name, data in files.items():
        assert (dest / name.removeprefix(wrapper)).read_bytes() == data
    assert codes(result) == {
        f"__MACOSX/{wrapper}cat/._0.png": "hidden",
        f"{wrapper}cat/.DS_Store": "hidden",
        f"{wrapper}README.txt": "unlabelled",
    }
    assert result.class_counts["cat"]["total"] == 3
    assert [result.classes[s.label] for s in result.samples] == [
        s.path.split("/")[0] for s in result.samples
    ]


@pytest.mark.parametrize(
    ("wrapper", "row_prefix", "path_column"),
    [("", "", "path"), ("export/", "", "filename"), ("export/", "export/", "image")],
)
def test_csv_manifest(
    upload: Path, dest: Path, wrapper: str, row_prefix: str, path_column: str
) -> None:
    rows = [
        f"{path_column},label",
        f"{row_prefix}images/a.png,cat",
        f"{row_prefix}more/a.png,cat",
        f"./{row_prefix}images/c.png,dog",
        f"{row_prefix}images\\d.png,dog",
        f"{row_prefix}images/c.png,cat",
        f"{row_prefix}ghost.png,dog",
        f"{row_prefix}images/e.png,../evil",
    ]
    images = ["images/a.png", "more/a.png", "images/c.png", "images/d.png", "images/e.png"]
    files = {f"{wrapper}{name}": image_bytes(seed=i) for i, name in enumerate(images)}
    files[f"{wrapper}extra.png"] = image_bytes(seed=9)
    # Excel writes a byte-order mark; it must not hide the first column's name.
    files[f"{wrapper}labels.csv"] = ("\ufeff" + "\n".join(rows) + "\n").encode()
    write_zip(upload, files)

    result = ingest_archive(upload, dest)

    assert result.classes == ["cat", "dog"]
    assert files_under(dest) == {"cat/a.png", "cat/a_1.png", "dog/c.png", "dog/d.png"}
    assert (dest / "cat/a_1.png").read_bytes() == files[f"{wrapper}more/a.png"]
    assert sorted((s.path, s.code) for s in result.skipped) == sorted(
        [
            (f"{wrapper}extra.png", "unlabelled"),
            (f"{wrapper}images/e.png", "unlabelled"),
            (f"{row_prefix}images/c.png", "duplicate"),
            (f"{row_prefix}ghost.png", "missing_file"),
            (f"{row_prefix}images/e.png", "bad_label"),
        ]
    )
    assert not (dest.parent / "evil").exists()


@pytest.mark.parametrize(
    "files",
    [
        {"labels.csv": b"name,class\na.png,cat\n"},
        {"a.csv": b"path,label\n", "b.csv": b"path,label\n"},
        {"labels.csv": b"path,label\n\xff\xfe,cat\n"},
    ],
    ids=["wrong-header", "two-csvs", "not-utf8"],
)
def test_unusable_csv_manifest_is_rejected(
    upload: Path, dest: Path, files: dict[str, bytes]
) -> None:
    write_zip(upload, files | {"a.png": image_bytes(), "b.png": image_bytes()})

    with pytest.raises(DatasetRejectedError) as excinfo:
        ingest_archive(upload, dest)

    assert excinfo.value.code == "bad_manifest"
    assert not dest.exists()


# --- Split ----------------------------------------------------------------------------------


def test_split_is_seeded_reproducible_and_stratified(upload: Path, tmp_path: Path) -> None:
    files = {f"cat/{i:02}.png": image_bytes(seed=i) for i in range(10)}
    files |= {f"dog/{i}.png": image_bytes(seed=20 + i) for i in range(5)}
    files |= {f"owl/{i}.png": image_bytes(seed=30 + i) for i in range(2)}
    write_zip(upload, files)

    first = ingest_archive(upload, tmp_path / "a", seed=7)
    again = ingest_archive(upload, tmp_path / "b", seed=7)
    others = [ingest_archive(upload, tmp_path / f"s{s}", seed=s).samples for s in range(3)]

    assert first.samples == again.samples
    assert any(samples != first.samples for samples in others)
    assert first.class_counts == {
        "cat": {"train": 8, "val": 2, "total": 10},
        "dog": {"train": 4, "val": 1, "total": 5},
        "owl": {"train": 1, "val": 1, "total": 2},
    }
    for label, name in enumerate(first.classes):
        mine = [s for s in first.samples if s.label == label]
        assert {s.path.split("/")[0] for s in mine} == {name}
        assert sum(s.split == "val" for s in mine) == first.class_counts[name]["val"]


# --- Hostile archives -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_paths_that_escape_are_skipped(
    upload: Path, dest: Path, tmp_path: Path, fmt: str, request: pytest.FixtureRequest
) -> None:
    evil = [
        "../evil.png",
        "../../evil.png",
        "cat/../../evil.png",
        f"{tmp_path}/absolute-evil.png",
        "..\\evil.png",
        "C:/evil.png",
        "cat/\x1b[2Jevil.png",
    ]
    write_archive(upload, two_classes() | {name: image_bytes() for name in evil}, fmt)
    request.getfixturevalue("untouched_outside")

    result = ingest_archive(upload, dest)

    assert codes(result) == dict.fromkeys(evil, "unsafe_path")
    assert files_under(dest) == set(two_classes())


def test_tar_links_are_never_created_or_followed(
    upload: Path, dest: Path, request: pytest.FixtureRequest
) -> None:
    with tarfile.open(upload, "w:gz") as tf:
        add_tar_entry(tf, "cat/passwd.png", tarfile.SYMTYPE, "/etc/passwd")
        add_tar_entry(tf, "cat/escape", tarfile.SYMTYPE, "../../..")
        add_tar_entry(tf, "cat/hard.png", tarfile.LNKTYPE, "../../outside.png")
        add_tar_entry(tf, "dog/inner.png", tarfile.LNKTYPE, "cat/0.png")
        for name, data in {**two_classes(), "cat/escape/through.png": image_bytes()}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    request.getfixturevalue("untouched_outside")

    result = ingest_archive(upload, dest)

    assert codes(result) == {
        "cat/passwd.png": "link",
        "cat/escape": "link",
        "cat/hard.png": "link",
        "dog/inner.png": "link",
    }
    # The file "through" the skipped symlink is an ordinary file in a real folder inside dest.
    assert (dest / "cat/escape/through.png").is_file()
    assert not any(p.is_symlink() for p in dest.rglob("*"))


def test_zip_symlink_entry_is_skipped(
    upload: Path, dest: Path, request: pytest.FixtureRequest
) -> None:
    link = zipfile.ZipInfo("cat/link.png")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(upload, "w") as zf:
        zf.writestr(link, "../../../etc/passwd")
        for name, data in two_classes().items():
            zf.writestr(name, data)
    request.getfixturevalue("untouched_outside")

    result = ingest_archive(upload, dest)

    assert codes(result) == {"cat/link.png": "link"}
    assert not (dest / "cat/link.png").exists()


def test_devices_and_fifos_are_skipped(
    upload: Path, dest: Path, request: pytest.FixtureRequest
) -> None:
    with tarfile.open(upload, "w") as tf:
        add_tar_entry(tf, "cat/fifo.png", tarfile.FIFOTYPE)
        add_tar_entry(tf, "cat/null.png", tarfile.CHRTYPE)
        add_tar_entry(tf, "dog/disk.png", tarfile.BLKTYPE)
        for name, data in two_classes().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    request.getfixturevalue("untouched_outside")

    result = ingest_archive(upload, dest)

    assert codes(result) == {
        "cat/fifo.png": "special_file",
        "cat/null.png": "special_file",
        "dog/disk.png": "special_file",
    }
    assert files_under(dest) == set(two_classes())


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_duplicate_names_keep_the_first(
    upload: Path, dest: Path, fmt: str, request: pytest.FixtureRequest
) -> None:
    first, second, third = image_bytes(seed=1), image_bytes(seed=2), image_bytes(seed=3)
    entries = [("cat/x.png", first), ("cat/x.png", second), ("./cat//x.png", third)]
    write_archive(upload, entries + list(two_classes().items()), fmt)
    request.getfixturevalue("untouched_outside")

    result = ingest_archive(upload, dest)

    assert [s.code for s in result.skipped] == ["duplicate", "duplicate"]
    assert (dest / "cat/x.png").read_bytes() == first


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_too_many_members_is_rejected_before_extraction(
    upload: Path, dest: Path, fmt: str, request: pytest.FixtureRequest
) -> None:
    write_archive(upload, two_classes(n=3), fmt)
    request.getfixturevalue("untouched_outside")
    calls: list[tuple[int, int]] = []

    with pytest.raises(DatasetRejectedError) as excinfo:
        ingest_archive(
            upload,
            dest,
            limits=IngestLimits(max_members=5),
            progress=lambda done, total: calls.append((done, total)),
        )

    assert excinfo.value.code == "too_many_members"
    assert calls == []
    assert not dest.exists()


def test_member_over_the_size_cap_is_skipped(
    upload: Path, dest: Path, request: pytest.FixtureRequest
) -> None:
    big = image_bytes(size=(80, 80))
    assert len(big) > 10_000
    write_zip(upload, two_classes() | {"cat/big.png": big})
    request.getfixturevalue("untouched_outside")

    result = ingest_archive(upload, dest, limits=IngestLimits(max_member_bytes=10_000))

    assert codes(result) == {"cat/big.png": "too_large"}
    assert not (dest / "cat/big.png").exists()


def test_zip_bomb_is_rejected_and_dest_cleaned(
    upload: Path, dest: Path, request: pytest.FixtureRequest
) -> None:
    with zipfile.ZipFile(upload, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, data in two_classes().items():
            zf.writestr(name, data)
        with zf.open("cat/bomb.png", "w", force_zip64=True) as bomb:
            zeros = bytes(2**20)
            for _ in range(200):
                bomb.write(zeros)
    assert upload.stat().st_size < 2 * 2**20
    request.getfixturevalue("untouched_outside")
    # The per-file cap alone would let the bomb through; only the running total stops it.
    limits = IngestLimits(max_member_bytes=300 * 2**20, max_total_bytes=20 * 2**20)

    with pytest.raises(DatasetRejectedError) as excinfo:
        ingest_archive(upload, dest, limits=limits)

    assert excinfo.value.code == "too_large"
    assert not dest.exists()


def test_nested_archives_are_not_unpacked(
    upload: Path, dest: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    inner_zip = write_zip(tmp_path / "inner.zip", two_classes()).read_bytes()
    inner_tgz = write_tar(tmp_path / "inner.tgz", two_classes()).read_bytes()
    write_zip(upload, two_classes() | {"cat/inner.zip": inner_zip, "dog/photo.png": inner_tgz})
    request.getfixturevalue("untouched_outside")

    result = ingest_archive(upload, dest)

    assert codes(result) == {"cat/inner.zip": "nested_archive", "dog/photo.png": "nested_archive"}
    assert files_under(dest) == set(two_classes())


def test_encrypted_and_damaged_zip_members_are_skipped(upload: Path, dest: Path) -> None:
    secret, damaged = image_bytes(seed=50), image_bytes(seed=51)
    with zipfile.ZipFile(upload, "w", zipfile.ZIP_STORED) as zf:
        for name, data in two_classes().items():
            zf.writestr(name, data)
        zf.writestr("cat/secret.png", secret)
        zf.writestr("cat/damaged.png", damaged)
    raw = bytearray(upload.read_bytes())
    # The central directory copy of the name comes last; its flags sit 46 - 8 bytes before.
    raw[raw.rfind(b"cat/secret.png") - 38] |= 0x1
    raw[raw.find(damaged) + len(damaged) // 2] ^= 0xFF
    upload.write_bytes(bytes(raw))

    result = ingest_archive(upload, dest)

    assert codes(result) == {"cat/secret.png": "encrypted", "cat/damaged.png": "unreadable"}
    assert files_under(dest) == set(two_classes())


# --- Hostile and unusual images -------------------------------------------------------------


@pytest.mark.parametrize("pillow_limit", ["default", None])
def test_huge_png_header_is_skipped_without_decoding(
    upload: Path, dest: Path, monkeypatch: pytest.MonkeyPatch, pillow_limit: str | None
) -> None:
    if pillow_limit is None:
        # Without Pillow's own guard only our header check stands between us and a 30 GB buffer.
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    write_zip(upload, two_classes() | {"cat/huge.png": png_header_only(100_000, 100_000)})

    result = ingest_archive(upload, dest)

    assert codes(result) == {"cat/huge.png": "too_many_pixels"}


def test_our_pixel_cap_applies_below_pillows(upload: Path, dest: Path) -> None:
    write_zip(upload, two_classes() | {"cat/big.png": image_bytes(size=(40, 40))})

    result = ingest_archive(upload, dest, limits=IngestLimits(max_image_pixels=1000))

    assert codes(result) == {"cat/big.png": "too_many_pixels"}


def test_pillow_decompression_bomb_warning_becomes_a_skip(
    upload: Path, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    # 8x8 passes; 40x40 is in Pillow's warning band (1x-2x); 50x50 is over its error limit.
    files = two_classes()
    files |= {"cat/warn.png": image_bytes(size=(40, 40)), "cat/err.png": image_bytes((50, 50))}
    write_zip(upload, files)

    with warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")  # the ingest must not rely on a filter of ours
        result = ingest_archive(upload, dest, limits=IngestLimits(max_image_pixels=10**6))

    assert not [w for w in leaked if issubclass(w.category, Image.DecompressionBombWarning)]

    assert codes(result) == {"cat/warn.png": "too_many_pixels", "cat/err.png": "too_many_pixels"}
    assert files_under(dest) == set(two_classes())


def test_truncated_image_is_skipped(upload: Path, dest: Path) -> None:
    whole = image_bytes(size=(64, 64))
    write_zip(upload, two_classes() | {"cat/cut.png": whole[: len(whole) // 2]})

    result = ingest_archive(upload, dest)

    assert codes(result) == {"cat/cut.png": "corrupt_image"}
    assert not (dest / "cat/cut.png").exists()


def test_formats_outside_the_allowlist_are_skipped(upload: Path, dest: Path) -> None:
    ico = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ico, format="ICO")
    files = {f"{name}/{i}.png": image_bytes(seed=i) for name in ("cat", "dog") for i in range(2)}
    files |= {
        "cat/icon.ico": ico.getvalue(),
        "dog/scan.pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n",
        "dog/photo.png": image_bytes(fmt="JPEG"),
    }
    write_zip(upload, files)

    result = ingest_archive(upload, dest, limits=IngestLimits(allowed_formats=frozenset({"PNG"})))

    assert codes(result) == {
        "cat/icon.ico": "format_not_allowed",
        "dog/scan.pdf": "not_an_image",  # Pillow can write PDF but has no reader for it
        "dog/photo.png": "format_not_allowed",
    }


def test_content_decides_not_the_extension(upload: Path, dest: Path) -> None:
    png_named_jpg = image_bytes()
    write_zip(
        upload, two_classes() | {"cat/notes.png": b"not an image", "cat/p.jpg": png_named_jpg}
    )

    result = ingest_archive(upload, dest)

    assert codes(result) == {"cat/notes.png": "not_an_image"}
    assert (dest / "cat/p.jpg").read_bytes() == png_named_jpg
    assert "cat/p.jpg" in {s.path for s in result.samples}


# --- Whole-archive rejections ---------------------------------------------------------------


def _tar_gz_cut_in_its_first_header() -> bytes:
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w:gz") as tar:
        data = image_bytes(seed=0)
        info = tarfile.TarInfo("cat/0.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return whole.getvalue()[:40]


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"just some text, not an archive", "unsupported_archive"),
        (gzip.compress(b"a gzip file that holds no tar"), "unsupported_archive"),
        (b"PK\x03\x04" + b"\x00" * 100, "corrupt_archive"),
        (_tar_gz_cut_in_its_first_header(), "corrupt_archive"),
    ],
    ids=["text", "gzip-not-tar", "broken-zip", "tar-gz-cut-short"],
)
def test_unreadable_upload_is_rejected(upload: Path, dest: Path, content: bytes, code: str) -> None:
    upload.write_bytes(content)

    with pytest.raises(DatasetRejectedError) as excinfo:
        ingest_archive(upload, dest)

    assert excinfo.value.code == code
    if code == "unsupported_archive":
        assert "zip" in str(excinfo.value)
        assert "tar" in str(excinfo.value)
    assert not dest.exists()


def test_single_class_is_rejected(upload: Path, dest: Path) -> None:
    write_zip(upload, {f"cat/{i}.png": image_bytes(seed=i) for i in range(4)})

    with pytest.raises(DatasetRejectedError) as excinfo:
        ingest_archive(upload, dest)

    assert excinfo.value.code == "too_few_classes"
    assert "'cat' (4 images)" in excinfo.value.message
    assert not dest.exists()


def test_class_with_too_few_images_is_dropped(upload: Path, dest: Path) -> None:
    write_zip(upload, two_classes() | {"owl/0.png": image_bytes(), "owl/1.txt": b"text"})

    result = ingest_archive(upload, dest)

    assert result.classes == ["cat", "dog"]
    assert codes(result) == {"owl/0.png": "class_too_small", "owl/1.txt": "not_an_image"}
    assert not (dest / "owl").exists()


def test_archive_without_images_is_rejected(upload: Path, dest: Path) -> None:
    # Not .txt files: an archive of mostly .txt files is a text dataset.
    write_zip(upload, {"cat/a.md": b"a", "dog/b.md": b"b"})

    with pytest.raises(DatasetRejectedError) as excinfo:
        ingest_archive(upload, dest)

    assert excinfo.value.code == "no_images"
    assert "not_an_image 2" in excinfo.value.message


def test_existing_empty_dest_is_left_empty_on_rejection(upload: Path, dest: Path) -> None:
    dest.mkdir()
    write_zip(upload, {"cat/0.png": image_bytes(), "cat/1.png": image_bytes()})

    with pytest.raises(DatasetRejectedError):
        ingest_archive(upload, dest)

    assert dest.is_dir()
    assert list(dest.iterdir()) == []


def test_non_empty_dest_is_refused(upload: Path, dest: Path) -> None:
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    write_zip(upload, two_classes())

    with pytest.raises(ValueError, match="empty"):
        ingest_archive(upload, dest)

    assert (dest / "keep.txt").read_text() == "mine"


# --- Result plumbing ------------------------------------------------------------------------


def test_manifest_round_trips_through_json(upload: Path, dest: Path) -> None:
    write_zip(upload, two_classes() | {"README.md": b"hi"})
    result = ingest_archive(upload, dest)

    restored = IngestResult.from_manifest(json.loads(json.dumps(result.to_manifest())))

    assert restored == result
    assert result.skipped


def test_progress_reaches_the_total(upload: Path, dest: Path) -> None:
    files = two_classes(n=3) | {"cat/.hidden": b"x"}
    write_zip(upload, files)
    calls: list[tuple[int, int]] = []

    ingest_archive(upload, dest, progress=lambda done, total: calls.append((done, total)))

    assert calls[-1] == (len(files), len(files))
    done = [d for d, _ in calls]
    assert done == sorted(done)


def test_rejection_error_survives_pickling() -> None:
    error = DatasetRejectedError("no_images", "No usable images were found.")

    copy = pickle.loads(pickle.dumps(error))

    assert (copy.code, copy.message, str(copy)) == ("no_images", error.message, error.message)


# --- The safety checks one at a time: their exact bounds and what each tells the uploader ---


def _member(name: str, kind: MemberKind = "file", data: bytes = b"x") -> Member:
    return Member(name, kind, lambda: io.BytesIO(data))


class _FailingRead(io.BytesIO):
    """Answers its first read, then fails as a damaged member does."""

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() > 0:
            raise OSError("bad CRC")
        return super().read(size)


def test_every_skipped_name_says_why_in_the_uploaders_words() -> None:
    members = [
        _member("cat/", "dir"),  # implied by paths: neither kept nor reported, and the rest read
        _member("/etc/passwd"),
        _member("cat/link.png", "link"),
        _member("cat/fifo", "special"),
        _member("cat/secret.png", "encrypted"),
        _member("cat/.DS_Store"),
        _member("cat/0.png"),
        _member("cat/./0.png"),
    ]
    candidates, skipped = screen(members)
    assert [c.path for c in candidates] == ["cat/0.png"]
    assert [(s.path, s.code, s.reason) for s in skipped] == [
        ("/etc/passwd", "unsafe_path", UNSAFE_PATH),
        ("cat/link.png", "link", "Symbolic and hard links are not extracted."),
        ("cat/fifo", "special_file", "Devices, pipes and other special files are not extracted."),
        ("cat/secret.png", "encrypted", "The file is password-protected."),
        ("cat/.DS_Store", "hidden", "Hidden and system files are ignored."),
        (
            "cat/./0.png",
            "duplicate",
            "Another entry in the archive has the same path; the first one is kept.",
        ),
    ]


def test_names_at_their_limits() -> None:
    longest = "abcd/" * 204 + "abcd"  # 1024 characters
    assert normalise(longest) == longest
    assert normalise(longest + "e") is None
    assert normalise("a/" * 600) is None  # too long, though each part is short
    assert normalise("d/" + "é" * 127 + "e") == "d/" + "é" * 127 + "e"  # a 255-byte part
    assert normalise("d/" + "é" * 128) is None  # 256 bytes
    assert normalise("a b/c~d.png") == "a b/c~d.png"  # a space is printable
    for bad in ("\x1f", "\x7f", "\ud800", "\udabc", "\udfff"):
        assert normalise(f"cat/{bad}.png") is None, repr(bad)
    assert normalise("cat/\ue000.png") == "cat/\ue000.png"  # past the surrogates


@pytest.mark.parametrize(
    ("name", "valid"),
    [("cat", True), ("cat/dog", False), ("cat/", False), (".cat", False), ("__MACOSX", False)],
)
def test_a_class_name_is_one_visible_clean_folder_name(name: str, valid: bool) -> None:
    assert is_valid_class_name(name) is valid


def test_the_wrapper_folder_is_named_only_when_it_wraps_everything() -> None:
    assert wrapper_folder(["w/cat/0.png", "w/dog/0.png"]) == "w/"
    assert wrapper_folder(["w/labels.csv", "w/0.png"]) == "w/"
    assert wrapper_folder(["cat/0.png", "dog/0.png"]) == ""
    assert wrapper_folder(["cat/0.png", "cat/1.png"]) == ""  # one class, not a wrapper
    assert wrapper_folder(["w/cat/0.png", "top.png"]) == ""


def test_an_empty_zip_is_recognised_as_a_zip() -> None:
    empty = io.BytesIO()
    zipfile.ZipFile(empty, "w").close()
    assert empty.getvalue().startswith(b"PK\x05\x06")
    assert archive_format(empty.getvalue()) == "zip"


def test_member_kinds_in_zip_and_tar(tmp_path: Path) -> None:
    zipped = tmp_path / "kinds.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr(zipfile.ZipInfo("windows-dir/"), b"")  # a folder by its name only
        unix_dir = zipfile.ZipInfo("unix-dir")
        unix_dir.external_attr = (stat.S_IFDIR | 0o755) << 16  # a folder by its mode only
        zf.writestr(unix_dir, b"")
        fifo = zipfile.ZipInfo("fifo")
        fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
        zf.writestr(fifo, b"")
        zf.writestr("plain.png", b"x")
    tarred = tmp_path / "kinds.tar"
    with tarfile.open(tarred, "w") as tf:
        add_tar_entry(tf, "folder", tarfile.DIRTYPE)
        add_tar_entry(tf, "link", tarfile.SYMTYPE, "x")
        add_tar_entry(tf, "fifo", tarfile.FIFOTYPE)
        info = tarfile.TarInfo("plain.png")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with contextlib.ExitStack() as stack:
        assert [m.kind for m in list_members(zipped, stack, 10)] == [
            "dir",
            "dir",
            "special",
            "file",
        ]
        assert [m.kind for m in list_members(tarred, stack, 10)] == [
            "dir",
            "link",
            "special",
            "file",
        ]


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_the_member_cap_is_inclusive_and_says_the_cap(tmp_path: Path, fmt: str) -> None:
    upload = write_archive(tmp_path / "a", {f"cat/{i}.png": b"x" for i in range(3)}, fmt)
    with contextlib.ExitStack() as stack:
        assert len(list_members(upload, stack, 3)) == 3
        with pytest.raises(DatasetRejectedError) as raised:
            list_members(upload, stack, 2)
    assert (raised.value.code, raised.value.message) == (
        "too_many_members",
        "The archive has more than 2 entries.",
    )


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_a_damaged_archive_says_so_with_the_cause(tmp_path: Path, fmt: str) -> None:
    noise = np.random.default_rng(0).bytes(5000)  # incompressible: cut mid-member, not mid-header
    whole = write_archive(tmp_path / "a", {f"cat/{i}.png": noise for i in range(3)}, fmt)
    cut = tmp_path / "cut"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with contextlib.ExitStack() as stack, pytest.raises(DatasetRejectedError) as raised:
        list_members(cut, stack, 10)
    assert raised.value.code == "corrupt_archive"
    assert raised.value.message == f"The archive is damaged: {raised.value.__cause__}"
    assert str(raised.value.__cause__)  # the cause is said, not left out


def test_a_read_takes_one_chunk_at_most() -> None:
    assert len(read_chunk(io.BytesIO(b"x" * (CHUNK + 1)))) == CHUNK


def test_reading_a_small_member_counts_every_chunk() -> None:
    data = bytes(range(256)) * (CHUNK // 128)  # two chunks
    assert read_small(_member("m", data=data), len(data)) == data
    with pytest.raises(MemberTooLargeError, match=f"^it is larger than {len(data) - 1} bytes$"):
        read_small(_member("m", data=data), len(data) - 1)
    # Over the cap only in total, each chunk under it:
    with pytest.raises(MemberTooLargeError):
        read_small(_member("m", data=data), CHUNK + 1)


def test_a_failed_read_says_what_failed() -> None:
    def broken() -> IO[bytes]:
        raise OSError("bad CRC")

    with pytest.raises(UnreadableMemberError, match=r"^bad CRC$"):
        open_member(Member("m", "file", broken))
    handle = _FailingRead(b"xy")
    handle.read(1)
    with pytest.raises(UnreadableMemberError, match=r"^bad CRC$"):
        read_chunk(handle)


def test_streaming_a_member_caps_its_bytes_at_exactly_the_limit(tmp_path: Path) -> None:
    data = b"y" * (CHUNK + CHUNK // 2)  # two chunks
    kept = tmp_path / "deep" / "er" / "kept.png"  # folders made on the way
    assert stream_to(_member("m", data=data), kept, len(data), ByteBudget(len(data))) is None
    assert kept.read_bytes() == data
    # Over the file cap in total though each chunk is under it: skipped, nothing left.
    over = tmp_path / "over.png"
    problem = stream_to(_member("m", data=data), over, CHUNK + 1, ByteBudget(10 * CHUNK))
    assert problem == ("too_large", f"The file is larger than {CHUNK + 1} bytes.")
    assert not over.exists()


def test_the_archive_byte_budget_is_inclusive_and_says_the_limit() -> None:
    budget = ByteBudget(10)
    budget.charge(4)
    budget.charge(6)
    with pytest.raises(DatasetRejectedError) as raised:
        budget.charge(1)
    assert (raised.value.code, raised.value.message) == (
        "too_large",
        "The archive unpacks to more than 10 bytes.",
    )


def test_streaming_skips_say_why(tmp_path: Path) -> None:
    budget = ByteBudget(10 * CHUNK)
    nested = _member("inner.zip", data=b"PK\x03\x04rest")
    assert stream_to(nested, tmp_path / "inner.zip", CHUNK, budget) == (
        "nested_archive",
        "Archives inside the archive are not unpacked.",
    )
    (tmp_path / "taken.png").write_bytes(b"first")
    assert stream_to(_member("taken.png"), tmp_path / "taken.png", CHUNK, budget) == (
        "duplicate",
        "Another file in the archive has the same destination.",
    )
    assert (tmp_path / "taken.png").read_bytes() == b"first"
    # Fails after its first chunk: reported, and the partial file removed.
    damaged = Member("damaged.png", "file", lambda: _FailingRead(b"x" * (CHUNK + 1)))
    assert stream_to(damaged, tmp_path / "damaged.png", 10 * CHUNK, budget) == (
        "unreadable",
        "The file cannot be read from the archive: bad CRC",
    )
    assert not (tmp_path / "damaged.png").exists()


def test_preparing_and_clearing_dest(tmp_path: Path) -> None:
    dest = tmp_path / "not" / "yet" / "there"
    assert prepare_dest(dest) is True
    assert dest.is_dir()
    (dest / "folder").mkdir()
    (dest / "folder" / "f.png").write_bytes(b"x")
    (dest / "file.png").write_bytes(b"x")
    (dest / "link").symlink_to(tmp_path)
    clear_dest(dest, created=False)
    assert dest.is_dir()
    assert list(dest.iterdir()) == []
    assert tmp_path.is_dir()  # the link's target is not followed
