"""Transports: the drivers that deliver a message (L{base} has the job
description every driver receives)."""
