"""The rule registry: one route for registering transfer rules, keyed by torch target.

A *rule* is a small pure function ``rule(node, ctx) -> Transfer | None``. It reads its fx node and
a read-only :class:`~curvbound.compiler.context.RuleContext` and returns the node's transfer (its
Lipschitz and curvature bound as sympy expressions of its inputs' bounds), or ``None`` to decline
and let the next candidate answer.

Keys are normalised first (:func:`lookup_key`): ``call_function`` nodes by the callable,
``call_method`` nodes by the method name, ``call_module`` nodes by the module class, looked up
along its MRO. A subclass that overrides ``forward`` does not inherit its parent's rule: it is
traced into, or reported as uncovered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from .errors import RegistrationError

__all__ = ["Registry", "DEFAULT_REGISTRY", "rule", "lookup_key", "rule_name", "layered"]

Rule = Callable[..., Any]


def rule_name(fn: Rule) -> str:
    """Qualified name of a rule, as shown in tables and generated code."""
    mod = getattr(fn, "__module__", "") or ""
    for prefix in ("curvbound.passes.rules.", "curvbound.apps."):  # built-in rule modules
        if mod.startswith(prefix):
            mod = mod[len(prefix):]
            break
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", repr(fn))
    return f"{mod}.{name}" if mod else name


def target_name(target: Any) -> str:
    """Readable name of a key: ``torch.tanh``, ``'tanh'`` (method), ``torch.nn.Linear``."""
    if isinstance(target, str):
        return f"method '{target}'"
    if isinstance(target, type):
        return f"{target.__module__}.{target.__qualname__}"
    mod = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if name and name.startswith("_VariableFunctionsClass."):
        return "torch." + name.split(".", 1)[1]
    if mod and name:
        mod = {"torch._C._nn": "torch.nn.functional", "_operator": "operator"}.get(mod, mod)
        if mod.startswith("torch._C._VariableFunctions") or mod == "torch._C":
            mod = "torch"
        return f"{mod}.{name}"
    return repr(target)


class Registry:
    """Transfer rules keyed by torch target, with an optional parent layered underneath.

    Example:
        >>> import torch
        >>> from curvbound.compiler.registry import Registry
        >>> reg = Registry()
        >>> @reg.register(torch.nn.Tanh, torch.tanh, "tanh")
        ... def my_tanh(node, ctx):
        ...     return None
        >>> reg.has(torch.nn.Tanh), reg.has("tanh"), reg.has(torch.nn.ReLU)
        (True, True, False)
    """

    def __init__(self, parent: Registry | None = None):
        self._rules: dict[Any, list[Rule]] = {}
        self.parent = parent

    def register(self, *targets: Any) -> Callable[[Rule], Rule]:
        """Decorator registering ``fn`` for every target in ``targets`` (stacked alias keys)."""
        if not targets:
            raise TypeError(
                "register() needs at least one target (module class, function or method)"
            )

        def deco(fn: Rule) -> Rule:
            _check_rule(fn, targets[0])
            for t in targets:
                self._rules.setdefault(t, []).insert(0, fn)  # latest registration is tried first
            return fn

        return deco

    def unregister(self, *targets: Any) -> None:
        """Remove this registry's own rules for ``targets`` (the parent's stay)."""
        for t in targets:
            self._rules.pop(t, None)

    def add(self, target: Any, fn: Rule) -> None:
        """Register ``fn`` for one target (non-decorator form)."""
        self.register(target)(fn)

    def candidates(self, key: Any) -> list[Rule]:
        """Rules for ``key``: own registrations first, then the parent's."""
        own = list(self._rules.get(key, ()))
        return own + (self.parent.candidates(key) if self.parent is not None else [])

    def has(self, key: Any) -> bool:
        return bool(self.candidates(key))

    def keys(self) -> set[Any]:
        keys = set(self._rules)
        if self.parent is not None:
            keys |= self.parent.keys()
        return keys

    def module_rules(self, cls: type) -> list[Rule]:
        """Rules for a module class along its MRO, stopping where ``forward`` was overridden."""
        for klass in cls.__mro__:
            if klass is nn.Module or klass is object:
                break
            found = self.candidates(klass)
            if found:
                if klass is cls or _same_forward(cls, klass):
                    return found
                return []
        return []

    def __reduce__(self):
        # the default registry is a module-level singleton: pickled by reference (its rules are
        # registered again when the modules that define them are imported)
        if self is DEFAULT_REGISTRY:
            return (_default_registry, ())
        return super().__reduce__()

    def catalogue(self) -> dict[str, list[str]]:
        """``{target name: [rule names]}`` for every key, for docs and coverage tests."""
        return {target_name(k): [rule_name(r) for r in self.candidates(k)] for k in self.keys()}


def _default_registry() -> Registry:
    return DEFAULT_REGISTRY


def _check_rule(fn: Any, target: Any) -> None:
    if not callable(fn) or isinstance(fn, (type, str)):
        raise RegistrationError(
            f"the rule given for {target_name(target)} is {type(fn).__name__} {fn!r:.60}, not a "
            "rule: a rule is a function (node, ctx) -> Transfer | None, e.g. "
            "curvbound.rules.elementwise(slope=..., curvature=...)"
        )


def _same_forward(cls: type, parent: type) -> bool:
    return getattr(cls, "forward", None) is getattr(parent, "forward", None)


DEFAULT_REGISTRY = Registry()


def rule(*targets: Any, registry: Registry | None = None) -> Callable[[Rule], Rule]:
    """Register a transfer rule in the default registry (or ``registry``).

    Example:
        >>> import torch, curvbound
        >>> class Swish(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x * torch.sigmoid(x)
        >>> reg = curvbound.Registry()  # omit registry= to use the default registry
        >>> @curvbound.rule(Swish, registry=reg)
        ... def swish(node, ctx):
        ...     return curvbound.rules.elementwise(slope=1.0999, curvature=0.5)(node, ctx)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), Swish())
        >>> curvbound.compile(net, torch.zeros(1, 3), rules=reg).graph.nodes["_1"]["rule"]
        'curvbound.compiler.registry.swish'
        >>> curvbound.DEFAULT_REGISTRY.has(Swish)
        False
    """
    return (registry if registry is not None else DEFAULT_REGISTRY).register(*targets)


def layered(overrides: Registry | Mapping[Any, Rule | Iterable[Rule]] | None) -> Registry:
    """The registry for one ``compile`` call: per-call overrides on top of the default registry."""
    if overrides is None:
        return DEFAULT_REGISTRY
    if isinstance(overrides, Registry):
        top = Registry(parent=DEFAULT_REGISTRY)
        for k in overrides.keys():
            for fn in reversed(overrides.candidates(k)):
                top.add(k, fn)
        return top
    if not isinstance(overrides, Mapping):
        raise RegistrationError(
            f"rules must be a curvbound.Registry or a mapping {{target: rule}}, got "
            f"{type(overrides).__name__}"
        )
    top = Registry(parent=DEFAULT_REGISTRY)
    for k, fns in overrides.items():
        if isinstance(fns, (str, bytes)) or not (callable(fns) or isinstance(fns, Iterable)):
            _check_rule(fns, k)  # raises: a string would be iterated character by character
        for fn in [fns] if callable(fns) else list(fns)[::-1]:
            top.add(k, fn)
    return top


def lookup_key(node: fx.Node, root: nn.Module) -> Any:
    """The registry key of a node: the callable, the method name, or the module class."""
    if node.op == "call_function":
        return node.target
    if node.op == "call_method":
        return node.target
    if node.op == "call_module":
        return type(root.get_submodule(node.target))
    return None


def rules_for(node: fx.Node, root: nn.Module, registry: Registry) -> list[Rule]:
    """Candidate rules for a node, most specific first."""
    key = lookup_key(node, root)
    if key is None:
        return []
    if node.op == "call_module":
        return registry.module_rules(key)
    found = registry.candidates(key)
    if not found and node.op == "call_function" and isinstance(key, torch._ops.OpOverload):
        found = registry.candidates(key.overloadpacket)
    return found
