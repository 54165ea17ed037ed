"""Write a KubeRay CRD's v1 object schema as compact JSON, without its descriptions.

    python tests/schemas/extract_crd.py CRD.yaml tests/schemas/kuberay/NAME.v1.json

The CRDs are ray-project/kuberay `ray-operator/config/crd/bases/`; their descriptions are nine
tenths of their megabyte and no part of what validation checks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def without_descriptions(node):
    if isinstance(node, dict):
        return {k: without_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [without_descriptions(v) for v in node]
    return node


def main(crd_file: str, out: str) -> None:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(Path(crd_file).read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = without_descriptions(version["schema"]["openAPIV3Schema"])
    Path(out).write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
