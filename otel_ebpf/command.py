"""Starting the traced COMMAND so that probes are attached before its first instruction runs.

The child is forked and held before exec until the parent has attached uprobes to its pid (what
`perf record -- CMD` does). The pid then stays the same through exec, so not a single call is missed
and other processes running the same binary are not traced.
"""

from __future__ import annotations

import os
import shutil
import signal

from otel_ebpf.errors import UserError


class Command:
    def __init__(self, argv: list[str]):
        if not argv:
            raise UserError("no COMMAND after --", "write the command to run after --, e.g. -- ./server --port 8080")
        path = shutil.which(argv[0])
        if path is None:
            raise UserError(f"cannot start {argv[0]!r}: command not found or not executable",
                            "check the path and its execute permission")
        self.argv = argv
        self.path = os.path.abspath(path)
        self.pid = 0
        self.exit_status: int | None = None
        self._go_w = -1
        self._err_r = -1

    def spawn_paused(self, output: int | None = None) -> int:
        """Fork; the child waits for release() before exec, its stdout and stderr on `output` if given (a file
        descriptor). Returns the child's pid."""
        go_r, self._go_w = os.pipe()
        self._err_r, err_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # child: only async-signal-safe work until exec
            try:
                os.close(self._go_w)
                os.close(self._err_r)
                if output is not None:
                    os.dup2(output, 1)
                    os.dup2(output, 2)
                if os.read(go_r, 1) == b"x":
                    os.execv(self.path, self.argv)
            except OSError as exc:
                os.write(err_w, str(exc.errno).encode())
            os._exit(127)
        os.close(go_r)
        os.close(err_w)
        self.pid = pid
        return pid

    def release(self) -> None:
        """Let the child exec; raises UserError if exec failed."""
        os.write(self._go_w, b"x")
        os.close(self._go_w)
        with os.fdopen(self._err_r, "rb") as err:
            errno_text = err.read()  # EOF on successful exec (the pipe is close-on-exec)
        if errno_text:
            os.waitpid(self.pid, 0)
            raise UserError(f"cannot start {self.argv[0]!r}: {os.strerror(int(errno_text))}",
                            "check the command and its permissions")

    def abandon(self) -> None:
        """The tracer failed before release(): the child must not run untraced."""
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)

    def poll(self) -> int | None:
        """Exit status once the child has ended (128+N when killed by signal N, as shells report it)."""
        if self.exit_status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                code = os.waitstatus_to_exitcode(status)
                self.exit_status = 128 - code if code < 0 else code
        return self.exit_status

    def signal(self, signum: int) -> None:
        if self.exit_status is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass
