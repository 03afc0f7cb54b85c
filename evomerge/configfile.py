"""Reading YAML config files into validated models, with one-line errors naming file and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

#: Values (scalars, lists, mappings) that aliases (``*name``) may add to a YAML document beyond those
#: written in it: a few anchors can stand for billions of values (a "billion laughs" alias bomb),
#: which whatever walks the document would build.
ALIAS_EXPANSION_LIMIT = 100_000


def read_yaml(path: str | Path, error: type[Exception]) -> Any:
    """The parsed YAML of ``path``; unreadable files, YAML syntax errors and aliases expanding beyond
    ``ALIAS_EXPANSION_LIMIT`` raise ``error``, in one line naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    return parse_yaml(text, str(path), error)


def parse_yaml(text: str, where: str, error: type[Exception]) -> Any:
    """``text`` parsed as one YAML document (safe types only), its size with aliases expanded checked
    on the composed nodes before any value is built."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        written, expanded = _node_counts(node)
        if expanded is None:
            raise error(f"{where}: an alias (*name) refers to a node that holds it: the document never ends")
        if expanded - written > ALIAS_EXPANSION_LIMIT:
            raise error(
                f"{where}: its aliases (*name) expand it beyond {ALIAS_EXPANSION_LIMIT:,} values "
                "(a YAML alias bomb?); refusing to read it"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise error(f"{where}: not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise error(f"{where}: not valid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def _node_counts(root: yaml.Node) -> tuple[int, int | None]:
    """(distinct nodes, nodes with every alias expanded) of a composed document; None for the second
    when an alias sits inside the node it names (endless). Iterative: no depth meets Python's limit."""
    expanded: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        children = _children(node)
        if children_done:
            open_nodes.discard(id(node))
            expanded[id(node)] = 1 + sum(expanded[id(c)] for c in children)
            continue
        if id(node) in expanded:
            continue
        if id(node) in open_nodes:  # reached again from inside itself: a recursive alias
            return len(expanded), None
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in expanded)
    return len(expanded), expanded[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def field_path(loc: tuple) -> str:
    """pydantic's error location as a field path: ``models[0].parameters``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe(e: ValidationError, unsupported: dict[str, str] | None = None) -> str:
    """The first validation error in one line: the field path and what is wrong with it.

    ``unsupported``: known-but-unsupported key -> what it is, added to the message.
    """
    err = e.errors()[0]
    loc = field_path(tuple(err["loc"]))
    key = str(err["loc"][-1]) if err["loc"] else ""
    if err["type"] == "extra_forbidden":
        why = (unsupported or {}).get(key)
        return f"unsupported key '{loc}'" + (f" ({why} is not supported)" if why else "")
    if err["type"] == "missing":
        return f"missing required field '{loc}'"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg
