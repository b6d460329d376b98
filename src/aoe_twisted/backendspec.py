# -*- test-case-name: tests.test_backends -*-
"""
``--backend SCHEME:SPEC``: find the backend plugins and open the one named.

Modeled on ``twisted.cred.strcred``: every installed ``IBackendFactory``
plugin owns one scheme, and the text after the first colon is handed to its
``open``.  ``package`` arguments default to ``twisted.plugins``; tests pass
another plugin package.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType

from twisted.plugin import getPlugins

from aoe_twisted.errors import BackendSpecError, UnknownBackendScheme
from aoe_twisted.interfaces import IBackendFactory, IBlockBackend, IDirectIOFactory

__all__ = ["find_backend_factories", "format_backend_help", "open_backend"]


def find_backend_factories(package: ModuleType | None = None) -> dict[str, IBackendFactory]:
    """
    Return every installed backend plugin, keyed by its scheme.

    @param package: the plugin package to scan; ``None`` means
        ``twisted.plugins``.  If two plugins claim one scheme, one of them wins.
    """
    return {factory.scheme: factory for factory in getPlugins(IBackendFactory, package)}


def open_backend(
    description: str,
    read_only: bool = False,
    package: ModuleType | None = None,
    *,
    direct: bool = False,
) -> IBlockBackend:
    """
    Open the backend that ``description`` (``SCHEME:SPEC``) names.

    The scheme is the text before the first colon, the spec everything after
    it, so ``file:/srv/a:b.img`` opens the file ``/srv/a:b.img``.

    @param read_only: open the disk so that it refuses writes.
    @param package: passed to ``find_backend_factories``.
    @param direct: ask for direct I/O (``--direct``): passed to the factory's
        ``open`` as ``direct=True`` if the factory provides
        ``IDirectIOFactory``; for any other factory (``memory:``, most
        third-party plugins) it is a ``BackendSpecError``, whatever its
        ``open`` accepts: the declaration is what counts.  Without it nothing
        new is passed, so plugins written before ``direct`` existed work
        unchanged.
    @raise UnknownBackendScheme: if no plugin has the scheme; the message
        lists the installed schemes.
    @raise BackendSpecError: if ``description`` is not ``SCHEME:SPEC`` or the
        plugin cannot open the spec.
    """
    scheme, colon, spec = description.partition(":")
    if not (scheme and colon):
        raise BackendSpecError(
            f"backend {description!r} is not of the form SCHEME:SPEC, e.g. file:disk.img"
        )
    if not spec:
        raise BackendSpecError(
            f"backend {description!r} has nothing after the colon; expected SCHEME:SPEC, "
            "e.g. file:disk.img"
        )
    factories = find_backend_factories(package)
    try:
        factory = factories[scheme]
    except KeyError:
        installed = ", ".join(sorted(factories)) or "none"
        raise UnknownBackendScheme(
            f"unknown backend scheme {scheme!r} in {description!r}; installed schemes: {installed}"
        ) from None
    if direct:
        if not IDirectIOFactory.providedBy(factory):
            raise BackendSpecError(
                f"backend scheme {scheme!r} does not do direct I/O (--direct); "
                "file: and block: do"
            )
        return factory.open(spec, read_only=read_only, direct=True)
    return factory.open(spec, read_only=read_only)


def format_backend_help(factories: Mapping[str, IBackendFactory] | None = None) -> str:
    """
    Return the ``--help-backends`` text: one ``scheme:FORMAT  description`` line per scheme.

    Lines are sorted by scheme, descriptions aligned (a format wider than
    24 characters on a line of its own), and there is no trailing newline.

    @param factories: the plugins to describe; ``None`` means
        ``find_backend_factories()``.
    """
    if factories is None:
        factories = find_backend_factories()
    usages = {scheme: f"{scheme}:{factory.spec_format}" for scheme, factory in factories.items()}
    width = max((n for n in map(len, usages.values()) if n <= _HELP_WIDTH), default=_HELP_WIDTH)
    lines = []
    for scheme in sorted(factories):
        usage, description = usages[scheme], factories[scheme].description
        if len(usage) > width:
            # A long format gets a line of its own, its description under the others'.
            lines += [usage, f"{'':<{width}}  {description}"]
        else:
            lines.append(f"{usage:<{width}}  {description}")
    return "\n".join(lines)


#: The widest ``SCHEME:FORMAT`` column of ``--help-backends``; longer ones get a line of their own.
_HELP_WIDTH = 24
