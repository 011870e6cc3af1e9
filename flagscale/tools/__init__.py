"""Command-line tools: `python -m flagscale.tools.compare_backends` (native vs FlagGems accuracy
and latency)."""
