"""Load YAML files keeping the line of every key, so errors can name file, line and key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class YamlFileError(Exception):
    """A YAML file that cannot be used; the message names the file, line and key."""

    def __init__(self, file: str | Path, line: int | None, key: str | None, reason: str) -> None:
        self.file = str(file)
        self.line = line
        self.key = key
        self.reason = reason
        where = self.file + (f":{line}" if line else "")
        what = f" key '{key}'" if key else ""
        super().__init__(f"{where}:{what} {reason}".replace(": ", ": ", 1))


@dataclass
class LocatedYaml:
    """Parsed YAML data plus the 1-based line of each key path ("a.b.0.c")."""

    file: str
    data: Any
    lines: dict[str, int] = field(default_factory=dict)

    def line_of(self, key_path: str) -> int | None:
        """The line of ``key_path`` or of its nearest ancestor that has one."""
        path = key_path
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path.rpartition(".")[0]
        return None

    def error(self, key_path: str, reason: str) -> YamlFileError:
        return YamlFileError(self.file, self.line_of(key_path), key_path or None, reason)


def _walk(node: yaml.Node, prefix: str, lines: dict[str, int]) -> Any:
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node)) if not isinstance(
                key_node, yaml.ScalarNode) else _scalar(key_node)
            path = f"{prefix}.{key}" if prefix else str(key)
            lines[path] = key_node.start_mark.line + 1
            out[key] = _walk(value_node, path, lines)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item in enumerate(node.value):
            path = f"{prefix}.{index}" if prefix else str(index)
            lines[path] = item.start_mark.line + 1
            items.append(_walk(item, path, lines))
        return items
    return _scalar(node)


_CONSTRUCTOR = yaml.SafeLoader("")


def _scalar(node: yaml.Node) -> Any:
    if node.tag == "tag:yaml.org,2002:str":
        return node.value
    # Build the value straight from the node (a null, int, bool, float, timestamp...);
    # re-serialising an empty scalar would not parse back.
    return _CONSTRUCTOR.construct_object(node, deep=True)


def load_located(path: str | Path, text: str | None = None) -> LocatedYaml:
    """Parse ``path`` (or ``text`` attributed to it); a syntax error names file and line."""
    file = str(path)
    try:
        source = Path(path).read_text(encoding="utf-8") if text is None else text
    except OSError as exc:
        raise YamlFileError(file, None, None, f"cannot read file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise YamlFileError(file, None, None, "file is not valid UTF-8") from None
    try:
        node = yaml.compose(source, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark else None
        raise YamlFileError(file, line, None, f"invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise YamlFileError(file, None, None, f"invalid YAML: {exc}") from None
    lines: dict[str, int] = {}
    data = _walk(node, "", lines) if node is not None else None
    return LocatedYaml(file, data, lines)
