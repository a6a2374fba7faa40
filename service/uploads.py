"""Streams a multipart upload to a file on disk, enforcing size caps while reading.

FastAPI's `UploadFile` would spool the whole body before our code sees it; parsing the stream
ourselves lets an oversized upload be refused with 413 as soon as it crosses the cap.
"""

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import ApiError

MAX_FIELD_BYTES = 16 * 1024


@dataclass
class ReceivedUpload:
    path: Path
    filename: str
    size: int
    fields: dict[str, str]


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    buffer: bytearray = field(default_factory=bytearray)


class _Receiver:
    def __init__(self, *, file_field: str, scratch_dir: str, max_parts: int) -> None:
        self.file_field = file_field
        self.scratch_dir = scratch_dir
        self.max_parts = max_parts
        self.parts = 0
        self.fields: dict[str, str] = {}
        self.file: IO[bytes] | None = None
        self.file_path: Path | None = None
        self.filename = ""
        self.file_size = 0
        self._part = _Part()
        self._header_field = b""
        self._header_value = b""

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise ApiError(
                400, "too_many_parts", f"At most {self.max_parts} multipart parts are accepted."
            )
        self._part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._part.headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._part.headers.get(b"content-disposition", b""))
        self._part.name = options.get(b"name", b"").decode("utf-8", "replace")
        raw_filename = options.get(b"filename")
        self._part.filename = (
            None if raw_filename is None else raw_filename.decode("utf-8", "replace")
        )
        if self._part.name == self.file_field and self._part.filename is not None:
            if self.file is not None:
                raise ApiError(
                    400, "too_many_files", f"Send one file in field {self.file_field!r}."
                )
            handle, name = tempfile.mkstemp(dir=self.scratch_dir, prefix="upload-")
            self.file = os.fdopen(handle, "wb")
            self.file_path = Path(name)
            self.filename = os.path.basename(self._part.filename) or "upload"

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._part.name == self.file_field and self.file is not None and self._part.filename:
            self.file.write(chunk)
            self.file_size += len(chunk)
            return
        self._part.buffer += chunk
        if len(self._part.buffer) > MAX_FIELD_BYTES:
            raise ApiError(
                413,
                "field_too_large",
                f"Field {self._part.name!r} is over {MAX_FIELD_BYTES} bytes.",
            )

    def on_part_end(self) -> None:
        if self._part.filename is None:
            self.fields[self._part.name] = self._part.buffer.decode("utf-8", "replace")

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.file_path is not None:
            self.file_path.unlink(missing_ok=True)


async def receive_upload(
    request: Request,
    *,
    file_field: str,
    max_bytes: int,
    scratch_dir: str,
    max_parts: int = 16,
) -> ReceivedUpload:
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Send multipart/form-data with the archive in field {file_field!r}.",
        )
    too_large = ApiError(
        413, "upload_too_large", f"The upload is over the {max_bytes}-byte limit.", param=file_field
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    receiver = _Receiver(file_field=file_field, scratch_dir=scratch_dir, max_parts=max_parts)
    callbacks = {
        name: getattr(receiver, name)
        for name in (
            "on_part_begin",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
            "on_part_data",
            "on_part_end",
        )
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise too_large
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        receiver.discard()
        raise ApiError(400, "bad_multipart", f"The multipart body is malformed: {exc}") from None
    except BaseException:
        receiver.discard()
        raise
    if receiver.file is None or receiver.file_path is None:
        raise ApiError(
            422, "missing_file", f"No file in multipart field {file_field!r}.", param=file_field
        )
    receiver.file.close()
    with contextlib.suppress(KeyError):
        del receiver.fields[file_field]
    return ReceivedUpload(
        path=receiver.file_path,
        filename=receiver.filename,
        size=receiver.file_size,
        fields=receiver.fields,
    )
