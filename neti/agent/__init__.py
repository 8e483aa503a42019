"""``neti agent``: the daemon that keeps this host's kernel in step with the fleet.

- ``core``: ``Agent``, the loop, signals and reload over the collaborators below;
- ``zksession``: the ZooKeeper session (connect, claim, join, resume, state changes);
  ``session``: the session kept across a restart (session.json); ``tagging``: EC2 tags;
- ``reconciler``: one reconcile, returning an ``outcome``; ``fleetsync``: the fleet as
  read; ``guard``: the mass-removal guard (pure);
- ``sink``: what is reported: ``statefile``, ``guardreport``, ``metrics``, ``sdnotify``;
  ``logs``: logging set-up;
- ``tunnelkey``: this host's WireGuard key as the agent holds and publishes it (encryption);
- ``scheduler``: when to reconcile; ``waker``: the loop's flags and sleep; ``backoff``;
- ``ports``: what the agent needs from the registry and the dataplane (Protocol types).
"""
