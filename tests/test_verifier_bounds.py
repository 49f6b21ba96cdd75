"""Every check is bounded in time: a completion that math-verify never finishes (`\\boxed{9^{9^{9}}}`) scores 0 within
the bound, in the main thread, in other threads and in other processes, and the timed-out checks are counted."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from trl_laser.answers import (
    grade_last_boxed,
    is_correct,
    set_verification_time_limit,
    verification_time_limit,
    verification_timeouts,
)
from trl_laser.rewards import boxed_math_verify_reward, math_verify_reward


HANG = "So $\\boxed{9^{9^{9}}}$."  # math-verify without a time bound never returns on this one
LIMIT = 1.0
FAST = 4.0  # seconds: the bound, the verifier process's start and a loaded machine's slack


@pytest.fixture(autouse=True)
def short_limit():
    previous = verification_time_limit()
    set_verification_time_limit(LIMIT)
    yield
    set_verification_time_limit(previous)


def timed(fn, *args):
    """(result, seconds taken, timed-out checks counted meanwhile)."""
    count, start = verification_timeouts(), time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - start, verification_timeouts() - count


def verifier_processes() -> list[int]:
    """The pids of this process's children that serve checks."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat, open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
                if ppid == os.getpid() and b"trl_laser_verifier_process" in cmdline.read():
                    pids.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def settles_asleep(pid: int, within: float = 2.0) -> bool:
    """Whether the process is seen sleeping (state S) within `within` seconds: a hung check would keep it running."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] == "S":
                return True
        time.sleep(0.05)
    return False


def test_main_thread_bound_scores_zero_and_counts():
    handler = signal.getsignal(signal.SIGALRM)
    for fn in (boxed_math_verify_reward, math_verify_reward):
        result, seconds, counted = timed(fn, [HANG], ["9"])
        assert result == [0.0] and seconds < FAST and counted == 1
    (answer, correct), seconds, counted = timed(grade_last_boxed, HANG, "9")  # the paper protocol's grading
    assert answer == "9^{9^{9}}" and correct is False and seconds < FAST and counted == 1
    # The alarm is gone and the previous handler back once the check is over.
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0) and signal.getsignal(signal.SIGALRM) is handler
    assert boxed_math_verify_reward(["so \\boxed{9}", "so \\boxed{8}"], ["9", "9"]) == [1.0, 0.0]


def test_worker_thread_bound_scores_zero_and_counts():
    with ThreadPoolExecutor(max_workers=2) as pool:
        assert pool.submit(math_verify_reward, ["3 + 4 = 7", "x = 8"], ["7", "7"]).result() == [1.0, 0.0]
        assert pool.submit(boxed_math_verify_reward, ["so \\boxed{7}"], ["7"]).result() == [1.0]
        result, seconds, counted = pool.submit(timed, is_correct, HANG, "9").result(timeout=3 * FAST)
        assert result is False and seconds < FAST and counted == 1
    results = {}
    thread = threading.Thread(target=lambda: results.update(timed=timed(boxed_math_verify_reward, [HANG], ["9"])))
    thread.start()
    thread.join(timeout=3 * FAST)
    assert not thread.is_alive()
    result, seconds, counted = results["timed"]
    assert result == [0.0] and seconds < FAST and counted == 1
    # The process that ran the hung checks answered on time and now waits, burning no CPU.
    (pid,) = verifier_processes()
    assert settles_asleep(pid)


def test_silent_verifier_process_is_killed_and_replaced():
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(boxed_math_verify_reward, ["so \\boxed{7}"], ["7"]).result() == [1.0]
        (pid,) = verifier_processes()
        os.kill(pid, signal.SIGSTOP)  # a check stuck where no signal reaches it
        result, seconds, counted = pool.submit(timed, boxed_math_verify_reward, ["so \\boxed{7}"], ["7"]).result()
        assert result == [0.0] and seconds < LIMIT + FAST and counted == 1
        assert pid not in verifier_processes()  # killed and reaped, not left behind
        assert pool.submit(boxed_math_verify_reward, ["so \\boxed{7}"], ["7"]).result() == [1.0]


def _grade_in_child(queue) -> None:
    queue.put((timed(boxed_math_verify_reward, [HANG], ["9"]), boxed_math_verify_reward(["\\boxed{9}"], ["9"])))


def test_subprocess_bound_scores_zero_and_counts():
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_grade_in_child, args=(queue,))
    child.start()
    (result, seconds, counted), normal = queue.get(timeout=3 * FAST)
    child.join(timeout=FAST)
    assert child.exitcode == 0
    assert result == [0.0] and seconds < FAST and counted == 1
    assert normal == [1.0]


def test_time_limit_must_be_positive():
    for bad in (0, -1, float("nan"), float("inf"), "soon"):
        with pytest.raises(ValueError, match="positive number of seconds"):
            set_verification_time_limit(bad)
    assert verification_time_limit() == LIMIT


def test_trainer_logs_the_timed_out_checks(tiny_model_dir, tmp_path):
    from conftest import force_completions
    from test_trainer import make_trainer, parity_reward

    def verifier(completion_ids, **kwargs):  # the first completion's check hangs at step 1 only
        hung = [is_correct(HANG, "9")] if trainer.state.global_step == 0 else []
        return hung + parity_reward(completion_ids)[len(hung) :]

    trainer = make_trainer(tiny_model_dir, tmp_path, reward_funcs=[verifier], max_steps=2)
    force_completions(trainer)
    trainer.train()
    logged = [
        h["self_reward/verification_timeouts"]
        for h in trainer.state.log_history
        if "self_reward/verification_timeouts" in h
    ]
    assert logged == [1.0, 0.0]
