"""Text datasets: the three upload formats, per-row errors with line numbers, the split, the
manifest, and the API around them (modality, 415 for a non-dataset, 422 for missing columns).

Real text comes from tests/fixtures/debian_descriptions.csv (see tests/fixtures/README.md)."""

import csv
import html
import io
import json
import pickle
import tracemalloc
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import service.datasets.ingest.text as text_module
from service.context import AppContext
from service.datasets.ingest import (
    DatasetRejectedError,
    IngestLimits,
    IngestResult,
    MissingColumnError,
    TextColumns,
    check_csv_header,
    detect_upload,
    ingest_upload,
    iter_text_rows,
)
from service.datasets.ingest.results import MAX_LISTED_SKIPPED, TextShard
from service.datasets.service import load_text_rows, process_upload
from tests.engine.test_text_train import write_tiny_bert
from tests.test_experiments import experiment_request

FIXTURE = Path(__file__).parent / "fixtures" / "debian_descriptions.csv"


def fixture_rows() -> list[dict[str, str]]:
    with FIXTURE.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def skips(result: IngestResult) -> set[tuple[int | None, str]]:
    return {(s.line, s.code) for s in result.skipped}


def ingest_bytes(tmp_path: Path, data: bytes, **options: Any) -> IngestResult:
    tmp_path.mkdir(exist_ok=True)
    upload = tmp_path / "upload"
    upload.write_bytes(data)
    return ingest_upload(upload, tmp_path / "files", **options)


# --- Formats ----------------------------------------------------------------------------------


def test_fixture_csv_is_split_per_class(tmp_path: Path) -> None:
    result = ingest_upload(FIXTURE, tmp_path / "files", val_fraction=0.25, seed=3)

    assert result.modality == "text"
    assert result.classes == ["database", "games", "graphics", "mail", "science", "sound"]
    assert result.skipped == []
    assert result.unlabelled == 0
    assert all(c == {"train": 75, "val": 25, "total": 100} for c in result.class_counts.values())
    rows = list(iter_text_rows(tmp_path / "files", result.shards))
    expected = {(r["text"], r["label"]) for r in fixture_rows()}
    assert {(row.text, result.classes[row.label or 0]) for row in rows} == expected
    assert Counter(row.split for row in rows) == {"train": 450, "val": 150}
    # The split is the seed's: the same seed gives the same val rows, another seed others.
    again = ingest_upload(FIXTURE, tmp_path / "again", val_fraction=0.25, seed=3)
    other = ingest_upload(FIXTURE, tmp_path / "other", val_fraction=0.25, seed=4)

    def val_texts(folder: str, shards: Any) -> set[str]:
        return {r.text for r in iter_text_rows(tmp_path / folder, shards) if r.split == "val"}

    assert val_texts("again", again.shards) == val_texts("files", result.shards)
    assert val_texts("other", other.shards) != val_texts("files", result.shards)
    assert [p.name for p in (tmp_path / "files").iterdir()] == ["texts-00000.jsonl"]


def test_jsonl_with_custom_fields_and_numeric_labels(tmp_path: Path) -> None:
    lines = [json.dumps({"body": f"review number {i}", "stars": i % 2}) for i in range(6)] + [
        json.dumps({"body": "no stars given"}),
        "not json at all",
        json.dumps(["a", "list"]),
        json.dumps({"body": 42, "stars": 1}),
    ]
    data = ("\n".join(lines) + "\n").encode()

    result = ingest_bytes(tmp_path, data, columns=TextColumns(text="body", label="stars"))

    assert result.classes == ["0", "1"]
    assert result.unlabelled == 1
    assert skips(result) == {(8, "bad_row"), (9, "bad_row"), (10, "bad_row")}
    unlabelled = [r for r in iter_text_rows(tmp_path / "files", result.shards) if r.label is None]
    assert [(r.text, r.split) for r in unlabelled] == [("no stars given", None)]


def test_archive_of_txt_folders(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, row in enumerate(fixture_rows()[:40]):
            archive.writestr(f"corpus/{row['label']}/{i}.txt", row["text"].encode("utf-8-sig"))
        archive.writestr("corpus/games/latin1.txt", "caf\xe9 au lait".encode("latin-1"))
        archive.writestr("corpus/games/empty.txt", b"  \n")
        archive.writestr("corpus/README.md", b"about this corpus")

    result = ingest_bytes(tmp_path, buffer.getvalue())

    assert result.modality == "text"
    assert result.num_labelled == 40
    by_path = {s.path: s.code for s in result.skipped}
    assert by_path == {
        "corpus/games/latin1.txt": "bad_encoding",
        "corpus/games/empty.txt": "empty_text",
        "corpus/README.md": "unlabelled",
    }
    texts = {r.text for r in iter_text_rows(tmp_path / "files", result.shards)}
    assert fixture_rows()[0]["text"] in texts  # the BOM is not part of the text


def test_an_archive_skips_each_file_that_cannot_be_a_row_and_reads_on(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        # Each skipped file comes before good ones, so a skip that stopped the reading shows.
        archive.writestr("corpus/loose.txt", b"a text in no class folder")
        archive.writestr("corpus/a/notes.md", b"not a text file")
        archive.writestr("corpus/a/big.txt", b"x" * 101)
        archive.writestr("corpus/a/latin1.txt", "caf\xe9".encode("latin-1"))
        archive.writestr("corpus/a/damaged.txt", b"DAMAGED TEXT")  # stored: its CRC fails below
        for n in range(3):
            archive.writestr(f"corpus/a/{n}.txt", f"first class text {n}".encode())
            # A file deeper down belongs to the class of its top folder.
            archive.writestr(f"corpus/b/2024/{n}.TXT", f"second class text {n}".encode())
    reported: list[tuple[int, int]] = []

    damaged = buffer.getvalue().replace(b"DAMAGED TEXT", b"DAMAGED TEXX")
    result = ingest_bytes(
        tmp_path,
        damaged,
        limits=IngestLimits(max_text_field_bytes=100, min_images_per_class=3),
        progress=lambda done, total: reported.append((done, total)),
    )

    assert [(s.path, s.code, s.reason) for s in result.skipped[:3]] == [
        ("corpus/loose.txt", "unlabelled", "The file is not in a class folder."),
        ("corpus/a/notes.md", "not_text", "Only .txt files are read as texts."),
        ("corpus/a/big.txt", "too_large", "The file is over 100 bytes."),
    ]
    latin1, unreadable = result.skipped[3:]
    assert [(unreadable.path, unreadable.code, unreadable.reason)] == [
        (
            "corpus/a/damaged.txt",
            "unreadable",
            "The file cannot be read from the archive: Bad CRC-32 for file 'corpus/a/damaged.txt'",
        )
    ]
    assert (latin1.path, latin1.code) == ("corpus/a/latin1.txt", "bad_encoding")
    assert latin1.reason.startswith("The file is not UTF-8 text: 'utf-8' codec can't decode")
    assert result.classes == ["a", "b"]
    assert {name: counts["total"] for name, counts in result.class_counts.items()} == {
        "a": 3,
        "b": 3,
    }
    # One report per file read, the last at the total.
    assert reported == [(n, 11) for n in range(1, 12)]


# --- Per-row errors ---------------------------------------------------------------------------


ROWS_WITH_PROBLEMS = (
    b"\xef\xbb\xbftext,label\n"  # 1: header, after a BOM
    b"first good text,a\n"  # 2
    b"caf\xe9 in latin-1,a\n"  # 3: not UTF-8
    b",a\n"  # 4: empty text
    b"nobody labelled this,\n"  # 5: no label
    b'"a text over\ntwo lines",b\n'  # 6-7: one row
    b"" + b"x" * 80 + b",b\n"  # 8: over the 50-byte cap
    b"same words,a\n"  # 9: conflicts with 10
    b"same   words,b\n"  # 10: (whitespace does not make it another text)
    b"second good text,a\n"  # 11
    b"third good text,b\n"  # 12
    b"second good text,a\n"  # 13: a duplicate of 11
)


def test_per_row_errors_carry_line_numbers(tmp_path: Path) -> None:
    result = ingest_bytes(
        tmp_path, ROWS_WITH_PROBLEMS, limits=IngestLimits(max_text_field_bytes=50)
    )

    assert skips(result) == {
        (3, "bad_encoding"),
        (4, "empty_text"),
        (8, "too_large"),
        (9, "conflicting_labels"),
        (10, "conflicting_labels"),
        (13, "duplicate"),
    }
    assert all(s.path is None for s in result.skipped)
    conflicts = [s.reason for s in result.skipped if s.code == "conflicting_labels"]
    assert conflicts == [
        "The same text is at line 10 under label 'b'; rows that disagree are all skipped.",
        "The same text is at line 9 under label 'a'; rows that disagree are all skipped.",
    ]
    assert result.unlabelled == 1
    assert result.class_counts["a"]["total"] == 2  # lines 2 and 11
    assert result.class_counts["b"]["total"] == 2  # lines 6-7 and 12
    texts = {r.text for r in iter_text_rows(tmp_path / "files", result.shards)}
    # Every row kept is written, those after a dropped one (line 9's) too.
    assert texts == {
        "first good text",
        "nobody labelled this",
        "a text over\ntwo lines",
        "second good text",
        "third good text",
    }


def test_shards_hold_their_rows_and_where_each_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(text_module, "SHARD_ROWS", 2)

    def records(folder: Path, shards: list[TextShard]) -> list[dict[str, Any]]:
        lines = [(folder / s.path).read_text(encoding="utf-8").splitlines() for s in shards]
        return [json.loads(line) for shard in lines for line in shard]

    data = b"text,label\none,a\ntwo,a\n\nthree,b\nfour,b\nfive,a\n"
    result = ingest_bytes(tmp_path / "csv", data)
    assert result.shards == [
        TextShard("texts-00000.jsonl", 2),
        TextShard("texts-00001.jsonl", 2),
        TextShard("texts-00002.jsonl", 1),
    ]
    written = records(tmp_path / "csv" / "files", result.shards)
    assert [(r["text"], r["line"]) for r in written] == [
        ("one", 2),
        ("two", 3),
        ("three", 5),
        ("four", 6),
        ("five", 7),
    ]
    assert not any("path" in r for r in written)

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in ("a/0.txt", "a/1.txt", "b/0.txt", "b/1.txt"):
            archive.writestr(f"corpus/{name}", f"text {name}".encode())
    result = ingest_bytes(tmp_path / "zip", buffer.getvalue())
    written = records(tmp_path / "zip" / "files", result.shards)
    assert sorted((r["text"], r["path"]) for r in written) == [
        (f"text {name}", f"corpus/{name}") for name in ("a/0.txt", "a/1.txt", "b/0.txt", "b/1.txt")
    ]
    assert not any("line" in r for r in written)


def test_an_unlabelled_text_is_kept_once(tmp_path: Path) -> None:
    data = (
        b"text,label\n"
        b"one,a\n"  # 2
        b"no label here,\n"  # 3
        b"two,a\n"  # 4
        b"no   label here,\n"  # 5: the same text (whitespace does not count)
        b"another without,\n"  # 6
        b"three,b\n"  # 7
        b"four,b\n"  # 8
    )

    result = ingest_bytes(tmp_path, data)

    assert [(s.line, s.code, s.reason) for s in result.skipped] == [
        (5, "duplicate", "The same unlabelled text came earlier.")
    ]
    assert (result.unlabelled, result.num_labelled) == (2, 4)
    unlabelled = [
        r.text for r in iter_text_rows(tmp_path / "files", result.shards) if r.label is None
    ]
    assert unlabelled == ["no label here", "another without"]


def test_rows_without_label_can_be_skipped_instead(tmp_path: Path) -> None:
    result = ingest_bytes(tmp_path, ROWS_WITH_PROBLEMS, keep_unlabelled=False)

    assert [(s.code, s.reason) for s in result.skipped if s.line == 5] == [
        ("missing_label", "The row has no label.")
    ]
    assert result.unlabelled == 0


def test_a_text_or_label_at_its_cap_is_kept_and_one_past_it_is_skipped(tmp_path: Path) -> None:
    cap = 50
    rows = [
        ("t" * cap, "a"),  # 2: at the text cap
        ("u" * (cap + 1), "a"),  # 3
        ("label at its cap", "L" * 200),  # 4
        ("label past its cap", "M" * 201),  # 5
        ("one", "a"),
        ("two", "L" * 200),
        ("three", "a"),
    ]
    data = "text,label\n" + "".join(f"{text},{label}\n" for text, label in rows)

    result = ingest_bytes(
        tmp_path,
        data.encode(),
        limits=IngestLimits(max_text_field_bytes=cap, min_images_per_class=2),
    )

    assert [(s.line, s.code, s.reason) for s in result.skipped] == [
        (3, "too_large", "The text is over 50 bytes."),
        (5, "bad_label", "The label is over 200 characters."),
    ]
    assert result.class_counts["a"]["total"] == 3
    assert result.class_counts["L" * 200]["total"] == 2


def test_a_text_under_three_labels_is_skipped_every_time(tmp_path: Path) -> None:
    data = b"text,label\nsame,a\none,a\nsame,b\ntwo,b\nsame,a\nthree,a\nfour,b\n"

    result = ingest_bytes(tmp_path, data)

    # Once two rows disagree, a later row agreeing with either is no mere duplicate.
    assert [(s.line, s.code) for s in result.skipped] == [
        (2, "conflicting_labels"),
        (4, "conflicting_labels"),
        (6, "conflicting_labels"),
    ]
    assert result.num_labelled == 4


def test_an_upload_with_no_usable_labelled_text_says_what_was_skipped(tmp_path: Path) -> None:
    with pytest.raises(DatasetRejectedError) as excinfo:
        ingest_bytes(tmp_path, b"text,label\n,a\nno label,\n ,b\n", keep_unlabelled=False)

    assert (excinfo.value.code, excinfo.value.message) == (
        "no_texts",
        "No usable labelled texts were found. Skipped rows: empty_text 2, missing_label 1.",
    )


def test_an_enormous_line_is_one_skipped_row(tmp_path: Path) -> None:
    # 2 MB on one line with a 1 kB field cap: that row is skipped, the rest is read.
    data = b"text,label\n" + b"y" * 2_000_000 + b",a\n" + b"one,a\ntwo,a\nthree,b\nfour,b\n"

    result = ingest_bytes(tmp_path, data, limits=IngestLimits(max_text_field_bytes=1000))

    assert [(s.line, s.code, s.reason) for s in result.skipped] == [
        (2, "too_large", "The row is over 69536 bytes.")  # the line cap: 4 fields and 64 kB
    ]
    assert result.num_labelled == 4


def test_a_line_is_cut_only_past_the_line_cap(tmp_path: Path) -> None:
    # With a 1000-byte field cap a physical line may hold 69536 bytes (4 fields and 64 kB).
    cap = 4 * 1000 + 2**16

    def line(text: str, label: str, size: int) -> str:
        start = f"{text},{label},"
        return start + "z" * (size - len(start))

    rows = ["text,label,note", line("at cap", "a", cap), line("past cap", "a", cap + 1)]
    rows += ["one,a", "two,b", "three,b", line("last at cap", "b", cap)]
    data = "\n".join(rows).encode()  # the last line ends the file without "\n"

    result = ingest_bytes(tmp_path, data, limits=IngestLimits(max_text_field_bytes=1000))

    assert [(s.line, s.code) for s in result.skipped] == [(3, "too_large")]
    texts = {r.text for r in iter_text_rows(tmp_path / "files", result.shards)}
    assert texts == {"at cap", "one", "two", "three", "last at cap"}


def test_an_enormous_line_is_read_a_chunk_at_a_time(tmp_path: Path) -> None:
    """One line of 40 MB costs memory for a chunk of it, not for the line."""
    data = b"text,label\n" + b"y" * 40_000_000 + b",a\none,a\ntwo,a\nthree,b\nfour,b\n"
    upload = tmp_path / "upload"
    upload.write_bytes(data)

    tracemalloc.start()
    try:
        result = ingest_upload(
            upload, tmp_path / "files", limits=IngestLimits(max_text_field_bytes=1000)
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert [(s.line, s.code) for s in result.skipped] == [(2, "too_large")]
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB at the peak"


def test_a_text_uploads_progress_counts_each_byte_once(tmp_path: Path) -> None:
    big = b"y" * 2_500_000 + b",a\n"  # past the line cap and two 1 MiB chunks: all counted
    data = b"text,label\n" + big + b"one,a\ntwo,a\nthree,b\nfour,b\n"
    reported: list[tuple[int, int]] = []

    ingest_bytes(
        tmp_path,
        data,
        limits=IngestLimits(max_text_field_bytes=1000),
        progress=lambda done, total: reported.append((done, total)),
    )

    # About one report a percent (25 kB here): after the enormous line, then at the end.
    total = len(data)
    assert reported == [(len(b"text,label\n") + len(big), total), (total, total)]

    # An archive of one file: the one file read is all of it.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("corpus/a/0.txt", b"a lone text")
    reported.clear()
    with pytest.raises(DatasetRejectedError):
        ingest_bytes(
            tmp_path / "archive",
            buffer.getvalue(),
            progress=lambda done, total: reported.append((done, total)),
        )
    assert reported == [(1, 1)]


def test_a_row_that_is_not_csv_is_skipped_with_the_parsers_reason(tmp_path: Path) -> None:
    data = b"text,label\none,a\ncarriage\rreturn,a\ntwo,a\nthree,b\nfour,b\n"

    result = ingest_bytes(tmp_path, data)

    assert [(s.line, s.code, s.reason) for s in result.skipped] == [
        (
            3,
            "bad_row",
            "The row is not valid CSV: new-line character seen in unquoted field - do you need "
            "to open the file in universal-newline mode?",
        )
    ]
    assert result.num_labelled == 4


def test_blank_and_short_csv_rows(tmp_path: Path) -> None:
    # A row of blank cells is no row; a row with fewer cells than the header lacks the others.
    data = b"text,label\n , \none,a\ntwo,a\nonly a text\nthree,b\nfour,b\n"
    result = ingest_bytes(tmp_path / "label", data)
    assert skips(result) == set()
    assert (result.num_labelled, result.unlabelled) == (4, 1)

    data = b"label,text\na,one\na,two\nb\nb,three\nb,four\n"
    result = ingest_bytes(tmp_path / "text", data)
    assert skips(result) == {(4, "empty_text")}
    assert result.num_labelled == 4

    with pytest.raises(DatasetRejectedError) as excinfo:
        ingest_bytes(tmp_path / "blank", b" , \n,\n")
    assert (excinfo.value.code, excinfo.value.message) == (
        "bad_header",
        "The CSV has no header row and no rows.",
    )


def test_an_enormous_json_line_is_one_skipped_row(tmp_path: Path) -> None:
    big = json.dumps({"text": "y" * 200_000, "label": "a"})
    rows = [json.dumps({"text": f"text {n}", "label": "ab"[n % 2]}) for n in range(6)]
    data = "\n".join([rows[0], big, *rows[1:]]).encode()

    result = ingest_bytes(tmp_path, data, limits=IngestLimits(max_text_field_bytes=1000))

    assert [(s.line, s.code, s.reason) for s in result.skipped] == [
        (2, "too_large", "The line is over 69536 bytes.")  # 4 fields of 1000 bytes + 64 KiB
    ]
    assert result.num_labelled == 6


def test_each_bad_json_line_is_skipped_with_its_line_and_reason(tmp_path: Path) -> None:
    good = [json.dumps({"text": f"text {n}", "label": "ab"[n % 2]}) for n in range(6)]
    lines = [
        good[0],  # 1: the upload is sniffed as JSON Lines by its start
        "not json",  # 2
        "",  # 3: blank lines are passed over
        '["a list"]',  # 4
        '{"text": "caf\xe9", "label": "a"}',  # 5: written below in latin-1
        '{"text": 7, "label": "a"}',  # 6
        '{"text": "listed", "label": ["a"]}',  # 7
        '{"text": "lone \\ud800 high", "label": "a"}',  # 8: escaped lone surrogates
        '{"text": "lone", "label": "\\udfff"}',  # 9
        '{"text": "true", "label": true}',  # 10: not an integer label
        *good[1:],  # 11-15
        '{"text": "numbered", "label": 1}',  # 16
        '{"label": "a"}',  # 17: no text at all
        '{"text": "x", "label": "a", "\xe9": 1}',  # 18: a byte not UTF-8 outside the values
    ]
    data = "\n".join(lines).encode("latin-1")

    result = ingest_bytes(tmp_path, data)

    assert [(s.line, s.code, s.reason) for s in result.skipped[:10]] == [
        (2, "bad_row", "The line is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
        (4, "bad_row", "The line is not a JSON object."),
        (5, "bad_encoding", "The row holds bytes that are not UTF-8 text."),
        (6, "bad_row", "'text' must be a string, not int."),
        (7, "bad_row", "'label' must be a string or an integer, not list."),
        (8, "bad_encoding", "The row holds bytes that are not UTF-8 text."),
        (9, "bad_encoding", "The row holds bytes that are not UTF-8 text."),
        (10, "bad_row", "'label' must be a string or an integer, not bool."),
        (17, "empty_text", "The text is empty."),
        (18, "bad_encoding", "The row holds bytes that are not UTF-8 text."),
    ]
    # The integer label is read as the class name "1", too small a class to keep.
    assert [(s.code, s.reason) for s in result.skipped[10:]] == [
        ("class_too_small", "Class '1' has 1 usable texts, fewer than 2; its rows are left out.")
    ]
    assert result.classes == ["a", "b"]
    assert result.num_labelled == 6


def test_a_missing_column_survives_the_trip_from_the_worker() -> None:
    # Celery pickles a task's exception; the API reads `param` to point at the form field.
    error = MissingColumnError("label_column", "The CSV's header has no column 'label'.")

    copy = pickle.loads(pickle.dumps(error))

    assert type(copy) is MissingColumnError
    assert (copy.param, copy.code, copy.message) == (error.param, "bad_header", error.message)


def test_an_unclosed_quote_cannot_swallow_the_file(tmp_path: Path) -> None:
    after = "".join(f"after {n},c\n" for n in range(50_000)).encode()
    data = b"text,label\none,a\ntwo,a\nthree,b\nfour,b\n" + b'"open quote,b\n' + after

    result = ingest_bytes(tmp_path, data, limits=IngestLimits(max_text_field_bytes=1000))

    assert (6, "bad_row") in skips(result) or (6, "too_large") in skips(result)
    assert result.class_counts["a"]["total"] == 2
    # The quote may take the rows up to the CSV field limit with it (about 34,000 of these
    # short rows), never the rest of the file: its last row is read.
    assert result.class_counts.get("c", {"total": 0})["total"] > 10_000
    texts = {r.text for r in iter_text_rows(tmp_path / "files", result.shards)}
    assert "after 49999" in texts


def test_the_upload_header_check_reads_past_a_bom() -> None:
    """The header is checked before the upload is stored; Excel writes UTF-8 CSV with a BOM."""
    check_csv_header(b"\xef\xbb\xbftext,label\nhello,a\n", TextColumns())
    with pytest.raises(DatasetRejectedError) as excinfo:
        check_csv_header(b"\xef\xbb\xbfbody,label\nhello,a\n", TextColumns())
    assert excinfo.value.code == "bad_header"


def test_the_header_names_each_column_exactly_or_else_in_any_case(tmp_path: Path) -> None:
    columns = TextColumns(text="Description", label="section")
    # An exact name wins over one that differs only in case; otherwise case does not matter.
    rows = "".join(f"short {n},long text {n},{'ab'[n % 2]}\n" for n in range(4))
    result = ingest_bytes(
        tmp_path / "exact", f"description,Description,SECTION\n{rows}".encode(), columns=columns
    )
    texts = {r.text for r in iter_text_rows(tmp_path / "exact" / "files", result.shards)}
    assert texts == {f"long text {n}" for n in range(4)}
    swapped = "".join(f"{'ab'[n % 2]},text {n}\n" for n in range(4))
    result = ingest_bytes(
        tmp_path / "any", f"Section,DESCRIPTION\n{swapped}".encode(), columns=columns
    )
    assert result.num_labelled == 4

    def rejected(head: bytes, wanted: TextColumns) -> MissingColumnError:
        with pytest.raises(MissingColumnError) as excinfo:
            check_csv_header(head, wanted)
        return excinfo.value

    error = rejected(b" body , label \nhello,a\n", TextColumns())
    assert (error.code, error.param, error.message) == (
        "bad_header",
        "text_column",
        "The CSV's header has no column 'text' (found 'body', 'label'); name the column that "
        "holds the text with the text_column form field.",
    )
    error = rejected(b"text,category\n", TextColumns())
    assert (error.param, error.message) == (
        "label_column",
        "The CSV's header has no column 'label' (found 'text', 'category'); name the column "
        "that holds the label with the label_column form field.",
    )
    error = rejected(b"", TextColumns())
    assert error.message.startswith("The CSV's header has no column 'text' (found nothing);")
    # A quoted header cell over two lines is read as the upload's reader reads it: "te\nxt".
    assert rejected(b'"te\nxt",label\nhello,a\n', TextColumns()).param == "text_column"


def test_custom_csv_columns(tmp_path: Path) -> None:
    rows = fixture_rows()[:60]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["package", "Section", "Description"])
    writer.writerows([r["package"], r["label"], r["text"]] for r in rows)
    data = out.getvalue().encode()

    result = ingest_bytes(tmp_path, data, columns=TextColumns(text="description", label="section"))

    assert result.num_labelled == 60
    texts = {r.text for r in iter_text_rows(tmp_path / "files", result.shards)}
    assert texts == {r["text"] for r in rows}

    with pytest.raises(DatasetRejectedError) as excinfo:
        ingest_bytes(tmp_path / "x", data)
    assert excinfo.value.code == "bad_header"
    assert "'text'" in excinfo.value.message


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"text,label\nhello,a\n", "csv"),
        (b'\xef\xbb\xbf{"text": "hi", "label": "a"}\n', "jsonl"),
        (b"PK\x03\x04rest", "archive"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", None),
        (b"just one sentence with no commas\n", None),
        (b"", None),
        (b'\n  {"text": "hi", "label": "a"}\n', "jsonl"),
        (b"text,label\nhel\x00lo,a\n", None),
    ],
    ids=["csv", "jsonl", "zip", "png", "prose", "empty", "jsonl-after-blank", "nul-byte"],
)
def test_upload_kind_is_read_from_content(head: bytes, kind: str | None) -> None:
    assert detect_upload(head) == kind


def test_single_class_text_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DatasetRejectedError) as excinfo:
        ingest_bytes(tmp_path, b"text,label\none,a\ntwo,a\nthree,b\n")
    assert (excinfo.value.code, excinfo.value.message) == (
        "too_few_classes",
        "A dataset needs at least 2 classes with at least 2 usable texts each; found 'a' (2 "
        "texts), 'b' (1 texts).",
    )
    assert not (tmp_path / "files").exists()


# --- Manifest ---------------------------------------------------------------------------------


def test_version_1_image_manifest_still_loads() -> None:
    old = {
        "version": 1,
        "classes": ["cat", "dog"],
        "samples": [
            {"path": "cat/a.png", "label": 0, "split": "train"},
            {"path": "dog/b.png", "label": 1, "split": "val"},
        ],
        "skipped": [{"path": "x.gif", "code": "not_an_image", "reason": "no"}],
        "class_counts": {"cat": {"train": 1, "val": 0, "total": 1}},
    }

    loaded = IngestResult.from_manifest(old)

    assert loaded.modality == "image"
    assert [s.path for s in loaded.samples] == ["cat/a.png", "dog/b.png"]
    assert loaded.skipped[0].path == "x.gif"
    assert loaded.skipped[0].line is None
    assert IngestResult.from_manifest(loaded.to_manifest()) == loaded


def test_text_manifest_round_trips(tmp_path: Path) -> None:
    result = ingest_bytes(
        tmp_path, ROWS_WITH_PROBLEMS, limits=IngestLimits(max_text_field_bytes=50)
    )
    assert IngestResult.from_manifest(json.loads(json.dumps(result.to_manifest()))) == result


def test_the_manifest_lists_the_first_skipped_rows_and_counts_them_all(tmp_path: Path) -> None:
    empty_rows = MAX_LISTED_SKIPPED + 5
    result = ingest_bytes(tmp_path, FIXTURE.read_bytes() + b",games\n" * empty_rows)
    assert result.num_skipped == empty_rows

    manifest = json.loads(json.dumps(result.to_manifest()))
    loaded = IngestResult.from_manifest(manifest)

    assert len(manifest["skipped"]) == MAX_LISTED_SKIPPED
    assert manifest["num_skipped"] == empty_rows
    assert loaded.skipped == result.skipped[:MAX_LISTED_SKIPPED]
    assert loaded.num_skipped == empty_rows
    assert IngestResult.from_manifest(loaded.to_manifest()) == loaded


# --- Over HTTP --------------------------------------------------------------------------------


def post_dataset(
    client: TestClient, auth: dict[str, str], name: str, data: bytes, **fields: str
) -> Any:
    return client.post("/v1/datasets", headers=auth, files={"file": (name, data)}, data=fields)


def test_a_dataset_lists_the_first_skipped_rows_and_counts_them_all(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    empty_rows = MAX_LISTED_SKIPPED + 5
    data = FIXTURE.read_bytes() + b",games\n" * empty_rows  # rows 602 on have no text
    response = post_dataset(client, auth, "debian.csv", data)
    assert response.status_code == 202, response.text
    process_upload(context=context, dataset_id=response.json()["id"])

    shown = client.get(f"/v1/datasets/{response.json()['id']}", headers=auth).json()
    assert shown["status"] == "ready", (shown["error_code"], shown["error_message"])
    assert shown["num_texts"] == 600
    assert shown["num_skipped"] == empty_rows
    assert len(shown["skipped"]) == MAX_LISTED_SKIPPED
    assert [s["line"] for s in shown["skipped"]] == list(range(602, 602 + MAX_LISTED_SKIPPED))
    assert {s["code"] for s in shown["skipped"]} == {"empty_text"}


def test_transferability_scores_minilm_per_encoder_layer(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    """LogME, a linear probe and the per-group curve on minilm_l6's frozen, mean-pooled
    features of the fixture's training texts."""
    rows = fixture_rows()
    labels = sorted({row["label"] for row in rows})
    per_class = {label: [r for r in rows if r["label"] == label][:40] for label in labels}
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["text", "label"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(row for chosen in per_class.values() for row in chosen)
    response = post_dataset(client, auth, "debian.csv", out.getvalue().encode())
    assert response.status_code == 202, response.text
    dataset_id = response.json()["id"]
    process_upload(context=context, dataset_id=dataset_id)

    path = f"/v1/datasets/{dataset_id}/transferability"
    scored = client.post(path, headers=auth, json={"base_models": ["minilm_l6"]})
    assert scored.status_code == 200, scored.text
    body = scored.json()
    assert body["images"] == 32 * len(labels)  # the training split's texts
    (score,) = body["ranking"]
    assert score["base_model"] == "minilm_l6"
    groups = [g["group"] for g in score["groups"]]
    assert groups == ["embeddings", *(f"layer.{i}" for i in range(6))]
    print({g["group"]: round(g["logme"], 3) for g in score["groups"]}, score)
    # Sentence embeddings separate six Debian sections far better than chance (1/6).
    assert score["linear_probe_accuracy"] > 0.6
    # The last layer's masked mean is the encoder's pooled output: the same score.
    assert score["groups"][-1]["logme"] == pytest.approx(score["logme"])
    # Contextual features carry more about the section than the token embeddings alone.
    assert score["logme"] > score["groups"][0]["logme"]
    assert 1 <= score["suggested_partial_groups"] <= len(groups) - 1

    image_model = client.post(path, headers=auth, json={"base_models": ["efficientnet_lite0"]})
    assert image_model.status_code == 422, image_model.text
    error = image_model.json()["error"]
    assert (error["code"], error["param"]) == ("wrong_modality", "base_models[0]")


def test_preselect_keeps_the_text_model_whose_features_fit_best(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    """An experiment on a text dataset scores its text candidates (the pretrained MiniLM and a
    randomly initialised 2-layer BERT folder) before any trial and keeps the better one."""
    write_tiny_bert(context.settings.resolved_weights_dir)
    rows = fixture_rows()
    labels = sorted({row["label"] for row in rows})
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["text", "label"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(r for label in labels for r in [r for r in rows if r["label"] == label][:20])
    response = post_dataset(client, auth, "debian.csv", out.getvalue().encode())
    assert response.status_code == 202, response.text
    process_upload(context=context, dataset_id=response.json()["id"])

    request = experiment_request(
        response.json()["id"],
        model="debian-exp",
        base_models=["hf:tiny_bert", "minilm_l6"],
        strategies=["feature_extraction"],
        settings={"epochs": 1, "max_length": 32, "seed": 1},
        preselect=1,
    )
    created = client.post("/v1/experiments", headers=auth, json=request)
    assert created.status_code == 201, created.text
    preselection = created.json()["preselection"]
    assert (preselection["kept"], preselection["dropped"]) == (["minilm_l6"], ["hf:tiny_bert"])
    assert [r["base_model"] for r in preselection["ranking"]] == ["minilm_l6", "hf:tiny_bert"]
    assert {t["base_model"] for t in created.json()["trials"]} == {"minilm_l6"}


def test_text_dataset_over_http(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    data = FIXTURE.read_bytes() + b"\xff\xfe broken,games\n"
    response = post_dataset(client, auth, "debian.csv", data, val_fraction="0.25")
    assert response.status_code == 202, response.text
    assert response.json()["modality"] == "text"
    dataset_id = response.json()["id"]

    process_upload(context=context, dataset_id=dataset_id)

    shown = client.get(f"/v1/datasets/{dataset_id}", headers=auth).json()
    assert shown["status"] == "ready", (shown["error_code"], shown["error_message"])
    assert shown["modality"] == "text"
    assert shown["num_texts"] == 600
    assert shown["num_images"] == 0
    assert shown["class_counts"]["mail"] == {"train": 75, "val": 25, "total": 100}
    assert shown["imbalance"]["imbalanced"] is False
    assert shown["imbalance"]["ratio"] == 1.0
    assert shown["skipped"] == [
        {
            "path": None,
            "line": 602,
            "code": "bad_encoding",
            "reason": "The row holds bytes that are not UTF-8 text.",
        }
    ]
    lengths = shown["token_lengths"]
    assert (lengths["base_model"], lengths["texts"], lengths["truncated"]) == ("minilm_l6", 600, 0)
    assert 3 <= lengths["median"] <= lengths["p95"] <= lengths["max"] < lengths["max_length"]
    classes, train, val, unlabelled = load_text_rows(context=context, dataset_id=dataset_id)
    assert classes == shown["classes"]
    assert (len(train), len(val), unlabelled) == (450, 150, [])

    image_model = client.get(
        f"/v1/datasets/{dataset_id}", headers=auth, params={"base_model": "efficientnet_lite0"}
    )
    assert image_model.status_code == 422, image_model.text
    assert image_model.json()["error"]["param"] == "base_model"
    scores = client.post(f"/v1/datasets/{dataset_id}/transferability", headers=auth, json={})
    assert scores.status_code == 422, scores.text
    assert scores.json()["error"]["code"] == "wrong_modality"
    spec = {"dataset": dataset_id, "model": "m", "base_model": "efficientnet_lite0", "epochs": 2}
    for path in ("/v1/jobs/plan", "/v1/jobs"):
        refused = client.post(path, headers=auth, json=spec)
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert (error["code"], error["param"]) == ("wrong_modality", "base_model"), error
        assert "text" in error["message"]
    assert (
        client.post(
            "/v1/jobs/plan", headers=auth, json={**spec, "base_model": "minilm_l6"}
        ).status_code
        == 200
    )
    # A text scratch model's own recipe, shown before anything runs.
    scratch = client.post(
        "/v1/jobs/plan",
        headers=auth,
        json={**spec, "base_model": "minilm_l6", "strategy": "scratch"},
    ).json()
    (stage,) = scratch["stages"]
    assert (stage["schedule"], stage["lr"]) == ("one_cycle", 5e-4)
    assert {group["lr"] for group in stage["trainable_groups"]} == {5e-4}
    assert scratch["plan"]["extra"]["preset_defaults"] == {"lr": 5e-4, "schedule": "one_cycle"}
    # A text plan shows its own preprocessing only: no image size, no pixel statistics.
    assert (stage["max_length"], stage["objective"]) == (128, "classify")
    assert "image_size" not in stage
    assert "do not augment" in scratch["plan"]["extra"]["defaults"]["tta_why"]
    assert scratch["plan"]["preprocessing"] == {
        "modality": "text",
        "max_length": 128,
        "truncation": "head",
    }
    assert not {"mean", "std", "image_size"} & set(scratch["plan"])


def test_token_lengths_against_a_shorter_maximum(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    # Rows far longer than minilm_l6's maximum: the summary says how many would be cut.
    long_text = " ".join(r["text"] for r in fixture_rows()[:40])
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["text", "label"])
    writer.writerows([f"{long_text} {i}", "a"] for i in range(3))
    writer.writerows([f"short text {i}", "b"] for i in range(3))
    data = out.getvalue().encode()
    response = post_dataset(client, auth, "long.csv", data)
    assert response.status_code == 202, response.text
    process_upload(context=context, dataset_id=response.json()["id"])
    shown = client.get(f"/v1/datasets/{response.json()['id']}", headers=auth).json()
    assert shown["status"] == "ready", (shown["error_code"], shown["error_message"])
    assert shown["token_lengths"]["truncated"] == 3
    lengths = shown["token_lengths"]
    assert lengths["max"] > lengths["max_length"]
    assert lengths["job_default_max_length"] <= lengths["max_length"]
    assert lengths["truncated_at_job_default"] == 3


def test_custom_columns_over_http(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    lines = [json.dumps({"body": r["text"], "section": r["label"]}) for r in fixture_rows()[:30]]
    data = ("\n".join(lines) + "\n").encode()
    response = post_dataset(
        client, auth, "x.jsonl", data, text_column="body", label_column="section"
    )
    assert response.status_code == 202, response.text
    process_upload(context=context, dataset_id=response.json()["id"])
    shown = client.get(f"/v1/datasets/{response.json()['id']}", headers=auth).json()
    assert shown["status"] == "ready", (shown["error_code"], shown["error_message"])
    assert shown["num_texts"] == 30
    assert (shown["text_column"], shown["label_column"]) == ("body", "section")


def test_non_dataset_upload_is_415(client: TestClient, auth: dict[str, str]) -> None:
    response = post_dataset(client, auth, "photo.csv", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported_upload", "file")
    assert "CSV" in error["message"]
    assert "zip" in error["message"]


def test_csv_without_the_label_column_is_422(client: TestClient, auth: dict[str, str]) -> None:
    response = post_dataset(client, auth, "d.csv", FIXTURE.read_bytes(), label_column="category")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("bad_header", "label_column")
    assert "'category'" in error["message"]
    assert client.get("/v1/datasets", headers=auth).json()["data"] == []


def test_dashboard_shows_text_samples_and_lengths(
    client: TestClient, context: AppContext, auth: dict[str, str]
) -> None:
    data = b"text,label\n" + b"".join(
        f"{r['text']},{r['label']}\n".encode() for r in fixture_rows()[:24] if "," not in r["text"]
    )
    response = post_dataset(client, auth, "few.csv", data + b",games\n")
    assert response.status_code == 202, response.text
    process_upload(context=context, dataset_id=response.json()["id"])

    client.cookies.set("thaw_key", auth["Authorization"].removeprefix("Bearer "), path="/ui")
    page = client.get("/ui/datasets")

    assert page.status_code == 200, page.text
    section = page.text[page.text.index(response.json()["id"]) :]
    assert "texts" in section
    assert 'class="text-samples"' in section
    first = next(r for r in fixture_rows() if "," not in r["text"])
    assert html.escape(first["text"]) in section
    assert 'class="token-lengths"' in section
    assert "minilm_l6" in section
    assert "line " in section  # the skipped empty row, located by its line
