"""Which cached results a call makes stale, as cache tag groups. No I/O here.

Every cached result carries tags (``InvalidationIndex.tags``): its tool, its tenant (or
the shared tag of a ``shared_cache`` tool), one per argument value (``arg:``) and, for
an argument that some rule compares as a path, one per directory the path is in
(``under:``). Arguments are first put in their tool's canonical form
(``Tool.cache_args``), and path arguments made lexically normal, so two spellings of one
value carry the same tag.

Results are then named by tag groups - the entries carrying every tag of one group -
which the cache service removes in one ``Invalidate`` call, in memory or in Redis alike,
so every gateway replica sees the same removal:

- tool T's results for tenant X: ``[tool:T, tenant:X]``;
- ... whose argument k is v: ``+ arg(T, k, v)``;
- ... whose path argument k is p, inside p, or a parent directory of p: one group with
  ``+ under(T, k, p)`` and one with ``+ arg(T, k, d)`` for each directory d above p.

A side-effecting tool's ``invalidates`` rules (``config.Invalidation``) name tools by
name or pattern; they are resolved against the registry once (``InvalidationIndex``),
which also decides which arguments are compared as paths. ``PendingWrites`` closes the
window where a result computed before an invalidation would be stored after it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from trellis_toolgateway.cache_keys import (
    arg_tag,
    cache_tags,
    normal_path,
    path_prefixes,
    tenant_tag,
    tool_tag,
    under_tag,
)
from trellis_toolgateway.tools.base import Json, Tool
from trellis_toolgateway.tools.config import Invalidation

#: One group: the tags an entry must all carry.
Group = tuple[str, ...]


@dataclass(frozen=True)
class Target:
    """One tool's results to drop: the tool and the groups naming them."""

    tool: str
    groups: tuple[Group, ...]


@dataclass(frozen=True)
class _Rule:
    rule: Invalidation
    #: The cacheable tools its patterns match in this registry.
    targets: tuple[Tool, ...]


class InvalidationIndex:
    """The ``invalidates`` rules of one registry, resolved to its tools."""

    def __init__(self, tools: Iterable[Tool]) -> None:
        tools = list(tools)
        cacheable = [t for t in tools if t.spec.cacheable]
        path_args: dict[str, set[str]] = {}
        self._rules: dict[str, tuple[_Rule, ...]] = {}
        for tool in tools:
            if not tool.spec.side_effects or not tool.spec.invalidates:
                continue
            rules = []
            for rule in tool.spec.invalidates:
                targets = tuple(
                    t for t in cacheable if any(fnmatchcase(t.spec.name, p) for p in rule.tools)
                )
                rules.append(_Rule(rule, targets))
                for target in targets if rule.same_path else ():
                    path_args.setdefault(target.spec.name, set()).update(rule.same_path)
            self._rules[tool.spec.name] = tuple(rules)
        #: Tool -> its arguments compared as paths (tagged per directory).
        self.path_args: Mapping[str, frozenset[str]] = {
            name: frozenset(names) for name, names in path_args.items()
        }

    def invalidates(self, tool: str) -> bool:
        """Whether a call of ``tool`` makes any cached result stale."""
        return any(r.targets for r in self._rules.get(tool, ()))

    # -- the tags of one entry -------------------------------------------------------

    def _named(self, tool: Tool, args: Mapping[str, Json]) -> dict[str, Json]:
        """``args`` canonical (``Tool.cache_args``), path arguments lexically normal."""
        named = dict(tool.cache_args(dict(args)))
        for name in self.path_args.get(tool.spec.name, ()):
            if isinstance(named.get(name), str):
                named[name] = normal_path(named[name])
        return named

    def tags(self, tool: Tool, tenant: str, args: Mapping[str, Json]) -> list[str]:
        """The tags of ``tool``'s result for ``args``, cached for ``tenant``."""
        spec = tool.spec
        named = self._named(tool, args)
        by_arg = {arg_tag(spec.name, name, value) for name, value in named.items()}
        for name in self.path_args.get(spec.name, ()):
            path = named.get(name)
            if isinstance(path, str):
                by_arg.update(under_tag(spec.name, name, d) for d in path_prefixes(path))
        return [*cache_tags(spec.name, tenant, shared=spec.shared_cache), *sorted(by_arg)]

    # -- what to drop --------------------------------------------------------------------

    def after_call(self, tool: Tool, tenant: str, args: Mapping[str, Json]) -> list[Target]:
        """What a call of ``tool`` with ``args`` by ``tenant`` makes stale (its rules)."""
        rules = self._rules.get(tool.spec.name, ())
        if not any(r.targets for r in rules):
            return []
        mine = tool.cache_args(dict(args))
        groups: dict[str, list[Group]] = {}
        for resolved in rules:
            for target in resolved.targets:
                found = self._groups(resolved.rule, target, tenant, mine)
                groups.setdefault(target.spec.name, []).extend(found)
        return [Target(name, tuple(dict.fromkeys(found))) for name, found in groups.items()]

    def _groups(
        self, rule: Invalidation, target: Tool, tenant: str, mine: Mapping[str, Json]
    ) -> list[Group]:
        name = target.spec.name
        base = [tool_tag(name), tenant_tag(tenant, shared=target.spec.shared_cache)]
        given = dict(rule.args)
        for theirs, ours in rule.same_args.items():
            if ours in mine:
                given[theirs] = mine[ours]
        base += self._arg_tags(target, given)
        if not rule.same_path:
            return [tuple(base)]
        ((theirs, ours),) = rule.same_path.items()
        path = mine.get(ours)
        if not isinstance(path, str):
            return [tuple(base)]  # no path to narrow by: all of them
        path = normal_path(path)
        above = path_prefixes(path)[:-1]
        return [
            (*base, under_tag(name, theirs, path)),
            *((*base, arg_tag(name, theirs, d)) for d in above),
        ]

    def _arg_tags(self, target: Tool, given: Mapping[str, Json]) -> list[str]:
        """``arg:`` tags of ``given`` values, canonical as ``target`` spells them."""
        if not given:
            return []
        named = self._named(target, given)
        return [arg_tag(target.spec.name, k, v) for k, v in named.items() if k in given]

    def explicit(
        self, tool: Tool, tenant: str | None, args: Mapping[str, Json] | None = None
    ) -> Target:
        """``tool``'s results for ``tenant`` (None: every tenant's), narrowed by ``args``."""
        name = tool.spec.name
        base = [tool_tag(name)]
        if tenant is not None:
            base.append(tenant_tag(tenant, shared=tool.spec.shared_cache))
        base += self._arg_tags(tool, args or {})
        return Target(name, (tuple(base),))


def changed_tools(
    old: Mapping[str, Tool],
    new: Mapping[str, Tool],
    old_index: InvalidationIndex,
    new_index: InvalidationIndex,
) -> list[Target]:
    """Tools whose cached results a reload makes stale: removed, changed (a different
    spec), or tagged differently now (an argument newly compared as a path)."""
    stale = []
    for name, tool in old.items():
        if not tool.spec.cacheable:
            continue
        now = new.get(name)
        if (
            now is None
            or now.spec != tool.spec
            or old_index.path_args.get(name) != new_index.path_args.get(name)
        ):
            stale.append(Target(name, ((tool_tag(name),),)))
    return stale


class Write:
    """A cache write under way: the tags its entry will carry, worked out only when
    needed (a hit never writes; an invalidation or the write asks for them)."""

    __slots__ = ("_tags_of", "stale")

    def __init__(self, tags_of: Callable[[], Sequence[str]]) -> None:
        self._tags_of = tags_of
        #: Set when an invalidation matching these tags landed meanwhile: do not store.
        self.stale = False

    @property
    def tags(self) -> list[str]:
        return list(self._tags_of())

    def matches(self, group: frozenset[str]) -> bool:
        return group.issubset(self._tags_of())


@dataclass
class PendingWrites:
    """Cache writes under way in this process.

    A result computed from the world before a write (a read that started before it)
    must not be stored after the write's invalidation: ``begin`` before the cache is
    read, ``invalidated`` on every invalidation, and the write skips a stale result.
    Writes of other gateway replicas are not seen: there the window stays as long as
    one read that overlaps the write.
    """

    _writes: set[Write] = field(default_factory=set)

    def begin(self, tags_of: Callable[[], Sequence[str]]) -> Write:
        """A write whose entry will carry ``tags_of()`` (called at most when needed)."""
        write = Write(tags_of)
        self._writes.add(write)
        return write

    def end(self, write: Write) -> None:
        self._writes.discard(write)

    def invalidated(self, groups: Iterable[Group]) -> None:
        groups = [frozenset(g) for g in groups]
        for write in self._writes:
            if any(write.matches(group) for group in groups):
                write.stale = True
