"""Read the records of an offline wandb run (``run-*.wandb``) without network or a wandb server.

The file is ``:W&B`` + 2-byte magic + 1-byte version, then LevelDB-style log blocks of 32 KiB;
each chunk has a 7-byte header (crc32, little-endian length, type: 1 full, 2 first, 3 middle,
4 last) and carries a serialised ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

BLOCK = 32768


def iter_records(path: Path):
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def read_history(path: Path) -> List[Dict[str, object]]:
    """Every logged history row as {key: value}."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for raw in iter_records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({(it.key or "/".join(it.nested_key)): json.loads(it.value_json)
                         for it in rec.history.item})
    return rows
