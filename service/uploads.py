"""Streams a multipart upload's file straight into the artifact store, enforcing size caps while
reading.

FastAPI's `UploadFile` would spool the whole body before our code sees it; parsing the stream
ourselves lets an oversized upload be refused with 413 as soon as it crosses the cap. The file
part never lands on the API's disk or whole in memory: its bytes go through a small bounded
pipe to `ArtifactStore.put_stream` running in a thread (a multipart upload on S3, a temporary
name renamed into place locally), so the object appears only when the whole body arrived and
a refused or broken upload leaves none.
"""

import asyncio
import contextlib
import io
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import ApiError
from service.storage import ArtifactStore, StorageError

MAX_FIELD_BYTES = 16 * 1024
PIPE_BLOCK_BYTES = 2**20
"""The body's bytes are handed to the uploading thread in blocks of about this size."""
PIPE_DEPTH = 4
"""Blocks waiting for the uploading thread at most: the request stream waits beyond that."""
_UPLOADERS = ThreadPoolExecutor(64, thread_name_prefix="upload")
"""Where `put_stream` runs, one thread per upload in flight: apart from the loop's default
executor, whose threads hand blocks over and may wait on these."""


@dataclass
class ReceivedUpload:
    key: str
    """Where the file now is in the store."""
    filename: str
    size: int
    head: bytes
    """The file's first bytes (at most `head_bytes`), to recognise what it holds."""
    fields: dict[str, str]


class UploadAbortedError(Exception):
    """The request ended before its file did; what was streamed is discarded."""


class _Pipe(io.RawIOBase):
    """Blocks of bytes from the request handler to the thread running `put_stream`."""

    def __init__(self) -> None:
        self._blocks: queue.Queue[bytes | BaseException | None] = queue.Queue(PIPE_DEPTH)
        self._current = memoryview(b"")
        self._ended = False
        self._reader_gone = threading.Event()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._current:
            if self._ended:
                return 0
            block = self._blocks.get()
            if block is None:
                self._ended = True
                return 0
            if isinstance(block, BaseException):
                self._ended = True
                raise block
            self._current = memoryview(block)
        size = min(len(buffer), len(self._current))
        buffer[:size] = self._current[:size]
        self._current = self._current[size:]
        return size

    def send(self, block: bytes | BaseException | None) -> None:
        """Queue `block`, waiting while the pipe is full; dropped once the reader is gone."""
        if not self._reader_gone.is_set():
            self._blocks.put(block)

    def reader_gone(self) -> None:
        """The upload ended (failed early, or done): free a sender waiting on a full pipe."""
        self._reader_gone.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._blocks.get_nowait()


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    buffer: bytearray = field(default_factory=bytearray)


class _Receiver:
    def __init__(self, *, file_field: str, max_parts: int, head_bytes: int) -> None:
        self.file_field = file_field
        self.max_parts = max_parts
        self.head_bytes = head_bytes
        self.parts = 0
        self.fields: dict[str, str] = {}
        self.file_started = False
        self.file_ended = False
        self.filename = ""
        self.file_size = 0
        self.head = bytearray()
        self.pending = bytearray()
        """File bytes parsed but not yet handed to the pipe."""
        self._part = _Part()
        self._header_field = b""
        self._header_value = b""

    def _in_file(self) -> bool:
        return self._part.name == self.file_field and self._part.filename is not None

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
        if self._in_file():
            if self.file_started:
                raise ApiError(
                    400, "too_many_files", f"Send one file in field {self.file_field!r}."
                )
            self.file_started = True
            self.filename = os.path.basename(self._part.filename or "") or "upload"

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._in_file():
            self.pending += chunk
            self.file_size += len(chunk)
            if len(self.head) < self.head_bytes:
                self.head += chunk[: self.head_bytes - len(self.head)]
            return
        self._part.buffer += chunk
        if len(self._part.buffer) > MAX_FIELD_BYTES:
            raise ApiError(
                413,
                "field_too_large",
                f"Field {self._part.name!r} is over {MAX_FIELD_BYTES} bytes.",
            )

    def on_part_end(self) -> None:
        if self._in_file():
            self.file_ended = True
        else:
            self.fields[self._part.name] = self._part.buffer.decode("utf-8", "replace")


async def receive_upload(
    request: Request,
    *,
    file_field: str,
    max_bytes: int,
    store: ArtifactStore,
    key: str,
    head_bytes: int,
    max_parts: int = 16,
) -> ReceivedUpload:
    """Stream the file of multipart field `file_field` to `key` in `store` and collect the
    other fields. Any refusal or failure (415, 413, malformed, the client going away) raises
    with nothing stored under `key`."""
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
    receiver = _Receiver(file_field=file_field, max_parts=max_parts, head_bytes=head_bytes)
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
    pipe = _Pipe()
    upload: asyncio.Future[int] | None = None

    async def hand_over(minimum: int) -> None:
        nonlocal upload
        if not receiver.file_started or len(receiver.pending) < minimum:
            return
        if upload is None:
            reader: BinaryIO = io.BufferedReader(pipe, PIPE_BLOCK_BYTES)
            upload = asyncio.get_running_loop().run_in_executor(
                _UPLOADERS, store.put_stream, key, reader
            )
            upload.add_done_callback(lambda _: pipe.reader_gone())
        block, receiver.pending = bytes(receiver.pending), bytearray()
        await asyncio.to_thread(pipe.send, block)
        if upload.done():  # it can only have failed (the end was not sent): say how
            await upload

    received = 0
    try:
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes:
                    raise too_large
                parser.write(chunk)
                await hand_over(PIPE_BLOCK_BYTES)
            parser.finalize()
        except MultipartParseError as exc:
            raise ApiError(
                400, "bad_multipart", f"The multipart body is malformed: {exc}"
            ) from None
        if not receiver.file_ended:
            raise ApiError(
                422, "missing_file", f"No file in multipart field {file_field!r}.", param=file_field
            )
        await hand_over(0)  # the rest; starts the upload of an empty file too
        assert upload is not None
        await asyncio.to_thread(pipe.send, None)
        await upload
    except StorageError as exc:
        await _discard(store, key, pipe, upload)
        raise ApiError(
            503, "storage_unavailable", "The artifact store cannot take the upload now; retry."
        ) from exc
    except BaseException:
        await _discard(store, key, pipe, upload)
        raise
    with contextlib.suppress(KeyError):
        del receiver.fields[file_field]
    return ReceivedUpload(
        key=key,
        filename=receiver.filename,
        size=receiver.file_size,
        head=bytes(receiver.head),
        fields=receiver.fields,
    )


async def _discard(
    store: ArtifactStore, key: str, pipe: _Pipe, upload: "asyncio.Future[int] | None"
) -> None:
    """Stop the upload in flight (its reader fails, so S3 aborts the multipart upload and the
    local store removes its temporary file) and remove anything stored under `key`."""
    if upload is None:
        return
    with contextlib.suppress(BaseException):
        await asyncio.to_thread(pipe.send, UploadAbortedError("the upload did not finish"))
    with contextlib.suppress(BaseException):
        await upload
    await asyncio.to_thread(store.delete, key)
