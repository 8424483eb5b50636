"""Everything that runs inside ``fdbroker serve``, and nothing else. No module outside this package imports it,
except the CLI's ``serve`` verb (``fdbroker.broker.server``).

The map (data flows down: RPCs and frames in at the top, the tables at the bottom)::

    server.py        wiring only: claim the run directory, bind the sockets, start the loop, stop
    servicer.py      gRPC: one method per RPC, errors to status codes in one place
    listener.py      the conduit socket: one non-blocking connection per session, frames in and out
    core.py          Broker, the facade: owns the tables, sessions, housekeeping (tick), conduit-frame dispatch
    entries.py       put, get, take, delete, stat, list; remove(), the one way an entry leaves
    access.py        a by-name operation decided policy first, so a refusal hides whether the name exists
    handoffs.py      handoff tokens issued and redeemed, deliveries, the prefetch pool, batch plans
    redeem.py        Redeem frames: prefetched GET tokens redeemed on the conduit, and the refills they ask for
    delivery.py      the wire encoding of Deliver frames from bytes cached per entry; answers split to fit a frame
    leasing.py       lease arbitration per entry and the lease life cycle (one end_lease)
    watch.py         watch streams: fan-out, visibility, cut-off
    registry.py      the named entries and the revision counter
    history.py       the event history window watchers read
    tokens.py        the handoff token book
    fastpath.py      prefetched GET tokens and the entries they deliver: the table the native data plane
                     (fdbroker._native, in C) serves Redeem frames from, and its pure-Python twin
    sessions.py      sessions, one per conduit connection
    policy.py        who may do what (the TOML policy) and the per-uid quotas
    closer.py        closing client descriptors off the event loop
    rundir.py        claiming the run directory (the lock, stale sockets)
    notify.py        sd_notify
    survival/        outliving the process: restore(), handover (giving.py, receiving.py), the fd store (fdstore.py,
                     restoring.py) and the keeper that plays systemd's part anywhere else (keeper.py)

Descriptor ownership: a descriptor a client deposits belongs to the broker from the moment it is received; it
becomes an entry's (the registry owns it) or goes to the closer. Deliveries send copies (the kernel duplicates
them into the receiver). Each module's docstring says who owns what it touches.
"""
