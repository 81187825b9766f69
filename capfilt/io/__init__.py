"""Input/output: reading shards and images, writing cleaned shards, ledgers and stats."""
