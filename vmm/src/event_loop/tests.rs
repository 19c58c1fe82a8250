use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;

type Log = Arc<Mutex<Vec<Event>>>;

fn log() -> Log {
    Arc::new(Mutex::new(Vec::new()))
}

fn events(log: &Log) -> Vec<Event> {
    log.lock().expect("unpoisoned").clone()
}

/// Counts readiness of an eventfd and stops the loop after `stop_after`.
struct Counter {
    evt: EventFd,
    seen: usize,
    stop_after: usize,
    log: Log,
}

impl EventHandler for Counter {
    fn start(&mut self, ops: &mut Ops<'_>) {
        ops.watch(self.evt.as_raw_fd(), 7, libc::POLLIN as u32);
    }
    fn handle(&mut self, event: Event, ops: &mut Ops<'_>) {
        let _ = self.evt.read();
        self.log.lock().expect("unpoisoned").push(event);
        self.seen += 1;
        if self.seen == self.stop_after {
            ops.stop_loop();
        } else {
            // Make the fd readable again: the multishot poll must fire again.
            self.evt.write(1).expect("eventfd write");
        }
    }
}

#[test]
fn multishot_watch_fires_repeatedly() {
    let mut lp = EventLoop::new(8).expect("io_uring");
    let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    evt.write(1).expect("write");
    let log = log();
    lp.handle()
        .add(Box::new(Counter {
            evt,
            seen: 0,
            stop_after: 3,
            log: log.clone(),
        }))
        .expect("add");
    lp.run().expect("run");
    let ev = events(&log);
    assert_eq!(ev.len(), 3);
    assert!(ev.iter().all(
        |e| matches!(e, Event::Ready { token: 7, revents } if revents & libc::POLLIN as u32 != 0)
    ));
}

struct TimerHandler {
    armed: Instant,
    fired: Arc<Mutex<Option<Duration>>>,
}

impl EventHandler for TimerHandler {
    fn start(&mut self, ops: &mut Ops<'_>) {
        ops.timer(1, Duration::from_millis(30));
        ops.timer(2, Duration::from_millis(5));
        ops.cancel_timer(2);
    }
    fn handle(&mut self, event: Event, ops: &mut Ops<'_>) {
        assert_eq!(
            event,
            Event::Timer { token: 1 },
            "the cancelled timer never fires"
        );
        *self.fired.lock().expect("unpoisoned") = Some(self.armed.elapsed());
        ops.stop_loop();
    }
}

#[test]
fn timers_fire_and_cancel() {
    let mut lp = EventLoop::new(8).expect("io_uring");
    let fired = Arc::new(Mutex::new(None));
    lp.handle()
        .add(Box::new(TimerHandler {
            armed: Instant::now(),
            fired: fired.clone(),
        }))
        .expect("add");
    lp.run().expect("run");
    let after = fired.lock().expect("unpoisoned").expect("timer fired");
    assert!(after >= Duration::from_millis(30), "{after:?}");
}

struct GuestIo {
    file: std::fs::File,
    mem: GuestMemoryMmap,
    log: Log,
    step: u32,
}

impl EventHandler for GuestIo {
    fn start(&mut self, ops: &mut Ops<'_>) {
        // Scatter-gather write of two guest buffers at file offset 4096.
        let ranges = [(GuestAddress(0x1000), 5), (GuestAddress(0x3000), 6)];
        ops.write_from_guest(self.file.as_raw_fd(), 4096, &self.mem, &ranges, 1)
            .expect("valid buffers");
    }
    fn handle(&mut self, event: Event, ops: &mut Ops<'_>) {
        self.log.lock().expect("unpoisoned").push(event);
        self.step += 1;
        match self.step {
            1 => ops.fsync(self.file.as_raw_fd(), 2),
            2 => {
                let ranges = [(GuestAddress(0x8000), 11)];
                ops.read_to_guest(self.file.as_raw_fd(), 4096, &self.mem, &ranges, 3)
                    .expect("valid buffer");
            }
            _ => ops.stop_loop(),
        }
    }
}

#[test]
fn guest_memory_io_round_trips_through_a_file() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("mmap");
    mem.write_slice(b"hello", GuestAddress(0x1000))
        .expect("write");
    mem.write_slice(b" world", GuestAddress(0x3000))
        .expect("write");
    let file = tempfile::tempfile().expect("tempfile");
    let log = log();
    let mut lp = EventLoop::new(8).expect("io_uring");
    lp.handle()
        .add(Box::new(GuestIo {
            file,
            mem: mem.clone(),
            log: log.clone(),
            step: 0,
        }))
        .expect("add");
    lp.run().expect("run");
    assert_eq!(
        events(&log),
        vec![
            Event::Done {
                token: 1,
                result: 11
            },
            Event::Done {
                token: 2,
                result: 0
            },
            Event::Done {
                token: 3,
                result: 11
            },
        ]
    );
    let mut back = [0u8; 11];
    mem.read_slice(&mut back, GuestAddress(0x8000))
        .expect("read");
    assert_eq!(&back, b"hello world");
}

#[test]
fn guest_buffers_are_validated() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("mmap");
    let mut lp = EventLoop::new(8).expect("io_uring");
    let mut ops = Ops::new(&mut lp.core, 0);
    let f = tempfile::tempfile().expect("tempfile");
    assert_eq!(
        ops.read_to_guest(f.as_raw_fd(), 0, &mem, &[(GuestAddress(0xfff0), 0x20)], 1),
        Err(GuestIoError::OutOfBounds {
            addr: 0xfff0,
            len: 0x20
        })
    );
    assert_eq!(
        ops.read_to_guest(f.as_raw_fd(), 0, &mem, &[], 1),
        Err(GuestIoError::BufferCount(0))
    );
    let many = vec![(GuestAddress(0), 1); ops::MAX_IOVECS + 1];
    assert_eq!(
        ops.write_from_guest(f.as_raw_fd(), 0, &mem, &many, 1),
        Err(GuestIoError::BufferCount(ops::MAX_IOVECS + 1))
    );
}

struct Stoppable {
    evt: EventFd,
    stopped: Arc<Mutex<bool>>,
    log: Log,
}

impl EventHandler for Stoppable {
    fn start(&mut self, ops: &mut Ops<'_>) {
        ops.watch(self.evt.as_raw_fd(), 1, libc::POLLIN as u32);
    }
    fn handle(&mut self, event: Event, _ops: &mut Ops<'_>) {
        let _ = self.evt.read();
        self.log.lock().expect("unpoisoned").push(event);
    }
    fn stop(&mut self) {
        *self.stopped.lock().expect("unpoisoned") = true;
    }
}

#[test]
fn removed_handlers_stop_and_hear_nothing_more() {
    let mut lp = EventLoop::new(8).expect("io_uring");
    let handle = lp.handle();
    let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let poke = evt.try_clone().expect("dup");
    let stopped = Arc::new(Mutex::new(false));
    let log = log();
    let id = handle
        .add(Box::new(Stoppable {
            evt,
            stopped: stopped.clone(),
            log: log.clone(),
        }))
        .expect("add");
    let remote = handle.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        remote.remove(id).expect("remove");
        std::thread::sleep(Duration::from_millis(20));
        poke.write(1).expect("poke after removal");
        std::thread::sleep(Duration::from_millis(20));
        remote.stop().expect("stop");
    });
    lp.run().expect("run");
    t.join().expect("thread");
    assert!(*stopped.lock().expect("unpoisoned"));
    assert!(events(&log).is_empty(), "{:?}", events(&log));
    assert!(matches!(
        handle.add(Box::new(Stoppable {
            evt: EventFd::new(0).expect("eventfd"),
            stopped: Arc::new(Mutex::new(false)),
            log: log.clone(),
        })),
        Ok(_) | Err(Error::Stopped)
    ));
}

#[test]
fn stop_from_another_thread_ends_an_idle_loop() {
    let mut lp = EventLoop::new(8).expect("io_uring");
    let h = lp.handle();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        h.stop().expect("stop");
    });
    lp.run().expect("an idle loop blocks, then stops");
    t.join().expect("thread");
}

/// Pokes handler `target` once its eventfd is readable.
struct Poker {
    evt: EventFd,
    target: HandlerId,
    reached: Arc<Mutex<Vec<bool>>>,
}

impl EventHandler for Poker {
    fn start(&mut self, ops: &mut Ops<'_>) {
        ops.watch(self.evt.as_raw_fd(), 0, libc::POLLIN as u32);
        // Other handlers are out of reach while starting.
        let reached = ops.notify(self.target, 1);
        self.reached.lock().expect("unpoisoned").push(reached);
    }
    fn handle(&mut self, _event: Event, ops: &mut Ops<'_>) {
        let _ = self.evt.read();
        ops.unwatch(0);
        let me = ops.id();
        let mut reached = self.reached.lock().expect("unpoisoned");
        reached.push(ops.notify(me, 2));
        reached.push(ops.notify(self.target, 3));
        reached.push(ops.notify(HandlerId::MAX - 1, 4));
    }
}

/// Records what it is told and ends the loop on a notification.
struct Notified {
    log: Log,
}

impl EventHandler for Notified {
    fn start(&mut self, _ops: &mut Ops<'_>) {}
    fn handle(&mut self, event: Event, ops: &mut Ops<'_>) {
        self.log.lock().expect("unpoisoned").push(event);
        // The notified handler acts with its own operations.
        ops.timer(9, Duration::ZERO);
        if matches!(event, Event::Timer { token: 9 }) {
            ops.stop_loop();
        }
    }
}

#[test]
fn notify_runs_another_handler_at_once_with_its_own_ops() {
    let mut lp = EventLoop::new(8).expect("io_uring");
    let log = log();
    let target = lp
        .handle()
        .add(Box::new(Notified { log: log.clone() }))
        .expect("add");
    let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    evt.write(1).expect("write");
    let reached = Arc::new(Mutex::new(Vec::new()));
    lp.handle()
        .add(Box::new(Poker {
            evt,
            target,
            reached: reached.clone(),
        }))
        .expect("add");
    lp.run().expect("run");
    assert_eq!(
        *reached.lock().expect("unpoisoned"),
        vec![false, false, true, false],
        "not from start, not itself, the target, not an unknown id"
    );
    let ev = events(&log);
    assert_eq!(ev[0], Event::Notify { token: 3 });
    assert!(ev.contains(&Event::Timer { token: 9 }), "{ev:?}");
}

/// Queues `count` fsyncs at start; stops once each has completed.
struct Fsyncs {
    file: std::fs::File,
    count: u32,
    log: Log,
}

impl EventHandler for Fsyncs {
    fn start(&mut self, ops: &mut Ops<'_>) {
        for token in 0..self.count {
            ops.fsync(self.file.as_raw_fd(), token);
        }
    }
    fn handle(&mut self, event: Event, ops: &mut Ops<'_>) {
        let mut log = self.log.lock().expect("unpoisoned");
        log.push(event);
        if log.len() == self.count as usize {
            ops.stop_loop();
        }
    }
}

#[test]
fn a_failed_submission_completes_with_its_error_and_leaks_nothing() {
    // Four slots, one of them the loop's own poll: a fsync finds the queue
    // full, and the submit that would make room fails.
    let mut lp = EventLoop::new(4).expect("io_uring");
    lp.core.fail_submits = 1;
    let log = log();
    lp.handle()
        .add(Box::new(Fsyncs {
            file: tempfile::tempfile().expect("tempfile"),
            count: 12,
            log: log.clone(),
        }))
        .expect("add");
    lp.run().expect("run");
    let mut results: Vec<(Token, i32)> = events(&log)
        .into_iter()
        .map(|e| match e {
            Event::Done { token, result } => (token, result),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    results.sort_unstable();
    let failed: Vec<Token> = results
        .iter()
        .filter(|(_, r)| *r == -libc::EBUSY)
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(failed.len(), 1, "one submission failed: {results:?}");
    assert_eq!(results.len(), 12, "every operation completed once");
    assert!(results.iter().all(|(_, r)| *r == 0 || *r == -libc::EBUSY));
    // Only the loop's own wake-up poll is left.
    assert_eq!(lp.core.pending.len(), 1, "no pending operation leaked");
}
