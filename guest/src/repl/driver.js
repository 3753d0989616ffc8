// moat REPL driver for Node.js, run by moat-agent as `node -e <this file>`
// (see guest/src/repl/mod.rs for the protocol). The agent gives us three pipes
// besides stdio: fd 3 carries cells to us ("cell <id> <len>\n" + <len> bytes
// of UTF-8 code), fd 4 carries our events to the agent ("ready", "sync <seq>",
// "done <id> ok|error|interrupted", one per line), fd 5 carries the agent's
// acknowledgements of syncs ("<seq>\n"). Everything lives in this closure;
// cells run through the `repl` module's own eval (top-level await, persistent
// declarations, SIGINT breaks busy loops). Written for Node 18 and later.
(() => {
  'use strict';
  const fs = require('fs');
  const net = require('net');
  const repl = require('repl');
  const util = require('util');
  const { EventEmitter } = require('events');
  const { PassThrough, Writable } = require('stream');

  const SYNC_WAIT_MS = 1000;
  const { O_RDONLY, O_WRONLY, O_NONBLOCK } = fs.constants;

  // Reopen the inherited pipes through /proc: libuv opens files close-on-exec,
  // so processes started by user code do not inherit the control channel.
  function reopen(fd, flags) {
    try {
      const copy = fs.openSync(`/proc/self/fd/${fd}`, flags);
      fs.closeSync(fd);
      return copy;
    } catch (e) {
      return fd;
    }
  }
  const reqFd = reopen(3, O_RDONLY);
  const evFd = reopen(4, O_WRONLY);
  const ackFd = reopen(5, O_RDONLY | O_NONBLOCK);

  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  const sleep = (ms) => Atomics.wait(sleeper, 0, 0, ms);

  function writeAll(fd, buf) {
    let off = 0;
    while (off < buf.length) {
      try {
        off += fs.writeSync(fd, buf, off, buf.length - off);
      } catch (e) {
        if (e.code === 'EAGAIN') {
          sleep(1);
        } else if (e.code !== 'EINTR') {
          return; // the reader is gone
        }
      }
    }
  }
  const send = (line) => writeAll(evFd, Buffer.from(`${line}\n`));

  const st = { inCell: false, last: 0, seq: 0, acked: 0, ackText: '', failed: false };

  // Wait until the agent has read everything already written to stdout and
  // stderr, so that what comes next is seen after it.
  function sync() {
    const seq = ++st.seq;
    send(`sync ${seq}`);
    const until = Date.now() + SYNC_WAIT_MS;
    const buf = Buffer.alloc(256);
    while (st.acked < seq && Date.now() < until) {
      let n;
      try {
        n = fs.readSync(ackFd, buf, 0, buf.length, null);
      } catch (e) {
        if (e.code !== 'EAGAIN' && e.code !== 'EINTR') return;
        sleep(0.2);
        continue;
      }
      if (n === 0) return;
      st.ackText += buf.toString('latin1', 0, n);
      let nl;
      while ((nl = st.ackText.indexOf('\n')) >= 0) {
        const seen = Number(st.ackText.slice(0, nl));
        st.ackText = st.ackText.slice(nl + 1);
        if (seen > st.acked) st.acked = seen;
      }
    }
  }

  // process.stdout / process.stderr: synchronous writes to the real fds 1
  // and 2, with a sync whenever output switches from one to the other.
  function stdio(fd) {
    const stream = new Writable({
      decodeStrings: false,
      write(chunk, encoding, cb) {
        const buf = typeof chunk === 'string' ? Buffer.from(chunk, encoding) : chunk;
        if (st.inCell && st.last !== 0 && st.last !== fd) sync();
        st.last = fd;
        writeAll(fd, buf);
        cb();
      },
    });
    stream.fd = fd;
    stream.isTTY = false;
    stream._type = 'pipe';
    stream._isStdio = true;
    return stream;
  }
  const stdout = stdio(1);
  const stderr = stdio(2);
  for (const [name, stream] of [['stdout', stdout], ['stderr', stderr]]) {
    Object.defineProperty(process, name, {
      configurable: true,
      enumerable: true,
      get: () => stream,
    });
  }
  try {
    // The global console binds process.stdout/stderr lazily; make sure.
    console._stdout = stdout;
    console._stderr = stderr;
  } catch (e) {
    // Not settable in this Node version: the lazy binding already uses ours.
  }

  // A stand-in for the domain the REPL would create: with no active domain,
  // the REPL's eval hands errors to our callback instead of printing them to
  // its (discarded) output.
  const quietDomain = new EventEmitter();
  quietDomain.bind = (fn) => fn;
  quietDomain.run = (fn, ...args) => fn(...args);
  quietDomain.add = quietDomain.remove = quietDomain.enter = quietDomain.exit = () => {};

  const r = repl.start({
    prompt: '',
    input: new PassThrough(),
    output: new Writable({ write: (chunk, encoding, cb) => cb() }),
    terminal: false,
    useColors: false,
    useGlobal: true,
    ignoreUndefined: true,
    breakEvalOnSigint: true,
    preview: false,
    domain: quietDomain,
  });

  // Frames below the cell's top level (vm, repl, this driver) are not the
  // user's: drop them.
  const MACHINERY = /\((?:node:vm|node:repl|node:internal\/vm|node:internal\/timers|\[eval\])[:)]|^\s+at (?:async )?(?:node:repl|\[eval\])/;
  function clean(text) {
    const lines = text.split('\n');
    const isFrame = (line) => /^\s+at /.test(line);
    let top = -1;
    lines.forEach((line, i) => {
      if (/^\s+at (?:async )?cell:\d+:\d+(?: \{)?$/.test(line)) top = i;
    });
    const kept = [];
    lines.forEach((line, i) => {
      const keep = !isFrame(line) || (top >= 0 ? i <= top : !MACHINERY.test(line));
      if (keep) {
        kept.push(line);
      } else if (line.endsWith(' {') && kept.length > 0) {
        // util.inspect opens the error's own properties on its last frame.
        kept[kept.length - 1] += ' {';
      }
    });
    return kept.join('\n');
  }

  const interrupted = (e) => e !== null && typeof e === 'object' &&
    e.code === 'ERR_SCRIPT_EXECUTION_INTERRUPTED';

  function report(err) {
    const e = err instanceof repl.Recoverable ? err.err : err;
    let text;
    if (interrupted(e)) {
      text = `Error: ${e.message}`;
    } else if (e !== null && typeof e === 'object' && typeof e.stack === 'string') {
      text = clean(util.inspect(e));
    } else {
      text = `Uncaught ${util.inspect(e)}`;
    }
    stderr.write(`${text}\n`);
  }

  process.on('uncaughtException', (e) => {
    report(e);
    if (st.inCell) st.failed = true;
  });
  // SIGINT: while a cell runs synchronous code, the REPL's watchdog turns it
  // into an exception. While a cell awaits a promise, this listener makes
  // the REPL reject it. It is attached only for that phase: a `SIGINT`
  // listener present while the REPL's watchdog starts would be detached by
  // vm (sigintHandlersWrap), which resets the signal to its default.
  const onSigint = () => {
    if (st.inCell) r.emit('SIGINT');
  };

  const queue = [];
  let busy = false;

  function runNext() {
    if (busy || queue.length === 0) return;
    busy = true;
    // From a fresh macrotask: the stack below the cell is then only
    // machinery that clean() recognises.
    setImmediate(runCell);
  }

  function runCell() {
    const [id, code] = queue.shift();
    st.inCell = true;
    st.last = 0;
    st.failed = false;
    let ended = false;
    const end = (status) => {
      if (ended) return;
      ended = true;
      process.removeListener('SIGINT', onSigint);
      // Let rejections the cell left unhandled surface first.
      setImmediate(() => {
        st.inCell = false;
        send(`done ${id} ${status === 'ok' && st.failed ? 'error' : status}`);
        busy = false;
        runNext();
      });
    };
    const fail = (e) => {
      report(e);
      end(interrupted(e) ? 'interrupted' : 'error');
    };
    try {
      r.eval(code, r.context, 'cell', (e) => (e ? fail(e) : end('ok')));
    } catch (e) {
      fail(e);
    }
    // Still running after eval returned: the cell awaits a promise.
    if (!ended) process.on('SIGINT', onSigint);
  }

  let inbuf = Buffer.alloc(0);
  function parse() {
    for (;;) {
      const nl = inbuf.indexOf(10);
      if (nl < 0) break;
      const [kind, id, len] = inbuf.toString('latin1', 0, nl).split(' ');
      const n = Number(len);
      if (inbuf.length < nl + 1 + n) break;
      const code = inbuf.toString('utf8', nl + 1, nl + 1 + n);
      inbuf = inbuf.subarray(nl + 1 + n);
      if (kind === 'cell') queue.push([id, code]);
    }
    runNext();
  }

  const requests = new net.Socket({ fd: reqFd, readable: true, writable: false });
  requests.on('data', (chunk) => {
    inbuf = inbuf.length ? Buffer.concat([inbuf, chunk]) : chunk;
    parse();
  });
  // The agent is gone: so are we.
  requests.on('end', () => process.exit(0));
  requests.on('error', () => process.exit(0));

  send('ready');
})();
