# moat REPL driver for Python, run by moat-agent as
# `python3 -u -c <bootstrap> <this file>`, the bootstrap compiling it as
# "<moat-driver>" (see guest/src/repl/python.rs and, for the protocol,
# guest/src/repl/mod.rs). The agent gives us three
# pipes besides stdio: fd 3 carries cells to us ("cell <id> <len>\n" + <len>
# bytes of UTF-8 code), fd 4 carries our events to the agent ("ready",
# "sync <seq>", "done <id> ok|error|interrupted", one per line), fd 5 carries
# the agent's acknowledgements of syncs ("<seq>\n"). Everything lives inside
# _moat_driver's closure: the user's namespace is a fresh __main__ module and
# the control fds are moved to close-on-exec descriptors >= 100.


def _moat_driver():
    import builtins
    import fcntl
    import os
    import select
    import signal
    import sys
    import threading
    import time
    import traceback
    import types

    SYNC_WAIT = 1.0
    CO_COROUTINE = 0x0080
    TOP_LEVEL_AWAIT = 0x2000 if sys.version_info >= (3, 8) else 0

    def grab(fd):
        new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100)
        os.close(fd)
        return new

    req_fd, ev_fd, ack_fd = grab(3), grab(4), grab(5)
    send_lock = threading.Lock()
    out_lock = threading.RLock()
    st = {"in_cell": False, "last": 0, "seq": 0, "acked": 0, "ackbuf": b""}
    ack_poll = select.poll()
    ack_poll.register(ack_fd, select.POLLIN)

    def send(line):
        data = (line + "\n").encode()
        with send_lock:
            while data:
                data = data[os.write(ev_fd, data):]

    def sync():
        # Wait until the agent has read everything already written to stdout
        # and stderr, so that what comes next is seen after it.
        st["seq"] += 1
        seq = st["seq"]
        send("sync %d" % seq)
        until = time.monotonic() + SYNC_WAIT
        while st["acked"] < seq:
            left = until - time.monotonic()
            if left <= 0 or not ack_poll.poll(left * 1000):
                return
            data = os.read(ack_fd, 4096)
            if not data:
                return
            lines = (st["ackbuf"] + data).split(b"\n")
            st["ackbuf"] = lines.pop()
            for line in lines:
                if line.strip().isdigit():
                    st["acked"] = max(st["acked"], int(line))

    class Stream:
        """sys.stdout / sys.stderr: the real stream, written through, with a
        sync whenever output switches from one stream to the other."""

        __slots__ = ("_inner", "_which")

        def __init__(self, inner, which):
            self._inner = inner
            self._which = which

        def write(self, s):
            with out_lock:
                if st["in_cell"] and st["last"] not in (0, self._which):
                    sync()
                st["last"] = self._which
                n = self._inner.write(s)
                self._inner.flush()
            return n

        def writelines(self, lines):
            for line in lines:
                self.write(line)

        def flush(self):
            self._inner.flush()

        def __getattr__(self, name):
            return getattr(self._inner, name)

    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    ns = main.__dict__
    sys.argv = [""]
    sys.stdout = Stream(sys.stdout, 1)
    sys.stderr = Stream(sys.stderr, 2)

    def on_sigint(signum, frame):
        if st["in_cell"]:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)

    driver_file = _moat_driver.__code__.co_filename

    def strip(te, seen):
        # Drop the driver's frames (e.g. the SIGINT handler's) everywhere in
        # the chain of exceptions.
        if te is None or id(te) in seen:
            return
        seen.add(id(te))
        frames = [f for f in te.stack if f.filename != driver_file]
        te.stack = traceback.StackSummary.from_list(frames)
        strip(te.__cause__, seen)
        strip(te.__context__, seen)
        for sub in getattr(te, "exceptions", None) or ():
            strip(sub, seen)

    def show(exc):
        # Print the traceback from the cell's first frame on: the driver's
        # own frames are no business of the user's.
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != "<cell>":
            tb = tb.tb_next
        sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, tb
        te = traceback.TracebackException(type(exc), exc, tb)
        strip(te, set())
        sys.stderr.write("".join(te.format()))
        sys.stderr.flush()

    def execute(src):
        try:
            code = compile(src, "<cell>", "exec", TOP_LEVEL_AWAIT, True)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            show(exc)
            return "error"
        try:
            if code.co_flags & CO_COROUTINE:
                import asyncio

                asyncio.run(eval(code, ns))
            else:
                exec(code, ns)
        except SystemExit as exc:
            if exc.code is None or exc.code == 0:
                return "ok"
            sys.stderr.write("SystemExit: %s\n" % (exc.code,))
            return "error"
        except KeyboardInterrupt as exc:
            show(exc)
            return "interrupted"
        except BaseException as exc:
            show(exc)
            return "error"
        return "ok"

    def flush_all():
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except BaseException:
                pass

    def run_cell(src):
        st["last"] = 0
        st["in_cell"] = True
        status = "error"
        try:
            try:
                status = execute(src)
                flush_all()
            finally:
                st["in_cell"] = False
        except KeyboardInterrupt:
            status = "interrupted"
        flush_all()
        return status

    inbuf = bytearray()

    def read_more():
        data = os.read(req_fd, 1 << 16)
        if not data:
            # The agent is gone: so are we.
            os._exit(0)
        inbuf.extend(data)

    def next_cell():
        while b"\n" not in inbuf:
            read_more()
        end = inbuf.index(b"\n")
        kind, cell_id, length = bytes(inbuf[:end]).decode().split(" ")
        del inbuf[: end + 1]
        length = int(length)
        while len(inbuf) < length:
            read_more()
        code = bytes(inbuf[:length]).decode("utf-8", "replace")
        del inbuf[:length]
        return kind, cell_id, code

    send("ready")
    while True:
        try:
            kind, cell_id, code = next_cell()
            if kind != "cell":
                continue
            status = run_cell(code)
            send("done %s %s" % (cell_id, status))
        except KeyboardInterrupt:
            pass


_moat_driver()
