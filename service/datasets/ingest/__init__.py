"""Turn an upload into a validated dataset: images from an archive, or texts from a CSV, JSON
Lines or an archive of .txt files.

The upload is treated as hostile. `archive` screens archive members by name and type and
streams them to disk under byte caps; `images` decodes every image it keeps; `text` reads rows
one at a time and stores the kept ones as shards; `results` holds what all of them produce (the
manifest, the skipped rows and files with their reasons, the split).
"""

from service.datasets.ingest.images import (
    ImageRejectedError,
    open_image,
    unpack_image_shards,
    write_image_shards,
)
from service.datasets.ingest.results import (
    MANIFEST_VERSION,
    DatasetRejectedError,
    IngestLimits,
    IngestResult,
    Sample,
    SkippedFile,
    TextShard,
    skipped_dict,
)
from service.datasets.ingest.text import (
    MissingColumnError,
    TextColumns,
    TextFormat,
    TextRow,
    check_csv_header,
    iter_text_rows,
)
from service.datasets.ingest.upload import (
    SNIFF_BYTES,
    SUPPORTED_UPLOADS,
    detect_upload,
    ingest_archive,
    ingest_upload,
)

__all__ = [
    "MANIFEST_VERSION",
    "SNIFF_BYTES",
    "SUPPORTED_UPLOADS",
    "DatasetRejectedError",
    "ImageRejectedError",
    "IngestLimits",
    "IngestResult",
    "MissingColumnError",
    "Sample",
    "SkippedFile",
    "TextColumns",
    "TextFormat",
    "TextRow",
    "TextShard",
    "check_csv_header",
    "detect_upload",
    "ingest_archive",
    "ingest_upload",
    "iter_text_rows",
    "open_image",
    "skipped_dict",
    "unpack_image_shards",
    "write_image_shards",
]
