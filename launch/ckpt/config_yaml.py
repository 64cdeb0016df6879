"""The YAML config written beside a converted checkpoint: every key of ``Config``, in the
dataclasses' order, each with a comment (where the value came from, else the comment the
shipped ``configs/tiny.yaml`` gives that key), so it loads with ``moe train`` and mirrors
the dataclasses as every shipped config does."""

from __future__ import annotations

import re
from typing import Any

import yaml

from launch.config import Config, shipped_configs, to_dict

_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[a-z_]+):[^#]*#\s*(?P<comment>.*)$")


def shipped_comments() -> dict[str, str]:
    """``{section.key: comment}`` (and ``{section: comment}``) from ``configs/tiny.yaml``."""
    comments: dict[str, str] = {}
    section = ""
    for line in (shipped_configs() / "tiny.yaml").read_text().splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        if not match["indent"]:
            section = match["key"]
            comments[section] = match["comment"]
        else:
            comments[f"{section}.{match['key']}"] = match["comment"]
    return comments


def _scalar(value: Any) -> str:
    # A one-element flow list, unwrapped: YAML's own spelling of the scalar (1.0e-05, null, 'text').
    return yaml.safe_dump([value], default_flow_style=True, width=10**6).strip()[1:-1]


def config_yaml(cfg: Config, header: str, notes: dict[str, str]) -> str:
    """The config as commented YAML; ``notes`` (``section.key -> text``) replace the default comments."""
    comments = shipped_comments() | notes
    lines = [f"# {line}" for line in header.splitlines()] + [""]
    for section, values in to_dict(cfg).items():
        lines.append(f"{section + ':':<26}  # {comments.get(section, section)}")
        for key, value in values.items():
            entry = f"  {key}: {_scalar(value)}"
            lines.append(f"{entry:<26}  # {comments.get(f'{section}.{key}', key)}")
        lines.append("")
    return "\n".join(lines)
