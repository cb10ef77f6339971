"""Signals, handled in this one place. SIGTERM (what schedulers send) and SIGINT (Ctrl-C)
raise an exception in the main process, so that cleanup code runs (a checkpoint being
written removes its temporary file) and a script ends with one line; DataLoader workers
ignore them, since the process group's signal reaches them too and the main process shuts
them down. While the main process takes a batch from the workers, a signal waits until the
batch is in: raised in the middle of the hand-over, it would cut the connection over which a
worker passes the batch's shared memory, and the worker would print a traceback."""
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached a script. A BaseException like KeyboardInterrupt, so that
    code skipping bad records (`except Exception`) lets it pass."""


class SignalCatcher:
    """The handler of SIGTERM and SIGINT while installed, and the signal that came. The
    handler raises at once, but an exception raised while a finalizer runs (e.g. a
    `__del__` during garbage collection) is printed and dropped, so `check` raises it
    again where the code can act on it."""

    def __init__(self, exception: Callable[[int], BaseException]):
        self.exception = exception
        self.signum: Optional[int] = None
        self.holding = False

    def handle(self, signum: int, frame) -> None:
        first = self.signum is None
        self.signum = signum
        if not (self.holding and first):  # a second signal raises even while held
            self.check()

    def check(self) -> None:
        if self.signum is not None:
            raise self.exception(self.signum)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Within the block the first signal is recorded and raised when the block ends;
        a second one raises at once (a second Ctrl-C when the block takes too long)."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        self.check()


def _installed_catcher() -> Optional[SignalCatcher]:
    """The catcher whose handler SIGTERM has now, if any."""
    catcher = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return catcher if isinstance(catcher, SignalCatcher) else None


def _interrupted(signum: int) -> BaseException:
    return Interrupted(signal.Signals(signum).name)


def _as_by_default(signum: int) -> BaseException:
    """What the default handling amounts to: SIGINT's KeyboardInterrupt, and for SIGTERM
    an exit with the status of a process the signal ended (128 + 15)."""
    return KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)


@contextmanager
def script_signals() -> Iterator[SignalCatcher]:
    """During a script SIGTERM and SIGINT raise `Interrupted` naming the signal; the
    previous handlers come back afterwards."""
    catcher = SignalCatcher(_interrupted)
    previous = {signum: signal.signal(signum, catcher.handle) for signum in SIGNALS}
    try:
        yield catcher
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def signals_raise() -> Iterator[SignalCatcher]:
    """During the block SIGTERM and SIGINT raise; yields the catcher to `check` at the
    points where the block can still act on a signal. Within `script_signals`, the
    script's catcher. Elsewhere, for signals with their default handling and on the main
    thread (where Python handles signals), SIGTERM raises SystemExit(143) and SIGINT
    KeyboardInterrupt; a handler the program set stays, and `check` never raises."""
    installed = _installed_catcher()
    if installed is not None:
        yield installed
        return
    catcher = SignalCatcher(_as_by_default)
    defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
    handled = ([signum for signum, default in defaults.items()
                if signal.getsignal(signum) is default]
               if threading.current_thread() is threading.main_thread() else [])
    for signum in handled:
        signal.signal(signum, catcher.handle)
    try:
        yield catcher
    finally:
        for signum in handled:
            signal.signal(signum, defaults[signum])


_END = object()  # what `held_while_fetching` gets from an exhausted iterator


def held_while_fetching(items: Iterable[T]) -> Iterator[T]:
    """`items` (a DataLoader) with SIGTERM and SIGINT held while each item is fetched, where
    a catcher is installed (`script_signals`, `signals_raise`); the signal is raised once the
    item is in, between two items."""
    iterator = iter(items)
    while True:
        catcher = _installed_catcher()
        if catcher is None:
            item = next(iterator, _END)
        else:
            with catcher.held():
                item = next(iterator, _END)
        if item is _END:
            return
        yield item


def ignore_signals_in_worker(worker_id: int) -> None:
    """A DataLoader worker's `worker_init_fn`: the worker ignores SIGINT and SIGTERM, which
    the main process handles; a worker left with the main process's handler would die
    with a traceback."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
