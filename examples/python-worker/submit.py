#!/usr/bin/env python3
"""Submit a fanjet job and follow it to the end, in Python with nats-py.

    python3 submit.py WORKFLOW '[1, 2, 3]' [--job-id ID] [--customer C] [--server URL]

Prints each step transition as it happens, then the final status (JSON) on
stdout. Exits 0 when the job completed, 1 otherwise.
"""

import argparse
import asyncio
import json
import os
import sys
import uuid

import nats

import fanjet_wire as wire


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workflow")
    p.add_argument("input", help="the job's input, as JSON")
    p.add_argument("--job-id", default=f"py-{uuid.uuid4().hex[:16]}")
    p.add_argument("--customer")
    p.add_argument("--server", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    args = p.parse_args()

    nc = await nats.connect(servers=[args.server])
    js = nc.jetstream()
    ended = asyncio.Event()

    async def on_event(msg):
        event = json.loads(msg.data)
        kind = msg.subject.rsplit(".", 1)[-1]
        if kind in ("step_started", "step_completed"):
            print(f"{kind}: {event['step']} ({event.get('total')} subjobs)", file=sys.stderr, flush=True)
        if kind in ("completed", "failed", "cancelled", "rejected"):
            ended.set()

    # Follow first, then submit, so no event is missed.
    await nc.subscribe(f"fanjet.ev.*.{args.job_id}.*", cb=on_event)
    body = {"job_id": args.job_id, "input": json.loads(args.input)}
    if args.customer:
        body["customer"] = args.customer
    reply = json.loads((await nc.request(f"fanjet.submit.{args.workflow}", json.dumps(body).encode(), timeout=10)).data)
    if not reply.get("ok"):
        print(f"rejected: {reply['error']['message']}", file=sys.stderr)
        return 1
    print(f"submitted {reply['job_id']}", file=sys.stderr, flush=True)
    await asyncio.wait_for(ended.wait(), timeout=120)

    # The detailed status, from the jobs bucket (it follows the log within ~100 ms).
    kv = await js.key_value(wire.jobs_bucket(args.job_id))
    for _ in range(50):
        status = json.loads((await kv.get(args.job_id)).value)
        if status["state"] in wire.TERMINAL:
            break
        await asyncio.sleep(0.1)
    print(json.dumps(status))
    await nc.drain()
    return 0 if status["state"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
