"""Answer extraction and checking: the rule-based verifier r_v of the paper (math-verify on the last `\\boxed{}`).

One definition serves the training rewards (`rewards.py`), the evaluation report and the equivalence classes of
weighted voting. Two checks: `is_correct`, lenient (the last box, else the last `$...$` math, else the last number),
right for models that never box such as SmolLM2; and `is_correct_boxed`, the official LaSeR code's (exactly one
`\\boxed{`, then math-verify on it, no fallback; the official R1 format check when the prompt asks for `<answer>`
tags), for comparing with the paper. `grade_last_boxed` is the official evaluation's grading.

Every check is bounded in time (`set_verification_time_limit`, 5 s by default as the official reward): math-verify
never returns on some answers (`\\boxed{9^{9^{9}}}`), and a policy writes such things sooner or later. A check past
the bound scores as wrong, as the official reward's timeout does, and is counted (`verification_timeouts`). In the
main thread a SIGALRM deadline interrupts the check; elsewhere (threads, or a main thread whose alarm is taken) the
check runs in a persistent child process that bounds itself the same way and is killed if it still hangs.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from math_verify import LatexExtractionConfig, parse, verify


logger = logging.getLogger(__name__)

_LATEX = [LatexExtractionConfig()]
# A plain number: optional sign, thousands separators, decimals, or a fraction a/b.
_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w.])-?\d+(?:\.\d+)?(?:/\d+)?")
# math-verify warns once that its own signal-based timeouts are off: the checks here are bounded as a whole instead.
logging.getLogger("math_verify").setLevel(logging.ERROR)

DEFAULT_VERIFICATION_TIME_LIMIT = 5.0  # seconds, as math-verify's timeouts in the official LaSeR reward
TIME_LIMIT_ENV = "TRL_LASER_VERIFICATION_TIME_LIMIT"
_KILL_GRACE_S = 2.0  # how long past the bound a verifier process may stay silent before it is killed
_STARTUP_S = 120.0  # for the verifier process to import math-verify and sympy
_REALARM_S = 0.5  # the alarm fires again while a check still runs: mpmath's bare `except:` can swallow one raise

_F = TypeVar("_F", bound=Callable[..., Any])


def _positive_seconds(value: Any, source: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{source} must be a positive number of seconds, got {value!r}.")
    return seconds


_time_limit = _positive_seconds(os.environ.get(TIME_LIMIT_ENV, DEFAULT_VERIFICATION_TIME_LIMIT), TIME_LIMIT_ENV)
_timeouts = 0
_timeouts_lock = threading.Lock()
_inside = threading.local()  # set while a bounded check runs in this thread: nested checks share its deadline
_alarm_armed = False


def set_verification_time_limit(seconds: float) -> None:
    """Bound every later check of this process to `seconds` (default 5, or the `TRL_LASER_VERIFICATION_TIME_LIMIT`
    environment variable, which also reaches the processes a launcher starts)."""
    global _time_limit
    _time_limit = _positive_seconds(seconds, "The verification time limit")


def verification_time_limit() -> float:
    """The time bound, in seconds, of each check of this process."""
    return _time_limit


def verification_timeouts() -> int:
    """How many checks of this process ran past the time bound (and scored as wrong): a count for the training logs."""
    return _timeouts


class _CheckTimedOut(BaseException):
    """The alarm's interruption: a BaseException, so that math-verify's and sympy's `except Exception` let it pass."""


def _on_alarm(signum: int, frame: Any) -> None:
    if not _alarm_armed:
        return
    signal.setitimer(signal.ITIMER_REAL, _REALARM_S)
    # Never raise inside `_run_with_alarm` itself: its own bookkeeping must run, or the alarm would outlive the check.
    if frame is None or frame.f_code is not _run_with_alarm.__code__:
        raise _CheckTimedOut


def _run_with_alarm(check: Callable[..., Any], args: Sequence, kwargs: dict, seconds: float) -> tuple[bool, Any]:
    """(timed out, result) of `check(*args, **kwargs)` under a SIGALRM deadline; only the main thread gets signals."""
    global _alarm_armed
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    _inside.active = True
    try:
        _alarm_armed = True
        signal.setitimer(signal.ITIMER_REAL, seconds)
        return False, check(*args, **kwargs)
    except _CheckTimedOut:
        return True, None
    finally:
        _alarm_armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _inside.active = False


def _alarm_available() -> bool:
    """Whether this thread can bound a check with SIGALRM: the main thread, with no alarm of someone else running."""
    # A handler set outside Python reads as None and could not be restored.
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        and signal.getsignal(signal.SIGALRM) is not None
    )


# The verifier process loads this very file (not the package, which would import torch and TRL), then serves checks.
_SERVE = (
    "import importlib.util, sys; "
    "spec = importlib.util.spec_from_file_location('trl_laser_verifier_process', sys.argv[1]); "
    "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); module._serve()"
)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


class _VerifierProcess:
    """A persistent child process that runs the checks of threads that cannot use the alarm, one at a time.

    It runs each check under its own SIGALRM deadline (it is its own main thread) and answers "timeout" on time; if it
    stays silent past the bound plus a grace, it is killed and restarted on the next check. It exits when this process
    closes its input, including when this process dies, so no hung check survives its owner.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.to_child = self.from_child = -1
        self.readable = select.poll()  # not select(), which fails on descriptors past 1024 (a busy trainer has them)
        self.pending = b""

    def run(self, name: str, args: Sequence, kwargs: dict, seconds: float) -> tuple[bool, Any]:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            _write_all(self.to_child, json.dumps([name, list(args), kwargs, seconds]).encode() + b"\n")
            line = self._read_line(time.monotonic() + seconds + _KILL_GRACE_S)
            if line is None:
                self.stop()
                return True, None
            status, value = json.loads(line)
            if status == "error":
                raise RuntimeError(f"The verifier process failed on a check: {value}")
            return status == "timeout", value

    def _start(self) -> None:
        self.stop()
        to_child_r, self.to_child = os.pipe()
        self.from_child, from_child_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _SERVE, os.path.abspath(__file__)], stdin=to_child_r, stdout=from_child_w
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.readable = select.poll()
        self.readable.register(self.from_child, select.POLLIN)
        if self._read_line(time.monotonic() + _STARTUP_S) != b"ready":
            self.stop()
            raise RuntimeError(f"The verifier process did not start within {_STARTUP_S:.0f} s.")

    def _read_line(self, deadline: float) -> bytes | None:
        """The next line from the child, or None if none came before `deadline`; raises if the child is gone."""
        while b"\n" not in self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.readable.poll(remaining * 1000):
                return None
            chunk = os.read(self.from_child, 1 << 16)
            if not chunk:
                code = self.proc.wait() if self.proc is not None else None
                self.stop()
                raise RuntimeError(f"The verifier process exited (code {code}).")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line

    def stop(self) -> None:
        """Close the pipes and reap the child (killed if it does not end on its own at once)."""
        for fd in (self.to_child, self.from_child):
            if fd >= 0:
                os.close(fd)
        self.to_child = self.from_child = -1
        self.pending = b""
        if self.proc is not None:
            try:
                self.proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


_verifier_process = _VerifierProcess()
atexit.register(lambda: _verifier_process.stop())


def _after_fork_in_child() -> None:
    """A forked child starts its own count and its own verifier process; the parent's pipes are closed, not used."""
    global _verifier_process, _timeouts, _timeouts_lock, _alarm_armed
    inherited = _verifier_process
    for fd in (inherited.to_child, inherited.from_child):
        if fd >= 0:
            os.close(fd)
    _verifier_process, _timeouts, _timeouts_lock, _alarm_armed = _VerifierProcess(), 0, threading.Lock(), False


os.register_at_fork(after_in_child=_after_fork_in_child)


def _serve() -> None:
    """The verifier process: a `[name, args, kwargs, seconds]` JSON request per line in, a `[status, value]` reply
    out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the owner, which then closes this process's input
    replies = os.dup(1)
    os.dup2(2, 1)  # what a library prints goes to stderr, never into the replies
    _write_all(replies, b"ready\n")
    for request in sys.stdin.buffer:
        name, args, kwargs, seconds = json.loads(request)
        try:
            timed_out, value = _run_with_alarm(_UNBOUNDED[name], args, kwargs, seconds)
            reply = ["timeout", None] if timed_out else ["ok", value]
        except Exception as e:
            reply = ["error", f"{type(e).__name__}: {e}"]
        try:
            _write_all(replies, json.dumps(reply).encode() + b"\n")
        except BrokenPipeError:  # the owner is gone
            return


_UNBOUNDED: dict[str, Callable[..., Any]] = {}


def _time_bounded(on_timeout: Any) -> Callable[[_F], _F]:
    """Bound a check (JSON-able arguments and result) by the time limit; past it, count it and return `on_timeout`."""

    def decorate(check: _F) -> _F:
        _UNBOUNDED[check.__name__] = check

        @functools.wraps(check)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            global _timeouts
            if getattr(_inside, "active", False):
                return check(*args, **kwargs)
            seconds = _time_limit
            if _alarm_available():
                timed_out, value = _run_with_alarm(check, args, kwargs, seconds)
            else:
                timed_out, value = _verifier_process.run(check.__name__, args, kwargs, seconds)
            if not timed_out:
                return value
            with _timeouts_lock:
                _timeouts += 1
                count = _timeouts
            logger.warning(
                "A math-verify check ran past its %g s bound and scores as wrong (%d so far in this process).",
                seconds,
                count,
            )
            return on_timeout

        return bounded  # type: ignore[return-value]

    return decorate


def _closing_brace(text: str, opening: int) -> int | None:
    """The index of the `}` that closes the `{` at `opening` (braces balanced), or None if it never closes."""
    depth = 0
    for j in range(opening, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    j = _closing_brace(text, i)
    return None if j is None else text[i + 1 : j].strip()


def content_text(content: Any) -> str:
    """A chat message's content as text: a string, None (a tool-call-only message) or a list of parts."""
    if not content:
        return ""
    return content if isinstance(content, str) else " ".join(c.get("text", "") for c in content)


def completion_text(completion: Any) -> str:
    """The text of a completion as TRL passes it: a string, or a list of chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return content_text(completion[-1].get("content"))
    raise TypeError(f"Unsupported completion type {type(completion).__name__}: expected str or a list of messages.")


@functools.lru_cache(maxsize=65536)
def _parse(text: str, latex_only: bool = False) -> tuple:
    config = _LATEX if latex_only else None
    kwargs = {"extraction_config": config} if config else {}
    return tuple(parse(text, parsing_timeout=None, **kwargs))


@_time_bounded(on_timeout=None)
def extract_answer(text: str) -> str | None:
    """The answer a completion gives: the last `\\boxed{}`, else the last `$...$` math, else the last plain number.

    An unboxed completion's expressions are not evaluated: "86 * 59 is hard" answers 59, not 5074, so restating the
    problem never counts as solving it. None past the time limit.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    latex = _parse(text, latex_only=True)
    if latex:
        return str(latex[-1])
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def parse_answer(answer: str) -> tuple:
    """math-verify's parse of one answer (a gold answer or an extracted one): the whole string, or its `\\boxed{}`.

    Empty if nothing could be parsed. Not bounded in time by itself: the checks that call it are.
    """
    boxed = last_boxed(answer)
    text = (boxed if boxed is not None else answer).strip().strip("$").strip()
    if not text:
        return ()
    return _parse(f"${text}$") or _parse(text)


@_time_bounded(on_timeout=False)
def answers_equivalent(a: str, b: str) -> bool:
    """Whether two answers are mathematically equal (`0.5`, `\\frac{1}{2}` and `\\boxed{1/2}` are); False past the
    time limit."""
    pa, pb = parse_answer(a), parse_answer(b)
    if not pa or not pb:
        return False
    return bool(verify(list(pa), list(pb), timeout_seconds=None))


@_time_bounded(on_timeout=False)
def is_correct(completion: str, gold: str) -> bool:
    """r_v: whether the answer extracted from the completion equals the gold answer (LaTeX or a plain number); False
    past the time limit."""
    answer = extract_answer(completion)
    return answer is not None and answers_equivalent(str(gold), answer)


def last_box_content(text: str) -> str | None:
    """The official evaluation's answer (`remove_boxed(last_boxed_only_string(text))`): the last `\\boxed{...}`.

    None without a box, for an unclosed one, and when the last box is an `\\fbox` (which the official code finds but
    cannot unwrap).
    """
    start = text.rfind("\\boxed")
    if start < 0 or not text.startswith("\\boxed{", start):  # no `\\boxed`, or one without a brace (`\\boxed 3`)
        return None
    opening = start + len("\\boxed")
    j = _closing_brace(text, opening)
    return None if j is None else text[opening + 1 : j]


def single_boxed(text: str) -> str | None:
    """The official verifier's answer: the content of the response's only `\\boxed{...}`, else None.

    As the official LaSeR code (verl `reward_score`): None unless `\\boxed{` occurs exactly once, so a nested box
    (`\\boxed{\\boxed{3}}`) or a repeated answer gives None; `\\fbox{...}` is never an answer (the official
    `remove_boxed` accepts only `\\boxed{`); the box must close (braces balanced).
    """
    return last_box_content(text) if text.count("\\boxed{") == 1 else None


def _r1_format(text: str) -> bool:
    """The official R1 format check: `</think>`, `<answer>`, `</answer>` once each and the whole response matching
    `.*</think>.*<answer>.*\\\\boxed\\{.*\\}.*</answer>` (DOTALL), written out so that it runs in linear time."""
    if any(text.count(tag) != 1 for tag in ("</think>", "<answer>", "</answer>")) or not text.endswith("</answer>"):
        return False
    opening = text.index("<answer>")
    if text.index("</think>") + len("</think>") > opening:
        return False
    inside = text[opening + len("<answer>") : -len("</answer>")]
    box = inside.find("\\boxed{")
    return box >= 0 and "}" in inside[box + len("\\boxed{") :]


def official_answer(completion: str, answer_tags: bool = False) -> str | None:
    """The official training reward's answer (verl `default_compute_score`), None when its format check fails.

    Without answer tags in the prompt: the only `\\boxed{}` (`single_boxed`). With them (`asks_for_answer_tags`), the
    R1 format check: `</think>`, `<answer>` and `</answer>` once each, in that order, the response ending with
    `</answer>` and a closed `\\boxed{` between the answer tags; then the last box, so several boxes inside the tags
    pass and the last one counts.
    """
    if not answer_tags:
        return single_boxed(completion)
    return last_box_content(completion) if _r1_format(completion) else None


@_time_bounded(on_timeout=False)
def _boxed_equivalent(answer: str, gold: str) -> bool:
    """The official comparison: math-verify on `\\boxed{gold}` and `\\boxed{answer}`; any failure is wrong, and so is
    a comparison past the time limit (the official reward's 5 s timeout)."""
    try:
        gold_parsed, answer_parsed = _parse(f"\\boxed{{{gold}}}"), _parse(f"\\boxed{{{answer}}}")
        return bool(verify(list(gold_parsed), list(answer_parsed), timeout_seconds=None))
    except Exception:  # the official code scores any math-verify failure as wrong
        return False


def is_correct_boxed(completion: str, gold: str, answer_tags: bool = False) -> bool:
    """The official r_v (training): its answer (`official_answer`) equals the gold answer."""
    answer = official_answer(completion, answer_tags)
    return answer is not None and _boxed_equivalent(answer, gold)


def grade_last_boxed(completion: str, gold: str) -> tuple[str | None, bool]:
    """The official evaluation's grading: the response cut after its first `</answer>`, its last `\\boxed{}`
    (`last_box_content`), and whether that answer equals the gold one.

    A box after the first `</answer>` never counts, and a response that answers inside the tags without a box has no
    answer.
    """
    head, closing, _ = completion.partition("</answer>")
    answer = last_box_content(head + closing)
    return answer, answer is not None and _boxed_equivalent(answer, gold)
