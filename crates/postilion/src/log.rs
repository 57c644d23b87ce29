//! Where log lines go: standard error, written by a thread of their own once the server runs.
//!
//! A session that logs should not wait for the log's destination. A `write(2)` to a file on
//! ext4 costs the caller the file system's write path (at 50 sessions, about 5% of the
//! sessions' CPU for the one line per message), and a pipe to a service manager that stops
//! reading (journald throttling, a full pipe) would stop every session that logs. So once
//! [`LogSink::start`] has run, a line is appended to a buffer, and the log thread writes out
//! everything buffered with one call every [`WRITE_INTERVAL`] while lines keep coming. It is
//! woken only for the first line after a quiet spell: waking it for every line cost more
//! than the writes it saved (10% fewer messages per second at 50 sessions, against 7% more
//! with the interval). The buffer is bounded: when the destination stalls and the buffer is
//! full, loggers wait, rather than the server growing without bound or dropping lines.
//!
//! The thread is started explicitly, after the privileges are dropped: on Linux every thread
//! has its own credentials, and a thread started before the drop would keep root's. Until
//! then, and in the commands that are not the server, lines are written directly.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use tracing_subscriber::fmt::MakeWriter;

/// Octets of buffered lines at which loggers wait for the log thread.
const BUFFER_LIMIT: usize = 1 << 20;
/// While lines keep coming, the thread writes them out this often: waking it for every line
/// would cost more than the write it saves.
const WRITE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// The [`MakeWriter`] for the log; clones share the buffer and the thread.
pub struct LogSink<W: Write + Send + 'static = io::Stderr> {
    shared: Arc<Shared<W>>,
}

impl<W: Write + Send + 'static> Clone for LogSink<W> {
    fn clone(&self) -> Self {
        LogSink { shared: self.shared.clone() }
    }
}

struct Shared<W> {
    state: Mutex<State>,
    /// Signalled when lines are buffered or the thread is asked to stop.
    lines: Condvar,
    /// Signalled when the thread has taken the buffer.
    room: Condvar,
    /// The destination; the thread writes to it, and loggers while there is no thread.
    output: Mutex<W>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct State {
    buffer: Vec<u8>,
    /// The log thread is running: lines go to the buffer.
    threaded: bool,
    /// The thread is to write what is left and stop.
    stopping: bool,
    /// The thread waits for a first line (the buffer was empty when it looked).
    idle: bool,
}

impl LogSink<io::Stderr> {
    pub fn stderr() -> LogSink {
        LogSink::new(io::stderr())
    }
}

impl<W: Write + Send + 'static> LogSink<W> {
    pub fn new(output: W) -> LogSink<W> {
        LogSink {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                lines: Condvar::new(),
                room: Condvar::new(),
                output: Mutex::new(output),
                thread: Mutex::new(None),
            }),
        }
    }

    /// Starts the log thread; from now on lines are buffered, until the returned guard is
    /// dropped (also when unwinding from a panic), which writes them all out and stops the
    /// thread. Call it only once the process runs with the privileges it keeps.
    pub fn start(&self) -> io::Result<LogThread<W>> {
        let mut thread = lock(&self.shared.thread);
        if thread.is_none() {
            let shared = self.shared.clone();
            *thread = Some(std::thread::Builder::new().name("log".into()).spawn(move || {
                shared.write_out();
            })?);
            lock(&self.shared.state).threaded = true;
        }
        Ok(LogThread { sink: self.clone() })
    }

    /// Writes out every line logged so far and stops the thread; later lines are written
    /// directly again.
    fn stop(&self) {
        let Some(thread) = lock(&self.shared.thread).take() else { return };
        {
            let mut state = lock(&self.shared.state);
            state.stopping = true;
            self.shared.lines.notify_one();
        }
        let _ = thread.join();
        let mut state = lock(&self.shared.state);
        state.threaded = false;
        state.stopping = false;
        // Loggers that waited for room while the thread wrote its last lines.
        let left = std::mem::take(&mut state.buffer);
        // The output is taken before the state is let go, so that no line logged directly
        // from now on can overtake the ones left in the buffer.
        let mut output = lock(&self.shared.output);
        self.shared.room.notify_all();
        drop(state);
        let _ = output.write_all(&left);
    }

    fn log(&self, line: &[u8]) -> io::Result<()> {
        let mut state = lock(&self.shared.state);
        if !state.threaded {
            drop(state);
            return lock(&self.shared.output).write_all(line);
        }
        while state.buffer.len() >= BUFFER_LIMIT && state.threaded {
            state = self.shared.room.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        if !state.threaded {
            drop(state);
            return lock(&self.shared.output).write_all(line);
        }
        let before = state.buffer.len();
        state.buffer.extend_from_slice(line);
        let half = BUFFER_LIMIT / 2;
        if state.idle || (before < half && state.buffer.len() >= half) {
            state.idle = false;
            self.shared.lines.notify_one();
        }
        Ok(())
    }
}

impl<W: Write + Send> Shared<W> {
    /// The log thread: waits for a line, then every [`WRITE_INTERVAL`] takes whatever is
    /// buffered and writes it with one call, until asked to stop with nothing left.
    fn write_out(&self) {
        let mut spare = Vec::new();
        loop {
            let mut state = lock(&self.state);
            while state.buffer.is_empty() && !state.stopping {
                state.idle = true;
                state = self.lines.wait(state).unwrap_or_else(PoisonError::into_inner);
            }
            state.idle = false;
            if state.buffer.is_empty() {
                return;
            }
            // Let more lines gather, unless stopping or the buffer is filling up.
            if !state.stopping && state.buffer.len() < BUFFER_LIMIT / 2 {
                state = self
                    .lines
                    .wait_timeout_while(state, WRITE_INTERVAL, |state| {
                        !state.stopping && state.buffer.len() < BUFFER_LIMIT / 2
                    })
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            std::mem::swap(&mut state.buffer, &mut spare);
            self.room.notify_all();
            drop(state);
            // Nowhere to report a failure to: the lines are lost, as a direct write's would be.
            let _ = lock(&self.output).write_all(&spare);
            spare.clear();
            if spare.capacity() > BUFFER_LIMIT {
                spare = Vec::new();
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while logging leaves nothing half done that matters here.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The running log thread; dropping it stops the thread after it has written everything.
pub struct LogThread<W: Write + Send + 'static> {
    sink: LogSink<W>,
}

impl<W: Write + Send + 'static> Drop for LogThread<W> {
    fn drop(&mut self) {
        self.sink.stop();
    }
}

/// One event's writer: tracing's formatter writes each line whole, with one `write_all`.
pub struct LogLine<W: Write + Send + 'static> {
    sink: LogSink<W>,
}

impl<W: Write + Send + 'static> Write for LogLine<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sink.log(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.sink.log(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a, W: Write + Send + 'static> MakeWriter<'a> for LogSink<W> {
    type Writer = LogLine<W>;

    fn make_writer(&'a self) -> Self::Writer {
        LogLine { sink: self.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Collects what is written; each `write` call is one element.
    #[derive(Clone, Default)]
    struct Calls(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Calls {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Calls {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().concat()).unwrap()
        }
        fn count(&self) -> usize {
            self.0.lock().unwrap().len()
        }
    }

    fn log(sink: &LogSink<Calls>, line: &str) {
        sink.make_writer().write_all(line.as_bytes()).unwrap();
    }

    #[test]
    fn before_the_thread_and_after_it_lines_are_written_directly() {
        let output = Calls::default();
        let sink = LogSink::new(output.clone());
        log(&sink, "one\n");
        assert_eq!(output.text(), "one\n", "written at once");
        let thread = sink.start().unwrap();
        log(&sink, "two\n");
        drop(thread);
        assert_eq!(output.text(), "one\ntwo\n", "stop writes out what is buffered");
        log(&sink, "three\n");
        assert_eq!(output.text(), "one\ntwo\nthree\n");
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_and_in_each_threads_order() {
        let output = Calls::default();
        let sink = LogSink::new(output.clone());
        let thread = sink.start().unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        log(&sink, &format!("thread {t} line {i} {}\n", "x".repeat(i % 50)));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        drop(thread);
        let text = output.text();
        let mut next = [0usize; 8];
        for line in text.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let (t, i): (usize, usize) = (fields[1].parse().unwrap(), fields[3].parse().unwrap());
            assert_eq!(i, next[t], "thread {t} out of order or a line torn: {line:?}");
            assert_eq!(fields[4].len(), i % 50, "{line:?}");
            next[t] += 1;
        }
        assert_eq!(next, [2000; 8]);
        assert!(output.count() < 16000, "every line written on its own: {}", output.count());
    }

    /// A destination that blocks every write until released.
    struct Stalled {
        release: Arc<Mutex<mpsc::Receiver<()>>>,
        calls: Calls,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.release.lock().unwrap().recv();
            self.calls.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_destination_makes_loggers_wait_at_the_limit_and_loses_nothing() {
        let (release, released) = mpsc::channel();
        let calls = Calls::default();
        let sink =
            LogSink::new(Stalled { release: Arc::new(Mutex::new(released)), calls: calls.clone() });
        let thread = sink.start().unwrap();
        let line = "y".repeat(1023) + "\n";
        let lines = 3 * BUFFER_LIMIT / line.len();
        let (progress, logged) = mpsc::channel();
        let logger = {
            let (sink, line) = (sink.clone(), line.clone());
            std::thread::spawn(move || {
                for _ in 0..lines {
                    sink.make_writer().write_all(line.as_bytes()).unwrap();
                    let _ = progress.send(());
                }
            })
        };
        // The thread holds the first lines in a stalled write; the next fill the buffer.
        std::thread::sleep(Duration::from_millis(200));
        let before = logged.try_iter().count();
        assert!(before < lines, "the logger never waited");
        assert!(
            lock(&sink.shared.state).buffer.len() <= BUFFER_LIMIT + line.len(),
            "the buffer grew past its limit"
        );
        // Let the destination go: everything arrives.
        drop(release);
        logger.join().unwrap();
        drop(thread);
        assert_eq!(calls.text().len(), lines * line.len());
    }
}
