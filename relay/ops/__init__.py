"""What operators run and read: the admin listener (:mod:`relay.ops.admin`), the worker supervisor
(:mod:`relay.ops.workers`) and the log formats (:mod:`relay.ops.logs`). Never on the fan-out
path."""
