"""``python -m agents``: run the node agent (same flags as ``tailscope agent``)."""

from agents.cli import main

raise SystemExit(main())
