#!/usr/bin/env python3
"""What the SIGKILL of one NATS node stalls, stream by stream.

A question for splitting fanjet's log into cells (docs/RELIABILITY.md,
"Progress within 3 s of every single fault"): on a 3-node cluster, three R3
streams, each led from its own node, each with a durable pull consumer and a
loop that publishes a message, pulls it and acks it (the path of an event
through a cell). Node n0 is SIGKILLed; the script prints, per stream, the
longest wait between two round trips in the 20 s after. Each loop's client
is connected to a node that survives, so what is measured is the servers'.

    --consumers beside     each consumer led from its stream's leader
    --consumers victim     every consumer led from n0, the node killed
    --fault move           instead of the kill, hand n0's stream and its
                           consumer over to n1 (what a move costs)

Run: PYTHONPATH=.tools/python python3 scripts/leader-probe.py
(needs nats-server on PATH and nats-py: `just nats-server python-deps`).
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import nats
from nats.js.api import AckPolicy, ConsumerConfig

NODES = ["n0", "n1", "n2"]
PORTS = [14331, 14332, 14333]
ROUTES = [16331, 16332, 16333]


def start_cluster(root):
    procs = []
    for i, name in enumerate(NODES):
        routes = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in ROUTES)
        conf = os.path.join(root, f"{name}.conf")
        with open(conf, "w") as f:
            f.write(
                f'server_name: {name}\nlisten: "127.0.0.1:{PORTS[i]}"\n'
                f'jetstream {{ store_dir: "{root}/{name}" }}\n'
                f'cluster {{ name: probe, listen: "127.0.0.1:{ROUTES[i]}", routes: [{routes}] }}\n'
            )
        log = open(os.path.join(root, f"{name}.log"), "w")
        procs.append(subprocess.Popen(["nats-server", "-c", conf], stdout=log, stderr=log))
    return procs


async def quiet(_e):
    """Connection errors are expected here (a node is killed)."""


async def request(nc, subject, body):
    reply = await nc.request(subject, json.dumps(body).encode(), timeout=5)
    answer = json.loads(reply.data)
    if "error" in answer:
        raise RuntimeError(f"{subject}: {answer['error']}")
    return answer


async def place(nc, subject, info, want):
    """Steps the leader down until `info()` names `want` (at most 20 tries)."""
    for _ in range(20):
        if await info() == want:
            return
        try:
            await request(nc, subject, {"placement": {"preferred": want}})
        except Exception:
            pass
        await asyncio.sleep(1)
    raise RuntimeError(f"{subject}: leader never moved to {want}")


async def loop(i, stop, times):
    nc = await nats.connect(
        f"nats://127.0.0.1:{PORTS[1 + i % 2]}", max_reconnect_attempts=-1, error_cb=quiet
    )
    js = nc.jetstream(timeout=1)
    sub = await js.pull_subscribe_bind(f"c{i}", stream=f"P{i}")
    while not stop.is_set():
        try:
            await js.publish(f"p{i}.x", b"x", timeout=1)
            for m in await sub.fetch(1, timeout=1):
                await m.ack()
            times[i].append(time.monotonic())
        except Exception:
            await asyncio.sleep(0.05)
    await nc.close()


async def main(args):
    root = tempfile.mkdtemp(prefix="leader-probe-")
    procs = start_cluster(root)
    try:
        nc = await nats.connect([f"nats://127.0.0.1:{p}" for p in PORTS], error_cb=quiet)
        js = nc.jetstream(timeout=5)
        for _ in range(60):
            try:
                await js.account_info()
                break
            except Exception:
                await asyncio.sleep(0.5)
        for i in range(3):
            await js.add_stream(name=f"P{i}", subjects=[f"p{i}.>"], num_replicas=3)
            await js.add_consumer(
                f"P{i}", ConsumerConfig(durable_name=f"c{i}", ack_policy=AckPolicy.EXPLICIT)
            )

        async def stream_leader(i):
            return (await js.stream_info(f"P{i}")).cluster.leader

        async def consumer_leader(i):
            return (await js.consumer_info(f"P{i}", f"c{i}")).cluster.leader

        for i in range(3):
            await place(nc, f"$JS.API.STREAM.LEADER.STEPDOWN.P{i}", lambda i=i: stream_leader(i), NODES[i])
            want = NODES[i] if args.consumers == "beside" else "n0"
            await place(
                nc, f"$JS.API.CONSUMER.LEADER.STEPDOWN.P{i}.c{i}", lambda i=i: consumer_leader(i), want
            )
        placed = [(await stream_leader(i), await consumer_leader(i)) for i in range(3)]
        await nc.close()

        stop, times = asyncio.Event(), [[], [], []]
        loops = [asyncio.create_task(loop(i, stop, times)) for i in range(3)]
        await asyncio.sleep(5)
        killed_at = time.monotonic()
        if args.fault == "kill":
            procs[0].send_signal(signal.SIGKILL)
        else:
            # Hand P0 and its consumer over to n1, as a placement keeper would.
            nc = await nats.connect(f"nats://127.0.0.1:{PORTS[1]}", error_cb=quiet)
            for subject in ("$JS.API.STREAM.LEADER.STEPDOWN.P0", "$JS.API.CONSUMER.LEADER.STEPDOWN.P0.c0"):
                await request(nc, subject, {"placement": {"preferred": "n1"}})
            await nc.close()
        await asyncio.sleep(20)
        stop.set()
        await asyncio.gather(*loops)
        for i in range(3):
            after = [killed_at] + [t for t in times[i] if killed_at <= t <= killed_at + 20]
            gap = max((b - a for a, b in zip(after, after[1:])), default=20.0)
            if len(after) == 1:
                gap = 20.0
            print(
                f"stream P{i} (leader {placed[i][0]}, consumer leader {placed[i][1]}): "
                f"longest wait after the {args.fault} {gap:.2f} s, round trips {len(after) - 1}"
            )
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--consumers", choices=["beside", "victim"], default="beside")
    parser.add_argument(
        "--fault",
        choices=["kill", "move"],
        default="kill",
        help="kill: SIGKILL n0; move: hand P0 and its consumer over from n0 to n1 (step-downs)",
    )
    asyncio.run(main(parser.parse_args()))
