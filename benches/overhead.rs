//! disco vs a minimal bare-KVM runner on anonymous memory, same workload,
//! measured in one `cargo bench` run: one criterion group per workload with
//! the two runners as its functions, then the ratio of their medians.
//!
//! disco runs with the `static` policy: the monitor itself (memfd pools,
//! mapper, verify, progress polling), no sharing scanner. What each side
//! includes: see `disco::bench::bare` and `disco::bench::overhead`. Every run's checksums are checked (a wrong one
//! panics). `disco bench overhead` measures the same with the two runners
//! interleaved and reports tables and JSON.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};

use disco::bench::bare::BareMemory;
use disco::bench::overhead::{run_bare, run_disco, Measured, OverheadCase, STATIC};
use disco::bench::Stats;
use disco::config::Config;

const SAMPLES: usize = 10;

type Runner = fn(&Config) -> anyhow::Result<Measured>;

fn overhead(c: &mut Criterion) {
    if !disco::kvm_check::require_kvm("benches/overhead") {
        return;
    }
    for case in [
        OverheadCase::fill(64, 2, STATIC),
        OverheadCase::sweep(64, 2, 16, STATIC),
    ] {
        let config = case.parse().expect("the bench config is valid");
        let id = case.name.replace('/', "-");
        let mut group = c.benchmark_group(format!("overhead/{id}"));
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(SAMPLES)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(5));
        // Per-iteration wall times of each call, to print the ratio of the
        // two runners' medians (the last SAMPLES calls are criterion's samples).
        let mut medians = Vec::new();
        let runners: [(&str, Runner); 2] = [
            ("disco", run_disco),
            ("bare", |config| run_bare(config, BareMemory::Anonymous)),
        ];
        for (name, runner) in runners {
            let per_call = Mutex::new(Vec::new());
            group.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    for _ in 0..iters {
                        runner(&config).unwrap_or_else(|e| panic!("{name}: {e:#}"));
                    }
                    let total = t.elapsed();
                    per_call
                        .lock()
                        .unwrap()
                        .push(total.as_secs_f64() * 1e3 / iters as f64);
                    total
                })
            });
            let calls = per_call.into_inner().unwrap();
            let samples = &calls[calls.len().saturating_sub(SAMPLES)..];
            medians.push(Stats::of(samples).median);
        }
        group.finish();
        println!(
            "overhead/{id}: disco/bare = {:.2} (medians per run: disco {:.1} ms, bare {:.1} ms; {})\n",
            medians[0] / medians[1],
            medians[0],
            medians[1],
            case.description
        );
    }
}

criterion_group!(benches, overhead);
criterion_main!(benches);
