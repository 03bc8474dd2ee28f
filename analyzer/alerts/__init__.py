"""Alerts: rules and signed webhooks that fire when an incident opens, with its cause in the message.

Modules: ``models`` (control-plane tables), ``db`` (engine: SQLite/PostgreSQL),
``evaluator`` (incidents → alert transitions + outbox rows), ``delivery``
(the outbox sender), ``signing`` (HMAC headers), ``formats`` (generic, Slack,
Alertmanager bodies), ``service`` (the server part), ``api`` (the router),
``cli`` (``tailscope alerts``). Nothing is imported here, so importing the
package has no side effects and does not need FastAPI.
"""
