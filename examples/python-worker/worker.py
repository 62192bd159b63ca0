#!/usr/bin/env python3
"""A fanjet worker in Python, with nats-py and nothing from fanjet.

    python3 worker.py --workflow squares --step square [--server nats://127.0.0.1:4222] [--concurrency 8]

It pulls tasks of one step from the durable consumer fanjet_<workflow>_<step>
(never more than it has free slots), squares the item, reports a
SubjobCompleted (then acks), or on error NAKs with the step's backoff, or on
the last attempt reports SubjobFailed (then terminates the task). A batch
(a step with batch_size) has each item squared, a failing one retried
alone, and one SubjobsDone. Long work sends in-progress acks. SIGTERM: stop pulling, finish what runs, exit.
"""

import argparse
import asyncio
import json
import os
import signal
import time

import nats
from nats.errors import TimeoutError as NatsTimeout

import fanjet_wire as wire


def handle(task: dict, attempt: int):
    """The work: square a number. Every 13th item fails on its first attempt."""
    item = task.get("item")
    if not isinstance(item, (int, float)):
        raise PermanentError(f"item {item!r} is not a number")
    if task["index"] % 13 == 0 and attempt == 1:
        raise RuntimeError("transient: try again")
    return {"square": item * item, "by": "python"}


class PermanentError(Exception):
    """Do not retry."""


async def process_batch(js, msg, task, attempt):
    """A batch (a step with batch_size): each item handled, one that fails
    with a retryable error tried again alone after the step's backoff, then
    one SubjobsDone with every item's outcome, then the ack."""
    started = time.monotonic()
    keepalive = asyncio.create_task(in_progress(msg, task["timeout_ms"] / 3000.0))
    outcomes = []
    try:
        for index, item in zip(task["indices"], task["items"]):
            single = dict(task, index=index, item=item)
            tries = attempt
            while True:
                try:
                    outcomes.append({"index": index, "attempt": tries, "result": handle(single, tries)})
                    break
                except PermanentError as e:
                    outcomes.append({"index": index, "attempt": tries, "error": str(e)})
                    break
                except Exception as e:  # noqa: BLE001 - retried alone
                    if tries >= task.get("max_attempts", 1):
                        outcomes.append({"index": index, "attempt": tries, "error": f"{e} (last attempt)"})
                        break
                    await asyncio.sleep(wire.backoff_seconds(task, tries))
                    tries += 1
    finally:
        keepalive.cancel()
    subject, headers, payload = wire.subjobs_done(task, attempt, outcomes, int((time.monotonic() - started) * 1000))
    await js.publish(subject, payload, headers=headers)
    await msg.ack()


async def process(js, msg, slots):
    try:
        task = json.loads(msg.data)
        attempt = msg.metadata.num_delivered
        if "batch_size" in task:
            await process_batch(js, msg, task, attempt)
            return
        started = time.monotonic()
        keepalive = asyncio.create_task(in_progress(msg, task["timeout_ms"] / 3000.0))
        try:
            result = handle(task, attempt)
        finally:
            keepalive.cancel()
        subject, headers, payload = wire.subjob_completed(task, attempt, result, int((time.monotonic() - started) * 1000))
        await js.publish(subject, payload, headers=headers)
        await msg.ack()
    except PermanentError as e:
        await give_up(js, msg, task, attempt, str(e))
    except Exception as e:  # noqa: BLE001 - any handler error is retried
        if attempt < task.get("max_attempts", 1):
            await msg.nak(delay=wire.backoff_seconds(task, attempt))
        else:
            await give_up(js, msg, task, attempt, f"{e} (last attempt)")
    finally:
        slots.release()


async def give_up(js, msg, task, attempt, error):
    subject, headers, payload = wire.subjob_failed(task, attempt, error)
    await js.publish(subject, payload, headers=headers)
    await msg.term()


async def in_progress(msg, every):
    while True:
        await asyncio.sleep(max(every, 0.5))
        await msg.in_progress()


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument("--workflow", required=True)
    p.add_argument("--step", required=True)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args()

    nc = await nats.connect(servers=[args.server])
    js = nc.jetstream()
    # The step's consumer in each cell's work queue, pulled side by side.
    subs = [await js.pull_subscribe_bind(durable=wire.step_consumer(args.workflow, args.step),
                                         stream=wire.tasks_stream(cell))
            for cell in range(wire.CELLS)]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    slots = asyncio.Semaphore(args.concurrency)
    running = set()
    print(f"python worker serving {args.workflow}/{args.step}", flush=True)

    async def pull(sub):
        while not stop.is_set():
            await slots.acquire()
            free = 1
            while free < args.concurrency and not slots.locked():
                await slots.acquire()
                free += 1
            try:
                msgs = await sub.fetch(batch=free, timeout=1)
            except NatsTimeout:
                msgs = []
            for _ in range(free - len(msgs)):
                slots.release()
            for msg in msgs:
                t = asyncio.create_task(process(js, msg, slots))
                running.add(t)
                t.add_done_callback(running.discard)

    await asyncio.gather(*(pull(sub) for sub in subs))
    if running:
        await asyncio.wait(running, timeout=30)
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
