"""lightly's side of ``bench/bench_peers.py``: each method both libraries ship, written the way lightly's
documentation examples write it, configured with a selfsup recipe's values.

* :mod:`.api`: the :class:`Peer` a builder returns, the registry, :class:`Unsupported`;
* :mod:`.transforms`: lightly's transforms from the recipe's pipelines, the PIL training images;
* :mod:`.joint`, :mod:`.multicrop`, :mod:`.masked`: one builder per method (``@register("<name>")``);
* :mod:`.loop`: the plain training loop and the step clock.

Adding a method: a ``build_<name>(ctx) -> Peer`` under ``@register("<name>")`` in the family's file (lightly is
imported inside the builder, so that selfsup's side runs without it); ``bench_peers.METHODS`` lists every registered
builder.
"""

from . import joint, multicrop, masked  # noqa: F401, I001  (registers the builders, in this order)
from .api import BUILDERS, Ctx, Peer, Unsupported, register
from .loop import StepClock, check_peer, train_peer

__all__ = ["BUILDERS", "Ctx", "Peer", "StepClock", "Unsupported", "check_peer", "register", "train_peer"]
