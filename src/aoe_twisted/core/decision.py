"""
What the core decided about a frame: ``Decision``, the value the Twisted layer acts on.

Its own module because both the general path (``dispatch``) and the fast
path (``fastpath``) make them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aoe_twisted.core.fastpath import FastPending
    from aoe_twisted.core.target import Pending, Target

__all__ = ["NOTHING", "Decision"]


class Decision:
    """
    What the core decided about one frame, or about one completed disk operation.

    - ``replies``: the frames to send now, in order (padded to 60 bytes);
    - ``pending``: the disk operations (``Pending``, or the fast path's
      ``FastPending`` for an asynchronous disk) still to carry out on
      ``pending[i].target.backend``; each goes back to
      ``Dispatcher.complete`` with its result and gives one more decision;
    - ``written``: the target whose write the reply acknowledges (``None``
      if it acknowledges none): what group commit must make durable before
      sending it;
    - ``refusal``: with ``written``, the reply to send instead if that cannot
      be made durable (ATA ``ERR|DRDY``, error ``ABRT``): never acknowledged;
    - ``malformed``: why the frame was dropped or refused as not valid AoE
      (``None`` for a valid one), for the server's rate-limited log;
    - ``fault``: a failure on the target's side the server must log, e.g. an
      ACL store that could not be written (``None`` if none);
    - ``heard``: another server's response for an address served here, for
      the duplicate-address watch (``None`` if none; only when the
      dispatcher is asked to pass them on).

    A plain class with ``__slots__``, not attrs: one is made for every frame
    and its construction is on the per-frame path.
    """

    __slots__ = ("fault", "heard", "malformed", "pending", "refusal", "replies", "written")

    def __init__(
        self,
        replies: tuple[bytes, ...] = (),
        written: Target | None = None,
        refusal: bytes = b"",
        pending: tuple[Pending | FastPending, ...] = (),
        malformed: str | None = None,
        fault: str | None = None,
        heard: bytes | None = None,
    ) -> None:
        self.replies = replies
        self.written = written
        self.refusal = refusal
        self.pending = pending
        self.malformed = malformed
        self.fault = fault
        self.heard = heard

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in ("replies", "written", "refusal", "pending", "malformed", "fault", "heard")
        )
        return f"Decision({fields})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decision):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    __hash__ = None  # type: ignore[assignment]


NOTHING = Decision()
"""The decision about a frame that gets no answer (never modified)."""
