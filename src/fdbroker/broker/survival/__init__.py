"""Survival: the held descriptors outlive the broker process that holds them (docs/survival.md).

Two ways, one module each:

* live handover (``fdbroker serve --takeover``): :mod:`.giving` is the running broker's side (it listens on
  ``handover.sock`` and gives every entry away), :mod:`.receiving` the successor's (it connects, installs the
  entries, and inherits the run directory's lock);
* the systemd file-descriptor store (``serve --fdstore``): :mod:`.fdstore` mirrors every entry to the service
  manager and, at start, :mod:`.restoring` turns what it passes back into entries;
* the keeper (``serve --keeper``): :mod:`.keeper` is a small parent process that plays systemd's part for a
  broker run anywhere else (a container's PID 1 included), through the same :mod:`.fdstore` code, and keeps each
  entry's metadata beside its descriptor. It imports nothing from this package but itself (and the closer), so
  this ``__init__`` stays empty of code: the keeper must not load gRPC, protobuf or the registry.

What all ways share lives in :mod:`.carry`: :func:`~.carry.restore`, which rebuilds an entry as a previous
process held it, and for a handover the protocol below, its limits and its error.

The handover protocol. The running broker listens on ``handover.sock`` in its run directory (mode 0600; a peer is admitted only if its
``SO_PEERCRED`` uid is the broker's own uid or 0). The successor connects and the two speak the conduit's framing
(``ConduitFrame`` with the ``Handover*`` bodies, descriptors as ``SCM_RIGHTS``, at most 253 per ``sendmsg``)::

    old -> new  HandoverBegin     version, pid, registry revision, fencing epoch, entry count
    old -> new  HandoverEntries   up to 253 entries (metadata) + their descriptors      (repeated)
    old -> new  HandoverDone      + the run directory's lock descriptor
    new -> old  HandoverAck       every entry installed
    old -> new  HandoverReleased  the old broker closed its sockets (it exits 0 right after)

The old broker does the whole exchange up to the ack synchronously on its event loop: no RPC, conduit frame or
timer runs meanwhile, so its registry is frozen without touching the code that changes it, and it only ever sends
copies (the kernel duplicates descriptors into the successor). Any failure before the ack (successor killed,
refused, timed out, bad frame) therefore leaves the old broker exactly as it was: it logs why and goes on
serving. After the ack it closes its listener and every conduit connection at once (before the loop runs again,
so nothing can change its registry any more), stops gRPC, closes its descriptors, closes (without unlinking) the
lock, and sends ``HandoverReleased``.

The successor receives the lock descriptor: ``flock`` belongs to the open file description, which both processes
share, so the run directory stays claimed throughout and no third broker can slip in. Once released it removes
the old sockets and binds its own.

Sessions cannot move (they are the old process's conduit connections), so they end: the successor releases every
lease that was held (``LEASE_RELEASED``, reason ``HANDOVER``) and removes ephemeral entries (``DELETE``, reason
``SESSION_ENDED``), as events after the old broker's last revision. See docs/survival.md.
"""
