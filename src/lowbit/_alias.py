"""Keep an old module name working after its code moved: ``alias(__name__, new_module)``.

Every name read from the old module, or set on it (``monkeypatch.setattr(old, "CONSTANT", ...)``),
is the new module's, so patching a constant through the old name still changes the code that
reads it. The old module keeps its own ``__file__`` (tools that import by path stay happy) and a
copy of the new module's names in its ``__dict__``, kept in step on every assignment, for tools
that read ``__dict__`` directly (pytest's monkeypatch records the value to restore from there).
"""

from __future__ import annotations

import sys
import types


class _Forwarding(types.ModuleType):
    def __getattribute__(self, name: str) -> object:
        own = types.ModuleType.__getattribute__(self, "__dict__")
        if name.startswith("__") or name == "_target":
            return types.ModuleType.__getattribute__(self, name)
        return getattr(own["_target"], name)

    def __setattr__(self, name: str, value: object) -> None:
        if not (name.startswith("__") or name == "_target"):
            setattr(types.ModuleType.__getattribute__(self, "__dict__")["_target"], name, value)
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return dir(types.ModuleType.__getattribute__(self, "__dict__")["_target"])


def alias(name: str, target: types.ModuleType) -> None:
    """Make the module ``name`` (already being imported) forward to ``target``."""
    module = sys.modules[name]
    module.__dict__.update({k: v for k, v in vars(target).items() if not k.startswith("__")})
    module.__dict__["_target"] = target
    module.__class__ = _Forwarding
