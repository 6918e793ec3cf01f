#!/usr/bin/env python3
"""Publish one herald notification job from Python with pika.

The job follows schemas/notification-job.v1.json; the publish follows
docs/producers.md: exchange `<prefix>.jobs`, routing key `msteams`, persistent,
content_type application/json, message_id = job_id, mandatory, and publisher
confirms so that a job the broker did not take is an error, not a silent drop.

    HERALD_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f HERALD_TOPOLOGY_PREFIX=herald \
      python3 examples/python/producer.py --org acme --integration teams-main \
      --conversation '19:acme-alerts@thread.tacv2' --title 'Disk full' --text '/var at 99%'

Prints the job id.
"""

import argparse
import datetime
import json
import os
import sys
import uuid

import pika


def build_job(args):
    recipient = {}
    if args.conversation:
        recipient["conversation_id"] = args.conversation
    if args.user:
        recipient["user_id"] = args.user
    job = {
        "version": 1,
        "job_id": str(uuid.uuid4()),  # the idempotency key: reuse it when retrying a publish
        "organization_id": args.org,
        "integration_id": args.integration,
        "recipient": recipient,
        "message": {"title": args.title, "text": args.text, "severity": args.severity},
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z"),
    }
    if args.expires_in:
        expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=args.expires_in)
        job["expires_at"] = expires.isoformat().replace("+00:00", "Z")
    return job


def publish(job, amqp_url, prefix, traceparent=None):
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()  # basic_publish now raises unless the broker acked
        headers = {"traceparent": traceparent} if traceparent else None
        channel.basic_publish(
            exchange=f"{prefix}.jobs",
            routing_key="msteams",
            body=json.dumps(job).encode(),
            properties=pika.BasicProperties(
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=job["job_id"],
                headers=headers,
            ),
            mandatory=True,  # an unroutable job raises UnroutableError
        )
    finally:
        connection.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--org", required=True)
    parser.add_argument("--integration", required=True)
    parser.add_argument("--conversation")
    parser.add_argument("--user")
    parser.add_argument("--title", required=True)
    parser.add_argument("--text", default="")
    parser.add_argument("--severity", default="info", choices=["info", "warning", "error", "critical"])
    parser.add_argument("--expires-in", type=int, help="seconds until the job expires")
    parser.add_argument("--traceparent", help="W3C traceparent of the producer's trace")
    args = parser.parse_args()
    if not args.conversation and not args.user:
        parser.error("give --conversation or --user")
    job = build_job(args)
    try:
        publish(
            job,
            os.environ.get("HERALD_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            os.environ.get("HERALD_TOPOLOGY_PREFIX", "herald"),
            args.traceparent,
        )
    except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as err:
        print(f"the broker did not take job {job['job_id']}: {err!r}", file=sys.stderr)
        return 1
    print(job["job_id"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
