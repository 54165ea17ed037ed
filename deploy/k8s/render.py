"""Copy deploy/serve_config.yaml into the RayService's serveConfigV2 (deploy/k8s/rayservice.yaml).

The serve config is the one source of truth (docs/deploy.md): the RayService embeds it verbatim
as a YAML block scalar. Run after editing the serve config:

    python deploy/k8s/render.py          # rewrite the block
    python deploy/k8s/render.py --check  # exit 1 if the block is out of date (what CI checks)

Only the standard library: it runs without the project installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent.parent
SERVE_CONFIG = DEPLOY / "serve_config.yaml"
RAYSERVICE = DEPLOY / "k8s" / "rayservice.yaml"
KEY = "serveConfigV2: |"


def render(manifest: str, serve_config: str) -> str:
    """The manifest with the block under `serveConfigV2: |` replaced by `serve_config`."""
    lines = manifest.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == KEY)
    key_indent = len(lines[start]) - len(lines[start].lstrip())

    def in_block(line: str) -> bool:  # blank, or indented deeper than the key
        return not line.strip() or len(line) - len(line.lstrip()) > key_indent

    end = start + 1
    while end < len(lines) and in_block(lines[end]):
        end += 1
    pad = " " * (key_indent + 2)
    block = [pad + line if line.strip() else "\n" for line in serve_config.splitlines(True)]
    return "".join([*lines[: start + 1], *block, *lines[end:]])


def main(argv: list[str]) -> int:
    manifest = RAYSERVICE.read_text()
    wanted = render(manifest, SERVE_CONFIG.read_text())
    if "--check" in argv:
        if wanted != manifest:
            print(f"{RAYSERVICE}: serveConfigV2 differs from {SERVE_CONFIG}; run {__file__}")
            return 1
        return 0
    if wanted != manifest:
        RAYSERVICE.write_text(wanted)
        print(f"updated {RAYSERVICE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
