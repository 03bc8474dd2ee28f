"""What a decoder hands the ingest pipeline: column batches ready for the store.

Decoders (``collector.otlp``) turn one OTLP export request into Arrow tables
whose columns are named exactly as in ``collector.schema``; the pipeline
(``collector.ingest``) queues and writes them without looking inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa


from tailscope.errors import BadPayload, PayloadTooLarge  # noqa: F401  (re-exported for decoders)

@dataclass
class Decoded:
    """One decoded export request.

    ``accepted`` counts spans / data points / log records that will be stored;
    ``rejected`` those dropped as invalid, with ``errors`` saying why (this
    becomes the OTLP partial-success ``error_message``).
    """

    signal: str  # "traces" | "metrics" | "logs"
    tables: dict[str, "pa.Table"] = field(default_factory=dict)
    accepted: int = 0
    rejected: int = 0
    errors: list[str] = field(default_factory=list)
    truncated_values: int = 0  # attribute values cut to max_attribute_bytes

    @property
    def rows(self) -> int:
        return sum(t.num_rows for t in self.tables.values())
