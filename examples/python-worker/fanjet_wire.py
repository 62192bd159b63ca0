"""The few fanjet protocol rules a Python client needs (docs/PROTOCOL.md).

Nothing here imports fanjet: it is the wire contract written out in Python.
"""

import json


def partition(job_id: str) -> int:
    """FNV-1a (32 bit) of the job id's bytes, modulo 16."""
    h = 0x811C9DC5
    for b in job_id.encode():
        h ^= b
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h % 16


CELLS = 3


def cell(job_id: str) -> int:
    """The cell of a job: its partition mod 3."""
    return partition(job_id) % CELLS


def jobs_bucket(job_id: str) -> str:
    """The KV bucket of a job's status (its cell's)."""
    return f"fanjet_jobs_{cell(job_id)}"


def tasks_stream(cell: int) -> str:
    """The work queue of a cell (partition mod 3)."""
    return f"FANJET_TASKS_{cell}"


def event_subject(job_id: str, kind: str) -> str:
    return f"fanjet.ev.{partition(job_id):02d}.{job_id}.{kind}"


def step_consumer(workflow: str, step: str) -> str:
    return f"fanjet_{workflow}_{step}"


def outcome_msg_id(task: dict, kind: str) -> str:
    """The message id of an outcome: a redriven run's end with its run."""
    job, i, idx = task["job_id"], task["step_index"], task["index"]
    run = task.get("run", 0)
    return f"{job}:{kind}:{i}:{idx}" + (f":r{run}" if run else "")


def subjob_completed(task: dict, attempt: int, result, duration_ms: int):
    """(subject, headers, payload) of a SubjobCompleted event."""
    job, i, idx = task["job_id"], task["step_index"], task["index"]
    event = {"type": "SubjobCompleted", "job_id": job, "step_index": i, "index": idx,
             "attempt": attempt, "result": result, "duration_ms": duration_ms,
             "run": task.get("run", 0), "token": task.get("token", "")}
    headers = {"Nats-Msg-Id": outcome_msg_id(task, "subjob_completed")}
    return event_subject(job, "subjob_completed"), headers, json.dumps(event).encode()


def subjob_failed(task: dict, attempt: int, error: str):
    """(subject, headers, payload) of a SubjobFailed event."""
    job, i, idx = task["job_id"], task["step_index"], task["index"]
    event = {"type": "SubjobFailed", "job_id": job, "step_index": i, "index": idx,
             "attempt": attempt, "error": error,
             "run": task.get("run", 0), "token": task.get("token", "")}
    headers = {"Nats-Msg-Id": outcome_msg_id(task, "subjob_failed")}
    return event_subject(job, "subjob_failed"), headers, json.dumps(event).encode()


def subjobs_done(task: dict, attempt: int, outcomes: list, duration_ms: int):
    """(subject, headers, payload) of a SubjobsDone event: a batch's outcomes,
    each {"index", "attempt", "result"} or {"index", "attempt", "error"}."""
    job, i, first = task["job_id"], task["step_index"], task["index"]
    run = task.get("run", 0)
    event = {"type": "SubjobsDone", "job_id": job, "step_index": i, "index": first,
             "batch_size": task["batch_size"], "attempt": attempt,
             "duration_ms": duration_ms, "outcomes": outcomes,
             "run": run, "token": task.get("token", "")}
    msg_id = f"{job}:subjobs_done:{i}:{first}:{outcomes[0]['index']}" + (f":r{run}" if run else "")
    return event_subject(job, "subjobs_done"), {"Nats-Msg-Id": msg_id}, json.dumps(event).encode()


def backoff_seconds(task: dict, attempt: int) -> float:
    """The step's delay before retrying after failed attempt `attempt`."""
    delays = task.get("backoff_ms") or [0]
    return delays[min(attempt, len(delays)) - 1] / 1000.0


TERMINAL = {"completed", "failed", "cancelled", "rejected"}
