"""Arrow schemas of every table that passes between stages. Defined here once; readers, writers and
tests import them from here.

Conventions: an image is a path relative to the configured image root, "" when the side has no image;
a text is "" when the side has no text. Ids are strings, stable across re-runs of the same input
(the source's own `id` column when it has one, else `<dataset>/<row number>`).
"""

import pyarrow as pa

# One MMEB-train style pair: a query, its positive, and an optional given negative.
PAIRS = pa.schema(
    [
        ("id", pa.string()),
        ("dataset", pa.string()),
        ("qry_text", pa.string()),
        ("qry_image", pa.string()),
        ("pos_text", pa.string()),
        ("pos_image", pa.string()),
        ("neg_text", pa.string()),
        ("neg_image", pa.string()),
    ]
)

# One MMEB-eval style query with its own candidate list; the correct target is at index 0.
EVAL = pa.schema(
    [
        ("id", pa.string()),
        ("dataset", pa.string()),
        ("qry_text", pa.string()),
        ("qry_image", pa.string()),
        ("tgt_text", pa.list_(pa.string())),
        ("tgt_image", pa.list_(pa.string())),
    ]
)

# A row that was set aside instead of read: where it came from and why. Never dropped silently.
QUARANTINE = pa.schema(
    [
        ("source", pa.string()),
        ("row", pa.int64()),
        ("id", pa.string()),
        ("field", pa.string()),
        ("reason", pa.string()),
    ]
)
