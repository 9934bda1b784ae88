//! The request queue between a connection's reader and its workers.
//!
//! It bounds what a client can have in flight (requests and payload bytes), and it decides how
//! many workers to keep awake. Waking a worker costs a context switch, which for a request
//! served from memory costs more than the request itself, so workers are woken in proportion
//! to the queued work: the queue keeps a moving average of how long a request takes and wakes
//! enough workers to drain the backlog within `TARGET_BACKLOG`. A fast device is then served by
//! one worker pipelined with the reader; a slow one gets every worker.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

const TARGET_BACKLOG: Duration = Duration::from_micros(50);

pub struct JobQueue<J> {
    state: Mutex<State<J>>,
    work: Condvar,
    space: Condvar,
    max_in_flight: usize,
    max_bytes: u64,
    max_workers: usize,
}

struct State<J> {
    jobs: VecDeque<J>,
    /// Reserved and not yet released: queued, running, or being read off the wire.
    in_flight: usize,
    in_flight_bytes: u64,
    workers: usize,
    idle: usize,
    /// Wake-ups sent to idle workers not yet taken up, so one idle worker is not counted twice.
    wakeups: usize,
    reader_waiting: bool,
    closing: bool,
    /// Moving average of a job's run time, in nanoseconds.
    run_ns: u64,
}

/// What the reader must do after queueing a job.
#[derive(Debug, PartialEq, Eq)]
pub enum Dispatch {
    Queued,
    /// Start one more worker (already counted; report failure with `worker_not_started`).
    StartWorker,
}

impl<J> JobQueue<J> {
    pub fn new(max_in_flight: usize, max_bytes: u64, max_workers: usize) -> Self {
        JobQueue {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                in_flight: 0,
                in_flight_bytes: 0,
                workers: 0,
                idle: 0,
                wakeups: 0,
                reader_waiting: false,
                closing: false,
                run_ns: 0,
            }),
            work: Condvar::new(),
            space: Condvar::new(),
            max_in_flight: max_in_flight.max(1),
            max_bytes,
            max_workers: max_workers.max(1),
        }
    }

    /// Waits for room for one more request costing `bytes`. A request is always admitted when
    /// nothing is in flight, so one maximum-size request cannot wait forever.
    pub fn reserve(&self, bytes: u64) {
        let mut q = self.state.lock().unwrap();
        while q.in_flight >= self.max_in_flight
            || (q.in_flight > 0 && q.in_flight_bytes + bytes > self.max_bytes)
        {
            q.reader_waiting = true;
            q = self.space.wait(q).unwrap();
        }
        q.reader_waiting = false;
        q.in_flight += 1;
        q.in_flight_bytes += bytes;
    }

    /// Returns a reservation; `ran` is how long the job took, if it ran.
    pub fn release(&self, bytes: u64, ran: Option<Duration>) {
        let mut q = self.state.lock().unwrap();
        q.in_flight -= 1;
        q.in_flight_bytes -= bytes;
        if let Some(d) = ran {
            let sample = d.as_nanos().min(u64::MAX as u128) as u64;
            q.run_ns = q.run_ns - q.run_ns / 8 + sample / 8;
        }
        let wake = q.reader_waiting;
        drop(q);
        if wake {
            self.space.notify_one();
        }
    }

    pub fn push(&self, job: J) -> Dispatch {
        let mut q = self.state.lock().unwrap();
        q.jobs.push_back(job);
        let awake = q.workers - q.idle + q.wakeups;
        let backlog = q.jobs.len() as u128 * q.run_ns as u128;
        let wanted = (backlog / TARGET_BACKLOG.as_nanos() + 1).min(self.max_workers as u128);
        if awake as u128 >= wanted {
            return Dispatch::Queued;
        }
        if q.idle > q.wakeups {
            q.wakeups += 1;
            drop(q);
            self.work.notify_one();
            return Dispatch::Queued;
        }
        if q.workers < self.max_workers {
            q.workers += 1;
            return Dispatch::StartWorker;
        }
        Dispatch::Queued
    }

    /// After a failed `StartWorker`: if no worker exists at all, the queued jobs are handed
    /// back for the caller to run itself.
    pub fn worker_not_started(&self) -> Vec<J> {
        let mut q = self.state.lock().unwrap();
        q.workers -= 1;
        if q.workers == 0 {
            q.jobs.drain(..).collect()
        } else {
            Vec::new()
        }
    }

    /// The next job for a worker; `None` once the queue is closed and empty (the worker exits).
    pub fn pop(&self) -> Option<J> {
        let mut q = self.state.lock().unwrap();
        loop {
            if let Some(job) = q.jobs.pop_front() {
                return Some(job);
            }
            if q.closing {
                q.workers -= 1;
                return None;
            }
            q.idle += 1;
            q = self.work.wait(q).unwrap();
            q.idle -= 1;
            q.wakeups = q.wakeups.saturating_sub(1);
        }
    }

    /// No more jobs will come; workers finish the queue and exit.
    pub fn close(&self) {
        self.state.lock().unwrap().closing = true;
        self.work.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_jobs_keep_one_worker_and_slow_ones_wake_more() {
        let q = JobQueue::new(64, 1 << 20, 4);
        assert_eq!(q.push(1), Dispatch::StartWorker);
        q.reserve(0);
        q.release(0, Some(Duration::from_micros(1)));
        for i in 0..10 {
            assert_eq!(
                q.push(i),
                Dispatch::Queued,
                "fast work needs no second worker"
            );
        }
        for _ in 0..64 {
            q.reserve(0);
            q.release(0, Some(Duration::from_millis(1)));
        }
        assert_eq!(
            q.push(99),
            Dispatch::StartWorker,
            "slow backlog wakes another"
        );
    }

    #[test]
    fn closing_drains_then_ends_workers() {
        let q = JobQueue::new(4, 100, 1);
        assert_eq!(q.push(7), Dispatch::StartWorker);
        q.close();
        assert_eq!(q.pop(), Some(7));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn a_lone_worker_that_failed_to_start_hands_back_the_jobs() {
        let q = JobQueue::new(4, 100, 2);
        assert_eq!(q.push(1), Dispatch::StartWorker);
        assert_eq!(q.worker_not_started(), vec![1]);
    }

    #[test]
    fn reserve_admits_an_oversized_request_when_nothing_is_in_flight() {
        let q: JobQueue<()> = JobQueue::new(4, 100, 1);
        q.reserve(1000);
        q.release(1000, None);
    }
}
