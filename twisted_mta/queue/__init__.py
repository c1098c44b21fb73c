"""The message queue: delivery state, listing and operator actions."""
