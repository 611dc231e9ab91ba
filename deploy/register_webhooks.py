"""Register MLflow registry webhooks that tell ITP replicas when a model alias moves.

    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 ITP_WEBHOOK_SECRET=... \\
        python deploy/register_webhooks.py http://itp-1:8000 http://itp-2:8000 [--test]

One webhook per replica base URL, delivering to <url>/v1/webhooks/mlflow on the event
`model_version_alias.created` (MLflow sends it whenever an alias is set, including when an
existing alias moves to another version: a promotion or a rollback), signed with
ITP_WEBHOOK_SECRET (HMAC-SHA256, the X-MLflow-Signature header). The secret is read from
the environment only, never from the command line. Running the script again updates the
webhooks of the same names in place. `--test` asks MLflow to send each one a test delivery.

The URLs are resolved and called by the tracking server, not by this script: they must be
reachable from there, and MLflow accepts plain-HTTP or private-network URLs only when the
server runs with MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https and
MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true (deploy/compose.yaml sets both).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

EVENT = "model_version_alias.created"
ENDPOINT = "/v1/webhooks/mlflow"
MIN_SECRET = 32  # service.settings.MIN_WEBHOOK_SECRET (tests/test_deploy.py checks they agree)


def webhook_name(base_url: str) -> str:
    """A stable MLflow webhook name for a replica: letters, digits, '.', '_', '-'."""
    host = re.sub(r"^[a-z]+://", "", base_url.rstrip("/"))
    return "itp-serve-" + re.sub(r"[^A-Za-z0-9._-]+", "-", host).strip("-._")[:50]


def register(client, base_urls: list[str], secret: str) -> dict[str, str]:
    """Create or update one webhook per replica; returns {name: webhook_id}."""
    existing = {}
    page_token = None
    while True:
        page = client.list_webhooks(max_results=100, page_token=page_token)
        existing.update({hook.name: hook for hook in page})
        page_token = page.token
        if not page_token:
            break
    registered = {}
    for base_url in base_urls:
        name = webhook_name(base_url)
        url = base_url.rstrip("/") + ENDPOINT
        description = "ITP service replica: reload when a model alias moves"
        if name in existing:
            hook = client.update_webhook(existing[name].webhook_id, url=url, events=[EVENT],
                                         secret=secret, status="ACTIVE",
                                         description=description)
        else:
            hook = client.create_webhook(name=name, url=url, events=[EVENT], secret=secret,
                                         description=description)
        registered[name] = hook.webhook_id
    return registered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_urls", nargs="+", metavar="URL",
                        help="a replica's base URL as the tracking server reaches it, "
                             "e.g. http://itp-1:8000")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow tracking server (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--test", action="store_true",
                        help="ask MLflow to send each webhook a test delivery")
    args = parser.parse_args(argv)
    secret = os.environ.get("ITP_WEBHOOK_SECRET", "")
    if len(secret) < MIN_SECRET:  # the service refuses to start with a shorter one
        parser.error(f"set ITP_WEBHOOK_SECRET (the service's value, at least {MIN_SECRET} "
                     "characters) in the environment")
    if not args.tracking_uri:
        parser.error("set MLFLOW_TRACKING_URI or --tracking-uri")

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=args.tracking_uri)
    for name, webhook_id in register(client, args.base_urls, secret).items():
        print(f"{name}: {webhook_id}")
        if args.test:
            result = client.test_webhook(webhook_id)
            print(f"  test delivery: success={result.success} status={result.response_status}"
                  + (f" error={result.error_message}" if result.error_message else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
