"""What calling a function or changing a setting can do, from ``data/side_effect_functions.yaml``.

The table is data, not code, so that policies can extend it (``side_effect_functions:``)
without touching the analyser. Lookups are by unqualified lower-case name: a user
function that shadows a built-in name is treated like the built-in, which only ever
makes a statement look stronger than it is.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from hoopops.yamlfile import LocatedYaml, YamlFileError, load_located

DATA_FILE = Path(__file__).resolve().parent.parent / "data" / "side_effect_functions.yaml"
EFFECTS = ("read", "write", "admin")
_NAME = re.compile(r"^[A-Za-z0-9_*?\[\]!-]+$")


@dataclass(frozen=True, slots=True)
class FunctionEffect:
    """``effect`` is read, write or admin; ``dangerous`` the reason when it is dangerous."""

    effect: str = "write"
    dangerous: str | None = None


class EffectTable:
    """Function effects by name (exact names and globs), dangerous settings, languages."""

    def __init__(self, functions: dict[str, FunctionEffect], settings: dict[str, str],
                 trusted_languages: frozenset[str], volatile_safe: tuple[str, ...]) -> None:
        self.functions = dict(functions)
        self.settings = dict(settings)
        self.trusted_languages = trusted_languages
        self.volatile_safe = volatile_safe
        self._exact = {name: eff for name, eff in functions.items() if not _is_glob(name)}
        self._globs = [(re.compile(fnmatch.translate(name)), eff)
                       for name, eff in functions.items() if _is_glob(name)]
        self._safe_exact = frozenset(n for n in volatile_safe if not _is_glob(n))
        self._safe_globs = [re.compile(fnmatch.translate(n)) for n in volatile_safe
                            if _is_glob(n)]
        self._memo: dict[str, FunctionEffect | None] = {}

    def lookup(self, name: str) -> FunctionEffect | None:
        """The effect of calling ``name`` (qualified or not), or None for a plain read."""
        found = self._memo.get(name, _MISSING)
        if found is not _MISSING:
            return found  # type: ignore[return-value]
        base = name.rpartition(".")[2].strip('"').lower()
        effect = self._exact.get(base)
        if effect is None:
            for pattern, candidate in self._globs:
                if pattern.match(base):
                    effect = candidate
                    break
        if len(self._memo) > 20_000:
            self._memo.clear()
        self._memo[name] = effect
        return effect

    def is_volatile_safe(self, name: str) -> bool:
        base = name.lower()
        return base in self._safe_exact or any(p.match(base) for p in self._safe_globs)

    def extended(self, functions: dict[str, FunctionEffect]) -> EffectTable:
        """A copy with ``functions`` added; an added entry never weakens an existing one."""
        merged = dict(self.functions)
        for name, effect in functions.items():
            old = merged.get(name)
            merged[name] = effect if old is None else _stronger(old, effect)
        return EffectTable(merged, self.settings, self.trusted_languages, self.volatile_safe)


_MISSING = object()


def _is_glob(name: str) -> bool:
    return any(ch in name for ch in "*?[")


def _stronger(a: FunctionEffect, b: FunctionEffect) -> FunctionEffect:
    rank = {"read": 0, "write": 1, "admin": 2}
    effect = a.effect if rank[a.effect] >= rank[b.effect] else b.effect
    return FunctionEffect(effect, a.dangerous or b.dangerous)


def parse_function_entries(value: Any, doc: LocatedYaml, key: str) -> dict[str, FunctionEffect]:
    """Entries of a ``functions`` / ``side_effect_functions`` section.

    Accepts a list of names (each a write) or a mapping ``name: effect`` /
    ``name: {effect: ..., dangerous: reason}``; raises YamlFileError naming the line.
    """
    out: dict[str, FunctionEffect] = {}
    if isinstance(value, list):
        for index, name in enumerate(value):
            out[_check_name(name, doc, f"{key}.{index}")] = FunctionEffect("write")
        return out
    if not isinstance(value, dict):
        raise doc.error(key, "expected a list of function names or a mapping of name to "
                        "effect (read, write, admin) or {effect: ..., dangerous: reason}")
    for raw_name, spec in value.items():
        where = f"{key}.{raw_name}"
        name = _check_name(raw_name, doc, where)
        if isinstance(spec, str):
            if spec not in EFFECTS:
                raise doc.error(where, f"unknown effect '{spec}'; use read, write or admin")
            out[name] = FunctionEffect(spec)
        elif isinstance(spec, dict):
            unknown = set(spec) - {"effect", "dangerous"}
            if unknown:
                raise doc.error(f"{where}.{sorted(unknown)[0]}",
                                "unknown key; an entry takes 'effect' and 'dangerous'")
            effect = spec.get("effect", "read" if spec.get("dangerous") else "write")
            if effect not in EFFECTS:
                raise doc.error(f"{where}.effect",
                                f"unknown effect '{effect}'; use read, write or admin")
            reason = spec.get("dangerous")
            if reason is not None and (not isinstance(reason, str) or not reason.strip()):
                raise doc.error(f"{where}.dangerous", "expected the reason, as text")
            out[name] = FunctionEffect(effect, reason)
        else:
            raise doc.error(where, "expected an effect (read, write, admin) or a mapping")
    return out


def _check_name(name: Any, doc: LocatedYaml, key: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise doc.error(key, f"'{name}' is not a function name (letters, digits, _ and the "
                        "globs * ? [..]; no schema)")
    return name.lower()


def _string_list(value: Any, doc: LocatedYaml, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise doc.error(key, "expected a list of names")
    return tuple(v.lower() for v in value)


def load_effect_table(path: Path = DATA_FILE) -> EffectTable:
    doc = load_located(path)
    data = doc.data
    if not isinstance(data, dict):
        raise YamlFileError(path, None, None, "expected a mapping")
    functions = parse_function_entries(data.get("functions", {}), doc, "functions")
    settings_raw = data.get("settings", {})
    if not isinstance(settings_raw, dict):
        raise doc.error("settings", "expected a mapping of setting name to reason")
    settings = {str(k).lower(): str(v) for k, v in settings_raw.items()}
    trusted = frozenset(_string_list(data.get("trusted_languages", []), doc,
                                     "trusted_languages"))
    safe = _string_list(data.get("volatile_without_side_effects", []), doc,
                        "volatile_without_side_effects")
    return EffectTable(functions, settings, trusted, safe)


@cache
def builtin_effects() -> EffectTable:
    """The shipped table (loaded once)."""
    return load_effect_table()
