"""The docs say what the code does: the configuration page's tables are the config classes'
own fields, and the site builds with every page in its navigation and every link whole.

`python -m tests.test_docs` rewrites the tables of docs/configuration.md from the code.
"""

from __future__ import annotations

import re
import subprocess
import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from service.config import (
    ModelConfig,
    PipelineConfig,
    PipelineStep,
    ServerConfig,
    TrainingModel,
    VersionConfig,
)

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"
TABLES = {
    "models": ModelConfig,
    "versions": VersionConfig,
    "server": ServerConfig,
    "training": TrainingModel,
    "pipelines": PipelineConfig,
    "pipeline_steps": PipelineStep,
}


def _type(annotation) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(annotation))
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and len(args) < len(typing.get_args(annotation)):  # X | None
        return _type(args[0]) + " (optional)"
    return getattr(annotation, "__name__", str(annotation))


def config_table(model: type[BaseModel], env_prefix: str | None = None) -> str:
    """The markdown table of a config class: key, type, default, what (its description)."""
    rows = ["| key | type | default | what |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if field.default is PydanticUndefined and field.default_factory is None:
            default = "required"
        elif field.default is None or field.default_factory is not None:
            default = "—"
        else:
            default = f"`{field.default}`"
        key = f"`{name}`" + (f"<br>`{env_prefix}{name.upper()}`" if env_prefix else "")
        what = (field.description or "").replace("|", "\\|")
        rows.append(f"| {key} | {_type(field.annotation)} | {default} | {what} |")
    return "\n".join(rows)


def tables() -> dict[str, str]:
    return {
        name: config_table(model, "CONVNEXT_SERVE_" if model is ServerConfig else None)
        for name, model in TABLES.items()
    }


def _marked(name: str) -> re.Pattern:
    # an empty table (a new one) is the marker line, then the end marker's
    return re.compile(rf"(<!-- table:{name} -->\n)(.*?)\n?(<!-- end -->)", re.S)


def test_every_config_key_is_documented_as_the_code_says():
    page = PAGE.read_text()
    for name, table in tables().items():
        found = _marked(name).search(page)
        assert found, f"docs/configuration.md has no table:{name}"
        assert found.group(2) == table, (
            f"docs/configuration.md's {name} table differs from the code: run "
            "`python -m tests.test_docs`"
        )


def test_every_config_field_says_what_it_is():
    for model in TABLES.values():
        missing = [n for n, f in model.model_fields.items() if not f.description]
        assert not missing, f"{model.__name__} fields without a description: {missing}"


def test_the_site_builds_strict(tmp_path):
    """`mkdocs build --strict`: a broken link, a missing page or one left out of the nav fails."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    done = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "architecture" / "index.html").is_file()


if __name__ == "__main__":
    page = PAGE.read_text()
    for name, table in tables().items():
        page = _marked(name).sub(lambda m, t=table: m.group(1) + t + "\n" + m.group(3), page)
    PAGE.write_text(page)
