"""Global models as safetensors files named by their Cohort digest (``models/<hex>.safetensors``), owner-only."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common import failpoints, files
from common.serde import EncodedTensors, decode_views, encode


class ModelStore:
    def __init__(self, root: Path, label: str = "state_dir/models") -> None:
        self.root = root
        files.private_dir(root, label)
        for stale in root.glob("*.tmp"):  # a write cut short by a crash; the model it held was never committed
            stale.unlink(missing_ok=True)

    def path_for(self, version: str) -> Path:
        hexdigest = version.removeprefix("sha256:")
        if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
            raise ValueError(f"not a model version: {version!r}")
        return self.root / f"{hexdigest}.safetensors"

    def save(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> EncodedTensors:
        """Write the model (atomically: temp file, fsync, rename) and return its wire encoding."""
        return self.save_encoded(encode(tensors), metadata)

    def save_encoded(self, encoded: EncodedTensors, metadata: dict[str, str] | None = None) -> EncodedTensors:
        """Write an encoded model; the file is written from the encoding's own buffer (no copy of the model)."""
        path = self.path_for(encoded.version)
        if not path.exists() or not self._intact(encoded.version):
            tmp = files.create_private(path.with_suffix(".tmp"))  # 0600 before a byte is written; save_file keeps it
            save_file(
                views_of(encoded),
                str(tmp),
                metadata={
                    **(metadata or {}),
                    "cohort_version": encoded.version,
                    "cohort_order": json.dumps([s.name for s in encoded.specs]),
                },
            )
            failpoints.hit("coordinator.checkpoint_writing", round=int((metadata or {}).get("round", "0")))
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            files.fsync_dir(self.root)
        return encoded

    def _intact(self, version: str) -> bool:
        try:
            self.load(version)
        except (OSError, ValueError):
            return False
        return True

    def load(self, version: str) -> dict[str, torch.Tensor]:
        """Load a model and check it still hashes to its name."""
        return self.load_encoded(version)[0]

    def load_encoded(self, version: str) -> tuple[dict[str, torch.Tensor], EncodedTensors]:
        """Load a model, check it still hashes to its name, and return it with its wire encoding."""
        path = self.path_for(version)
        with safe_open(str(path), framework="pt") as f:
            order = json.loads((f.metadata() or {}).get("cohort_order", "[]"))
        loaded: dict[str, torch.Tensor] = load_file(str(path))
        # safetensors does not keep insertion order; the digest covers the model's own order.
        tensors = {name: loaded[name] for name in order} if set(order) == set(loaded) else loaded
        encoded = encode(tensors)
        del tensors, loaded  # the model is held once: as the encoding's buffer, the tensors as views into it
        if encoded.version != version:
            raise ValueError(f"model file {path} does not hash to its name; it was altered or damaged")
        return views_of(encoded), encoded


def views_of(encoded: EncodedTensors) -> dict[str, torch.Tensor]:
    """The model's tensors sharing the encoding's buffer (read-only by convention: nothing writes a global model)."""
    assert isinstance(encoded.data, bytearray), "a global model's encoding owns a bytearray"
    return decode_views(encoded.specs, encoded.data)
