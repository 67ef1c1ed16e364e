"""Name -> class registries for strategies, scenarios and models.

Built-ins are registered explicitly (see ``builtins.py``); third-party packages add entries
through the entry-point groups ``cl_bench.strategies``, ``cl_bench.scenarios`` and
``cl_bench.models``, which are read only when a name is looked up or listed. A name
registered twice is an error that names both origins.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from importlib.metadata import entry_points

from cl_bench.errors import UserError


class Registry:
    def __init__(self, kind: str, group: str):
        self.kind, self.group = kind, group
        self._entries: dict[str, object] = {}
        self._origins: dict[str, str] = {}
        self._lazy: dict[str, object] = {}  # name -> EntryPoint not yet imported
        self._scanned = False
        self.fallback = None  # name -> object or None, tried for names nobody registered
        self.fallback_help: dict[str, str] = {}  # pattern -> description, shown by `cl-bench list`

    def register(self, name: str, obj, origin: str | None = None):
        origin = origin or f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"
        if name in self._origins and self._origins[name] != origin:
            raise UserError(f"{self.kind} '{name}' is registered twice: by {self._origins[name]} and by {origin}")
        self._entries[name] = obj
        self._origins[name] = origin
        if isinstance(obj, type):
            obj.registered_name = name
        return obj

    def _scan_entry_points(self):
        if self._scanned:
            return
        self._scanned = True
        import cl_bench._builtins  # noqa: F401  (built-ins first, so plugin clashes name both origins)
        for ep in entry_points(group=self.group):
            origin = f"{ep.value} (entry point of {ep.dist.name if ep.dist else 'unknown package'})"
            if ep.name in self._origins and self._origins[ep.name] != origin:
                raise UserError(f"{self.kind} '{ep.name}' is registered twice: by "
                                f"{self._origins[ep.name]} and by {origin}")
            self._origins[ep.name] = origin
            self._lazy[ep.name] = ep

    def names(self) -> list[str]:
        self._scan_entry_points()
        return sorted(self._origins)

    def origin(self, name: str) -> str:
        self.get(name)
        return self._origins[name]

    def get(self, name: str):
        self._scan_entry_points()
        if name in self._entries:
            return self._entries[name]
        if name in self._lazy:
            try:
                obj = self._lazy.pop(name).load()
            except Exception as error:  # a broken plugin must not crash the harness with a traceback
                raise UserError(f"{self.kind} '{name}' from {self._origins[name]} failed to import: "
                                f"{type(error).__name__}: {error}") from error
            if isinstance(obj, type):
                obj.registered_name = name
        elif self.fallback is not None and (obj := self.fallback(name)) is not None:
            self._origins[name] = getattr(obj, "description", "fallback")
        else:
            raise UserError(f"unknown {self.kind} '{name}'{suggest(name, self.names())}")
        self._entries[name] = obj
        return obj

    def describe(self, name: str) -> str:
        obj = self.get(name)
        text = getattr(obj, "description", "") or (inspect.getdoc(obj) or "").split("\n")[0]
        return text.strip()


def suggest(word: str, options) -> str:
    """' (did you mean: a, b?)' for close matches, else ''."""
    close = difflib.get_close_matches(str(word), list(options), n=3, cutoff=0.6)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def hyperparameters(obj) -> dict[str, inspect.Parameter]:
    """Keyword-only parameters of a class constructor or a function, walking up the class
    hierarchy while a constructor forwards ``**kwargs``; subclasses override parents' defaults."""
    found: dict[str, inspect.Parameter] = {}
    targets = [klass.__init__ for klass in obj.__mro__ if "__init__" in vars(klass)] \
        if isinstance(obj, type) else [obj]
    for function in targets:
        if function is object.__init__:
            break
        try:
            parameters = inspect.signature(function, eval_str=True).parameters.values()
        except Exception:  # an annotation that does not evaluate: keep it as text
            parameters = inspect.signature(function).parameters.values()
        for parameter in parameters:
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
                found.setdefault(parameter.name, parameter)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            break
    return found


def import_plugins(modules) -> None:
    """Import local modules named by ``plugins=[...]``; they register themselves on import
    (after the built-ins, so a clashing name is reported against the built-in's origin)."""
    import cl_bench._builtins  # noqa: F401
    for module in modules or []:
        if not isinstance(module, str) or not module.strip():
            raise UserError(f"plugins= takes module names (strings), got {str(module)[:60]!r}")
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise UserError(f"plugin module '{module}' could not be imported: {error}") from error
        except (TypeError, ValueError) as error:  # a relative or malformed module name
            raise UserError(f"plugin module '{module}' is not an importable module name: {error}") from error


STRATEGIES = Registry("strategy", "cl_bench.strategies")
SCENARIOS = Registry("scenario", "cl_bench.scenarios")
MODELS = Registry("model", "cl_bench.models")


def register_strategy(name: str):
    return lambda cls: STRATEGIES.register(name, cls)


def register_scenario(name: str):
    return lambda cls: SCENARIOS.register(name, cls)


def register_model(name: str):
    return lambda fn: MODELS.register(name, fn)
