"""Delivering what is on the queue: addresses, retry rules and hints."""
