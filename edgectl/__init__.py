"""``edgectl``: the operator's side of the fleet protocol (publish bundles, deploy, roll out,
roll back, watch). It imports ``edge_agent.fleet.protocol`` and the bundle format, never the
device's loop."""
