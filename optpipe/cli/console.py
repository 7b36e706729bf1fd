"""What the CLI shows on stderr while it works: step lines, a progress bar on a terminal, and log records by
verbosity (optpipe's warnings always; third-party noise only with -vv)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Any, Iterator, TextIO

from optpipe.passbase import Tick

# Their loggers and Python warnings are quiet unless -vv (or --debug).
LIBRARIES = ("transformers", "optimum", "onnxruntime", "torch", "neural_compressor", "huggingface_hub")


class Reporter:
    """The CLI's progress callback. Step lines (str) go to stderr; Ticks draw a tqdm bar with an ETA only when
    stderr is a terminal (piped output gets no carriage returns and no bar); with `quiet` nothing is shown."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None, bars: bool | None = None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.bars = (not quiet) and (self.stream.isatty() if bars is None else bars)
        self._bar: Any = None
        self._label: str | None = None

    def __call__(self, event: str | Tick) -> None:
        if self.quiet:
            return
        if isinstance(event, Tick):
            if self.bars:
                self._draw(event)
            return
        self.write(str(event))

    def write(self, line: str) -> None:
        """One line on the stream, above the bar when one is drawn."""
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def _draw(self, tick: Tick) -> None:
        from tqdm import tqdm

        if self._bar is None or tick.label != self._label or tick.done < self._bar.n:
            self.close()
            # a terminal that reports no size (a fresh pty) would get no bar at all: assume 80x24 then
            width = {"dynamic_ncols": True} if _columns(self.stream) > 0 else {"ncols": 80, "nrows": 24}
            # a bar reopened mid-loop (a nested step had the line) starts at `done`, so its rate stays true
            self._bar = tqdm(total=tick.total, desc=f"  {tick.label}", unit=tick.unit, file=self.stream,
                             leave=True, mininterval=0.2, initial=tick.done, **width)
            self._label = tick.label
        if tick.total != self._bar.total:
            self._bar.total = tick.total
        self._bar.update(tick.done - self._bar.n)
        if tick.total is not None and tick.done >= tick.total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            if self._bar.total is None or self._bar.n < self._bar.total:
                self._bar.leave = False  # a loop cut short, or one a nested step interrupted: erase its line
            self._bar.close()
            self._bar = None
            self._label = None


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


class _Lines(logging.Handler):
    """optpipe's log records as lines through the Reporter (so they never tear the bar)."""

    def __init__(self, reporter: Reporter):
        super().__init__()
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                if message.startswith("optpipe: "):  # some messages already carry the prefix
                    message = message[len("optpipe: "):]
                message = f"optpipe: {record.levelname.lower()}: {message}"
            elif record.levelno < logging.INFO:
                message = f"{record.name}: {message}"
            self.reporter.write(message)
        except Exception:  # a broken stream must not turn a log record into a crash
            self.handleError(record)


class _AtLeast(logging.Filter):
    """Drops records below a level. neural_compressor resets its logger's level (from $LOGLEVEL, default INFO)
    when it first logs, so a level set beforehand does not hold; a filter on the logger does."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


@contextlib.contextmanager
def configured(verbosity: int, quiet: bool, reporter: Reporter) -> Iterator[None]:
    """Logging and warnings for one CLI invocation, restored afterwards (main() may run inside another program).

    quiet: errors only. 0: optpipe's warnings. -v: optpipe's info. -vv: optpipe's debug, and the libraries'
    warnings and Python warnings."""
    own_level = (logging.ERROR if quiet else logging.WARNING if verbosity <= 0 else
                 logging.INFO if verbosity == 1 else logging.DEBUG)
    loud = verbosity >= 2 and not quiet
    library_level = logging.WARNING if loud else logging.ERROR
    env = {"TOKENIZERS_PARALLELISM": "false", "TF_CPP_MIN_LOG_LEVEL": "3" if not loud else "1",
           "TRANSFORMERS_VERBOSITY": "warning" if loud else "error"}
    if not reporter.bars:  # the libraries' own tqdm bars (transformers' GGUF conversion) stay off logs and pipes
        env.update({"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    saved_env = {key: os.environ.get(key) for key in env}
    for key, value in env.items():
        os.environ.setdefault(key, value)  # the user's own setting wins

    own = logging.getLogger("optpipe")
    root = logging.getLogger()
    libraries = [logging.getLogger(name) for name in LIBRARIES]
    saved = [(log, log.level, log.propagate, list(log.handlers), list(log.filters)) for log in (own, root, *libraries)]
    own_handler = _Lines(reporter)
    own.handlers[:] = [own_handler]
    own.setLevel(own_level)
    own.propagate = False
    library_handler = logging.StreamHandler(reporter.stream)
    library_handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    root.handlers[:] = [library_handler]
    root.setLevel(library_level)
    quiet_filter = _AtLeast(library_level)
    for log in libraries:
        log.setLevel(library_level)
        log.addFilter(quiet_filter)
    _onnxruntime_severity(loud)
    try:
        with warnings.catch_warnings():
            if loud:
                warnings.simplefilter("default")
            else:
                warnings.simplefilter("ignore")
                if not quiet:  # optpipe's own Python warnings stay visible
                    warnings.filterwarnings("default", module=r"optpipe(\.|$)")
                    # but not a library's unclosed file that the garbage collector happens to find while optpipe
                    # code runs (it is reported against that code's module)
                    warnings.filterwarnings("ignore", category=ResourceWarning)
            yield
    finally:
        reporter.close()
        for log, level, propagate, handlers, filters in saved:
            log.setLevel(level)
            log.propagate = propagate
            log.handlers[:] = handlers
            log.filters[:] = filters
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _onnxruntime_severity(loud: bool) -> None:
    """ONNX Runtime's C++ warnings (sessions built by Optimum or the quantizer) follow the verbosity too."""
    try:
        import onnxruntime
    except ImportError:  # main() reports a missing or broken runtime in one line
        return
    onnxruntime.set_default_logger_severity(2 if loud else 3)
