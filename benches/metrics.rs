//! What metrics cost a request on the data path: two clock reads and
//! `IoMetrics::record` (relaxed atomic additions and one histogram
//! bucket), alone and with two threads recording into the same export.
//!
//! `cargo bench --bench metrics`; `-- --test` runs each once.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use replblk::metrics::{IoMetrics, Op};

/// CPU time this thread has used: on a shared, loaded machine the wall
/// clock also counts the time other processes ran.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writing into a local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn record(c: &mut Criterion) {
    let m = IoMetrics::leak();
    c.bench_function("metrics: clock + record (1 thread, wall time)", |b| {
        b.iter(|| {
            let start = Instant::now();
            m.record(black_box(Op::Write), 4096, true, start.elapsed());
        })
    });
    c.bench_function("metrics: clock + record (1 thread, thread CPU time)", |b| {
        b.iter_custom(|iters| {
            let begin = thread_cpu();
            for _ in 0..iters {
                let start = Instant::now();
                m.record(black_box(Op::Write), 4096, true, start.elapsed());
            }
            thread_cpu() - begin
        })
    });
    c.bench_function("metrics: clock + record (2 threads, same export)", |b| {
        b.iter_custom(|iters| {
            let begin = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        for _ in 0..iters {
                            let start = Instant::now();
                            m.record(black_box(Op::Write), 4096, true, start.elapsed());
                        }
                    });
                }
            });
            // Per record, as each thread sees it.
            begin.elapsed()
        })
    });
}

criterion_group!(benches, record);
criterion_main!(benches);
