"""The YAML reader for configs and command-line values: strict (a key given twice is an error, 3:5
stays text) and bounded (size, values after alias expansion, depth), so hostile or broken input is one
line, within seconds, before anything is written.
"""

from __future__ import annotations

import yaml

from launch.errors import UserError

# Bounds on one YAML text. PyYAML builds an alias as a shared reference, so a "billion laughs" bomb parses
# in microseconds and explodes only when the tree is walked (asdict, safe_dump of the saved config): the
# composer counts values and depth as the expanded tree would hold them. No real config comes near.
MAX_CONFIG_BYTES = 1 << 20
MAX_VALUES = 100_000
MAX_DEPTH = 100


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one silently),
    and a text that expands to more than MAX_VALUES values or MAX_DEPTH levels."""

    def compose_document(self):
        self._values, self._depth, self._open, self._expanded = 0, 0, set(), {}
        return super().compose_document()

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:  # &a [*a]: an endless tree
                raise UserError(f"{self.name}: alias *{event.anchor} at line {line} refers to a value that contains it")
            node = super().compose_node(parent, index)
            self._check(*self._expand(node), line)
            return node
        self._check(1, 1, line)  # before composing: deep nesting would exhaust Python's stack first
        self._depth += 1
        self._open.add(event.anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open.discard(event.anchor)

    def _check(self, values: int, depth: int, line: int) -> None:
        self._values += values
        if self._values > MAX_VALUES:
            raise UserError(f"{self.name}: more than {MAX_VALUES:,} values once aliases are expanded (at line {line}); a config never needs that many: an alias bomb?")
        if self._depth + depth > MAX_DEPTH:
            raise UserError(f"{self.name}: values nested more than {MAX_DEPTH} deep (at line {line})")

    def _expand(self, node) -> tuple[int, int]:
        """(values, depth) of a node with every alias inside expanded; memoised, so a bomb is counted, not walked."""
        if id(node) not in self._expanded:
            kids = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value if isinstance(node, yaml.SequenceNode) else []
            sizes = [self._expand(k) for k in kids]
            self._expanded[id(node)] = (1 + sum(v for v, _ in sizes), 1 + max((d for _, d in sizes), default=0))
        return self._expanded[id(node)]

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden here
                continue
            _refuse_colon_without_space(key_node, value_node, node.flow_style, self.name, self.one_line)
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise UserError(f"{self.name}: key '{key}' is given twice in one mapping (lines {seen[key]} and {line})")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):
        # YAML 1.1 reads 3:5 as the base-60 number 185; here it stays the text (log.profile_steps=3:5).
        return node.value if ":" in node.value else super().construct_yaml_int(node)

    def construct_yaml_float(self, node):
        return node.value if ":" in node.value else super().construct_yaml_float(node)


def _refuse_colon_without_space(key_node, value_node, flow: bool, name: str, one_line: bool) -> None:
    """`{d_model:32}` is the key 'd_model:32' with no value in YAML (a colon separates only when a space
    follows it), which a mapping setting would pass on as {'d_model:32': None} and the constructor ignore.
    A plain (unquoted) key holding a colon, with no value at all, is that mistake: refused, saying what was meant."""
    if not (isinstance(key_node, yaml.ScalarNode) and key_node.style is None and ":" in key_node.value):
        return
    if not (isinstance(value_node, yaml.ScalarNode) and value_node.tag == "tag:yaml.org,2002:null" and value_node.value == ""):
        return
    k, _, v = key_node.value.partition(":")
    meant = f"{{{k}: {v}}}" if flow else f"{k}: {v}"
    at = "" if one_line else f" at line {key_node.start_mark.line + 1}"
    raise UserError(f"{name}: '{key_node.value}'{at} reads as a key with no value "
                    f"(YAML needs a space after the colon): write {meant} (or quote the key if it really holds a colon)")


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _StrictLoader.construct_yaml_float)


def yaml_text(text: str, name: str):
    """Parse one YAML document; every problem named above is a UserError naming `name`."""
    loader = _StrictLoader(text)
    loader.name, loader.one_line = name, "\n" not in text.strip()
    try:
        return loader.get_single_data()
    except ValueError as e:  # e.g. an integer of more than 4300 digits (Python's int() limit)
        raise UserError(f"{name}: {str(e).splitlines()[0].split(';')[0]}") from None
    finally:
        loader.dispose()
