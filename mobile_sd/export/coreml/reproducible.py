"""Make a saved ``.mlpackage`` byte-reproducible.

coremltools writes a random UUID per item into the package's ``Manifest.json`` and serializes
the model spec's metadata map in no fixed order, so two saves of the same program differ in
bytes (weights and program are identical). The identifiers are arbitrary keys that only have to
be unique within the package: they are replaced by UUIDs derived from each item's path, and the
spec is re-serialized deterministically. Core ML reads the result like any package. Files
get the mode every other output has (0644).
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

_NAMESPACE = uuid.UUID("6f1d5a8e-0d4b-4c53-9a55-6d6f62696c65")  # mobile-sd's, fixed


def make_reproducible(package: Path) -> Path:
    """Rewrite ``package``'s Manifest.json and model spec deterministically, in place."""
    from coremltools.proto import Model_pb2

    package = Path(package)
    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    renamed = {old: str(uuid.uuid5(_NAMESPACE, entry["path"]))
               for old, entry in manifest.get("itemInfoEntries", {}).items()}
    manifest["itemInfoEntries"] = {renamed[old]: entry for old, entry in
                                   sorted(manifest["itemInfoEntries"].items(),
                                          key=lambda kv: kv[1]["path"])}
    root = manifest.get("rootModelIdentifier")
    if root in renamed:
        manifest["rootModelIdentifier"] = renamed[root]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")
    for spec_path in package.rglob("*.mlmodel"):
        spec = Model_pb2.Model()
        spec.ParseFromString(spec_path.read_bytes())
        spec_path.write_bytes(spec.SerializeToString(deterministic=True))
    for path in package.rglob("*"):   # coremltools leaves the spec 0600 (a temp file's mode)
        if path.is_file():
            path.chmod(0o644)
    return package
