"""A time budget for reducers: a reducer that runs too long is interrupted and rolled back.

Reducers run synchronously on the leader's event loop (DESIGN §1: one at a time, so they are
serializable), so a reducer that loops stalls every client of this process until it returns.
`SignalBudget` bounds that stall: it arms an `ITIMER_REAL` timer around the reducer's own
code, and the `SIGALRM` handler raises `Interrupted` (a `BaseException`, so a reducer's
`except Exception` cannot swallow it) into that code. `run_reducer` rolls the transaction back
and answers `ReducerTimeout` (code `REDUCER_TIMEOUT`, 3004).

Guarantees and limits:

* Only application code is interrupted: the handler raises only while a reducer runs, and only
  when no frame between the interrupted one and the reducer's entry is syncd's own code (the
  store, table handles, this module) or called by it, so no index or undo log is ever left
  half-written. Otherwise it retries every `RETRY_S` until the reducer is back in its own
  code, or returns.
* Python signal handlers run between bytecodes of the main thread. C code that does not return
  to the interpreter (`sum(range(10**10))`, a catastrophic regex, a C extension's long call) is
  interrupted only when it returns: the budget is then exceeded by that call's length. A
  blocking system call (`time.sleep`, a socket read) is interrupted at once (PEP 475: the
  handler runs and its exception propagates).
* A reducer that catches `BaseException` (or uses a bare `except:`) and keeps going is
  interrupted again every `RETRY_S`; one that swallowed the interruption and returned, or
  turned it into another exception, is still answered `REDUCER_TIMEOUT` and rolled back.
  One that swallows it every time and never returns is never stopped (nothing in Python is
  uncatchable): the process stalls until it returns.
* Off the main thread (signals cannot be handled there) or without `setitimer`, there is no
  budget: `install` logs a warning and `run` calls the reducer unbounded.

`ITIMER_REAL` and the `SIGALRM` handler are process-wide: budgets share one handler, which
acts for the budget whose reducer is running (one at a time: reducers never nest).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import TypeVar

from syncd.core.reducers import Interrupted

logger = logging.getLogger("syncd.budget")

T = TypeVar("T")

#: How often an expired reducer is interrupted again (it caught the interruption, or was in
#: syncd's own code when the timer fired).
RETRY_S = 0.001

# Code in syncd's own package is never interrupted (see the module docstring).
_SYNCD_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep

# The budget whose reducer runs now (None: no reducer runs under a budget).
_running: SignalBudget | None = None
# How many budgets are installed, and the SIGALRM handler before the first.
_installs = 0
_previous: Callable[[int, FrameType | None], object] | int | None = None


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    budget = _running
    if budget is None:
        return
    budget.expired = True
    # Raise only when every frame between the interrupted one and `run` is application (or
    # library) code: not syncd's, and not called from syncd's (an import or a `deepcopy` that
    # syncd's store started must not be cut off halfway).
    while frame is not None:
        code = frame.f_code
        if code is _RUN_CODE:
            raise Interrupted(budget.budget_ms)
        if code.co_filename.startswith(_SYNCD_DIR):
            return
        frame = frame.f_back


class SignalBudget:
    """Interrupts reducer code that runs longer than `budget_ms` (0: no budget).

    Call `install()` on the main thread before `run`, and `uninstall()` when done (both
    idempotent). `run` is the `run_user` hook of `run_reducer`.
    """

    def __init__(self, budget_ms: int) -> None:
        if budget_ms < 0:
            raise ValueError(f"the reducer budget must be >= 0 ms, got {budget_ms}")
        #: The budget in milliseconds; 0 means unlimited.
        self.budget_ms = budget_ms
        #: True once the timer fired during the current `run` (the call is over budget).
        self.expired = False
        # True while installed (the shared handler counts us).
        self._installed = False

    @property
    def enabled(self) -> bool:
        """True when reducers are bounded (a budget is set and the handler is installed)."""
        return self._installed

    def install(self) -> bool:
        """Take over SIGALRM. Returns False (and logs why) when no budget can be enforced."""
        global _installs, _previous
        if self.budget_ms == 0 or self._installed:
            return self._installed
        if not hasattr(signal, "setitimer") or not hasattr(signal, "SIGALRM"):
            logger.warning("no setitimer on this platform: reducers run without a time budget")
            return False
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not on the main thread: reducers run without a time budget")
            return False
        if _installs == 0:
            _previous = signal.signal(signal.SIGALRM, _on_alarm)
        _installs += 1
        self._installed = True
        return True

    def uninstall(self) -> None:
        """Give SIGALRM back (the previous handler, once no budget is installed)."""
        global _installs
        if not self._installed:
            return
        self._installed = False
        _installs -= 1
        if _installs == 0:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            signal.signal(signal.SIGALRM, _previous if _previous is not None else signal.SIG_DFL)

    def run(self, fn: Callable[..., T], *args: object) -> T:
        """Call `fn(*args)` (a reducer's own code) within the budget.

        Raises:
            Interrupted: `fn` ran past the budget (raised inside `fn`, or here if `fn`
                swallowed it or turned it into another exception).
        """
        global _running
        if not self._installed or _running is not None:
            return fn(*args)
        self.expired = False
        _running = self
        signal.setitimer(signal.ITIMER_REAL, self.budget_ms / 1000, RETRY_S)
        try:
            result = fn(*args)
        except Interrupted:
            raise
        except BaseException as exc:
            if self.expired:
                raise Interrupted(self.budget_ms) from exc
            raise
        finally:
            # This frame is syncd's own: the handler never raises here.
            _running = None
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
        if self.expired:
            raise Interrupted(self.budget_ms)
        return result


# The frame of `SignalBudget.run` marks where the reducer's own code starts on the stack.
_RUN_CODE = SignalBudget.run.__code__
