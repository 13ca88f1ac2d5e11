"""The reward of sgpo.py, evaluate.py and extract_strategies.py: math-verify, bounded in time,
crash-proof, and run in a pool of processes when there are many responses to grade (grading 1,536
MATH-500-length responses takes ~5 s in one process, docs/memory_and_speed.md "Speed")."""

import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache


# math-verify logs a timed-out input whole ("Timeout during parsing: <a 1 MB response>")
def _short_log(record):
    record.msg, record.args = record.getMessage()[:300], ()
    return True


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_short_log)


@lru_cache(maxsize=65536)
def _parse_gold(answer: str, timeout: int):
    from math_verify import parse

    return parse(f"${answer}$", parsing_timeout=timeout)


def math_reward(response: str, answer: str, timeout: int = 5) -> float:
    """1.0 if the response's final answer (boxed first, then any LaTeX/expression) equals the gold
    answer.

    Never raises and never hangs past ~2 x timeout seconds: math-verify bounds parse and verify with
    SIGALRM (so call it from the main thread), and any exception means reward 0. A parsed value of
    an untrusted answer is never str()-ed (sympy can take unbounded time printing it).
    """
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

        gold = _parse_gold(answer, timeout)
        pred = parse(
            response,
            extraction_config=[
                LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()
            ],
            parsing_timeout=timeout,
        )
        if not gold or not pred:
            return 0.0
        return 1.0 if verify(gold, pred, timeout_seconds=timeout) else 0.0
    # math-verify's timeout and sympy errors alike; never the user's Ctrl-C
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        return 0.0


def default_workers() -> int:
    """The cores this rank may use (its CPU affinity shared with the other ranks of the node), at
    most 8."""
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    return max(1, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def _exit_with(trainer_pid: int):
    """A worker's initializer: end the worker when the trainer is gone (killed: it never called
    close()), which a pool's worker, blocked on its task queue, would otherwise outlive. Ctrl-C
    reaches every process of the terminal's group: a worker ignores it (the trainer, which gets it
    too, closes the pool) rather than print a KeyboardInterrupt traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while True:
            time.sleep(1)
            try:
                os.kill(trainer_pid, 0)
            except ProcessLookupError:
                os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


class Grader:
    """grader(responses, answers) -> [math_reward of each pair], in `workers` processes, or in this
    one: the same values in the same order. A pool costs ~1 s to start and ~1 ms a chunk: it starts
    once one call graded inline has taken more than `pool_after` seconds (short answers, as in toy/,
    never pay for it). Workers come from a forkserver (a fork of a process running CUDA or gloo
    threads is unsafe; like any such child, each imports the main script, whose `if __name__ ==
    "__main__"` guard keeps it from running), and each calls math-verify in its main thread, where
    its SIGALRM timeout works. close() ends them; so does the trainer's death."""

    def __init__(self, workers: int, timeout: int = 5, pool_after: float = 0.5):
        # -1: this rank's share of the cores (default_workers)
        workers = default_workers() if workers == -1 else workers
        self.workers, self.timeout, self.pool_after, self.pool = workers, timeout, pool_after, None

    def __call__(self, responses: list, answers: list) -> list:
        if self.pool is None:
            start = time.perf_counter()
            rewards = [math_reward(r, a, self.timeout) for r, a in zip(responses, answers)]
            if self.workers > 1 and time.perf_counter() - start > self.pool_after:
                self.start_pool()
            return rewards
        # a few chunks a worker: balance at little IPC cost
        chunk = -(-len(responses) // (4 * self.workers))
        return list(
            self.pool.map(
                math_reward, responses, answers, [self.timeout] * len(responses), chunksize=chunk
            )
        )

    def start_pool(self):
        if self.pool is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["reward"])
            self.pool = ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=_exit_with, initargs=(os.getpid(),)
            )

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None
