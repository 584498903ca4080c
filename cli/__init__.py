"""ShardBroker's command line (typer)."""
