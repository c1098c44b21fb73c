"""The message queue: delivery state, retry rules and hints, listing and
operator actions."""
