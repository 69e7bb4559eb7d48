"""Analysis and transformation passes; the transfer rules live in :mod:`.rules`."""
