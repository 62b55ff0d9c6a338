"""A user's files: reading them (every failure a UserError naming the file, and the line where one is
known), and the modes of the files written beside them."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from dalign_jax.errors import UserError


def read_text(path: str | Path, what: str = "file") -> str:
    """The file as UTF-8 text. `what` names it in errors ("prompts file", "spec file", ...)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: {what} is a directory, not a file")
    if not path.is_file():
        raise UserError(f"{path}: {what} does not exist")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column})") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error, not last-one-wins."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # PyYAML reports unhashable keys itself
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise UserError(f"{self._source}:{line}: key {key!r} repeats line {first_line[key]}")
            first_line[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str):
    """YAML as plain data; invalid YAML and repeated keys are errors naming `source` and the line."""
    loader = _UniqueKeyLoader(text)
    loader._source = source
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise UserError(f"{source}: invalid YAML: {e}") from None
    finally:
        loader.dispose()


def creation_mode(directory: bool = False) -> int:
    """The mode `open` or `mkdir` would give under the process's umask: temporary files and directories
    (0600, 0700) get it before they are renamed into place."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask
